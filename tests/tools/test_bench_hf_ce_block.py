"""tools/bench_hf_ce_block.py: its reference block computes what our HF CE blocks compute (so the
speed comparison is like for like), and its check catches a reference that differs. No timing asserts."""

import json
import os
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "tools"))

import bench_hf_ce_block as bench  # noqa: E402


def test_smoke_outputs_match(capsys):
    bench.main(["--smoke", "--json"])
    res = json.loads(capsys.readouterr().out)
    for family in ("olmoe", "phimoe"):
        assert res[family]["max_rel_diff"] <= 1e-4
        for what in ("train", "decode", "block_train", "block_decode"):
            r = res[family][what]
            assert r["ours_s"]["min"] > 0 and r["reference_s"]["min"] > 0


def _tiny_args():
    return bench.argparse.Namespace(seed=0, vocab=64, hidden=32, ffn=48, layers=2, heads=4, seq=16, prompt_len=4,
                                    new_tokens=2, experts=6, topk=4, ce=2, dtype=torch.float32)


@pytest.mark.parametrize("family", ["olmoe", "phimoe"])
@pytest.mark.parametrize("role", [0, 1, 2])  # gate, down, up vectors of the reference's CE table
def test_check_catches_a_different_reference(family, role):
    args = _tiny_args()
    ours, ref = bench.build_pair(family, args)
    with torch.no_grad():
        ref.model.layers[1].mlp.ces[:, role].mul_(1.001)
    with pytest.raises(AssertionError, match="layer 1 block output"):
        bench.check_same_outputs(ours, ref, args)
