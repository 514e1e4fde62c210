"""The trainer on one GPU (pytest -m gpu; tools/gpu_check.sh runs these): the same command lines as the
CPU tests, the device is the only difference."""

import pytest

from tests.training.conftest import TINY, run_train

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_local_spec_trains_on_gpu(tmp_path, bf16):
    # The local spec's norms are plain torch modules that megatron-core creates on the CPU whatever
    # use_cpu_initialization says; the trainer must move the whole model to the GPU (as Megatron-LM's
    # get_model does), or the first forward mixes devices.
    args = TINY + ["--train-iters", "3", "--transformer-impl", "local", "--save", str(tmp_path / "ckpt")]
    out = run_train(args + (["--bf16"] if bf16 else []), timeout=300).stdout
    assert "iter      3/3" in out, out[-3000:]
