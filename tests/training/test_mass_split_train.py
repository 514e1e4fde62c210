"""--moe-ce-split mass through the trainer: main experts per token vary and are logged."""

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.training.conftest import TINY, run_train, tb_scalars


@pytest.mark.parametrize("capacity", [[], ["--moe-expert-capacity-factor", "0.5", "--moe-pad-expert-input-to-capacity"]],
                         ids=["dropless", "capacity-padded"])
def test_mass_split_logs_main_experts_per_token(tmp_path, capacity):
    args = [a for a in TINY]
    i = args.index("--moe-ce-num-compressed")
    del args[i : i + 2]  # derived from --moe-ce-min-main under the mass split
    args += ["--moe-ce-split", "mass", "--moe-ce-main-mass", "0.5", "--moe-ce-min-main", "1",
             "--train-iters", "3", "--tensorboard-dir", str(tmp_path / "tb")] + capacity
    run_train(args, nproc=1, timeout=240)
    mean = tb_scalars(tmp_path / "tb", "moe/main_per_token")
    assert 1.0 <= mean[3] <= 4.0
    ea = EventAccumulator(str(tmp_path / "tb"), size_guidance={"histograms": 0})
    ea.Reload()
    hist = ea.Histograms("moe/main_per_token_hist/layer_01")[-1].histogram_value
    assert hist.min >= 1 and hist.max <= 4 and hist.num > 0
    assert abs(hist.sum / hist.num - mean[3]) < 1.0  # per-layer vs all-layer mean, same range
