"""tools/count_params.py --moe-ce-split mass: expected active parameters per token, measured on data.

Checks: the pure formula against a hand computation; on a trainer checkpoint, tau = 1 gives the plain
top-k count and tau = 0 the exact fixed top-1 + CE count of the fixed-split tool;
an intermediate tau equals the prefix rule recomputed in plain torch from the router logits of the
same forward; an HF model folder is converted on the fly.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from megatron_ce.paper.params import expected_active_params

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATA = os.path.join(REPO, "examples", "data")
K, E, L = 4, 8, 2
# vocab = the tiny tokenizer's 1024 tokens; 8 experts top-4 so the mass split has 1..4 main experts
CONFIG = dict(model_type="olmoe", vocab_size=1024, hidden_size=32, intermediate_size=32, num_hidden_layers=L,
              num_attention_heads=4, num_key_value_heads=4, num_experts=E, num_experts_per_tok=K,
              max_position_embeddings=128, tie_word_embeddings=False, norm_topk_prob=False)
DATA_FLAGS = ["--data-path", os.path.join(DATA, "sft_tiny.jsonl"), "--tokenizer-model", os.path.join(DATA, "tokenizer"),
              "--seq-length", "64", "--micro-batch-size", "8"]
SAMPLES = 24


def test_expected_active_params_hand():
    counts = dict(dense=1000, expert_each=300, ce_each=7)
    # layer 1: 1.5 main + 2.5 compressed; layer 2: 4 main + 0 compressed
    assert expected_active_params(counts, [1.5, 4.0], 4) == 1000 + (450 + 17.5) + 1200
    assert expected_active_params(counts, [], 4) == 1000
    with pytest.raises(ValueError):
        expected_active_params(counts, [4.5], 4)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A trainer checkpoint (--save) of a tiny OLMoE, 1 iteration from a wide init so routing is uneven."""
    from tests.training.conftest import run_train

    d = tmp_path_factory.mktemp("mass")
    (d / "config.json").write_text(json.dumps(CONFIG))
    run_train(["--model-config", str(d / "config.json"), *DATA_FLAGS, "--train-iters", "1", "--init-method-std", "0.2",
               "--save", str(d / "ckpt")], timeout=180)
    return d


@pytest.fixture(scope="module")
def fixed(tmp_path_factory):
    """The exact fixed-split tool on the same config: top-4 (active_base) and top-1 + 3 CE (active_ce)."""
    d = tmp_path_factory.mktemp("fixed")
    (d / "config.json").write_text(json.dumps(CONFIG))
    return _tool("--model", str(d / "config.json"), "--moe-ce-num-compressed", str(K - 1))


def _tool(*flags):
    out = subprocess.run([sys.executable, os.path.join(REPO, "tools", "count_params.py"), "--json", *flags],
                         capture_output=True, text=True, cwd=REPO, timeout=300,
                         env=dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)  # stdout holds the JSON only


def _mass(ckpt, *flags):
    return _tool("--moe-ce-split", "mass", "--load", str(ckpt / "ckpt"), "--num-samples", str(SAMPLES),
                 *DATA_FLAGS, *flags)


def test_tau_1_and_tau_0_match_the_exact_counts(ckpt, fixed):
    full = _mass(ckpt, "--moe-ce-main-mass", "1.0")
    assert full["main_per_token"] == [K] * L
    assert full["expected_active"] == fixed["active_base"] == full["active_topk"]  # plain top-4
    assert full["tokens"] == sum(sum(h) for h in full["main_per_token_hist"]) / L > 0
    # tau -> 0: the top-1 expert always suffices (min main 1 by default): the fixed top-1 + 3 CE count
    zero = _mass(ckpt, "--moe-ce-main-mass", "0")
    assert zero["main_per_token"] == [1] * L and zero["min_main"] == 1
    assert zero["expected_active"] == fixed["active_ce"] == zero["active_fixed_min"]
    assert zero["expert_each"] == fixed["expert_params_each"] and zero["ce_each"] == fixed["ce_params_each"]


def _reference_main_counts(router_inputs, weight, tau, lo, hi):
    """Plain torch: softmax over all experts (OLMoE), top-k, k_m = the shortest ranked prefix whose mass
    reaches tau of the top-k mass, clamped to [lo, hi]. Returns the histogram over 0..E."""
    x = torch.cat([t.reshape(-1, t.shape[-1]) for t in router_inputs]).double()
    p = torch.softmax(x @ weight.double().t(), dim=-1)
    top = p.topk(K, dim=-1).values
    hist = [0] * (E + 1)
    for row in top.tolist():
        total, cum, m = sum(row), 0.0, K
        for i, v in enumerate(row):
            cum += v
            if cum >= tau * total:
                m = i + 1
                break
        hist[min(max(m, lo), hi)] += 1
    return hist


def test_intermediate_tau_equals_plain_torch_prefix_rule(ckpt):
    """In-process on the same checkpoint and data as the tool: capture every router's input during the
    measured forward, recompute k_m per token independently, compare; then the tool's own output."""
    from megatron_ce.data import build_sft_dataset_from_args
    from megatron_ce.models.olmoe import build_olmoe_model
    from megatron_ce.paper.params import expected_cost, unpadded_batches
    from megatron_ce.runtime import destroy_parallel, init_parallel
    from megatron_ce.training import checkpoint as ckpt_mod
    from megatron_ce.training.args import parse_args
    from megatron_ce.training.metrics import moe_layers

    tau, lo, hi = 0.6, 1, 3
    init_parallel()
    try:
        args = parse_args([*DATA_FLAGS, "--train-iters", "1", "--load", str(ckpt / "ckpt")], world_size=1)
        ds, _, _, _ = build_sft_dataset_from_args(args)
        gpt = build_olmoe_model(CONFIG, moe_ce_split="mass", moe_ce_main_mass=tau, moe_ce_min_main=lo,
                                moe_ce_max_main=hi)
        ckpt_mod.load_model_weights(gpt, ckpt_mod.find_checkpoint(str(ckpt / "ckpt")))
        layers = moe_layers(gpt)
        seen = {n: [] for n in layers}
        hooks = [layer.router.register_forward_pre_hook(lambda m, inp, n=n: seen[n].append(inp[0].detach()))
                 for n, layer in layers.items()]
        res = expected_cost(gpt, unpadded_batches(ds, SAMPLES, 8))
        for h in hooks:
            h.remove()
        ref = {n: _reference_main_counts(seen[n], layers[n].router.weight.detach(), tau, lo, hi) for n in layers}
    finally:
        destroy_parallel()

    assert res["layer"] == sorted(ref)
    for n, hist in zip(res["layer"], res["main_per_token_hist"]):
        assert hist == ref[n], (n, hist, ref[n])
        assert sum(c > 0 for c in hist) >= 2  # not degenerate: several k_m values occur
    means = [sum(m * c for m, c in enumerate(ref[n])) / sum(ref[n]) for n in sorted(ref)]
    assert res["main_per_token"] == pytest.approx(means, rel=1e-12)
    # E[active] by hand from the reference means
    by_hand = res["dense_params"] + sum(m * res["expert_each"] + (K - m) * res["ce_each"] for m in means)
    assert res["expected_active"] == pytest.approx(by_hand, rel=1e-12)
    assert res["active_fixed_min"] < res["expected_active"] < res["active_topk"]

    cli = _mass(ckpt, "--moe-ce-main-mass", str(tau), "--moe-ce-min-main", str(lo), "--moe-ce-max-main", str(hi))
    assert cli["main_per_token_hist"] == res["main_per_token_hist"]
    assert cli["expected_active"] == pytest.approx(res["expected_active"], rel=1e-12)
    assert cli["max_main"] == hi and cli["tau"] == tau


def test_hf_model_dir(tmp_path, fixed):
    """--hf-model converts an HF folder on the fly; tau = 1 gives its plain top-k count."""
    from tests.models.families import make_hf_model, tiny_olmoe_config

    hf = {k: v for k, v in CONFIG.items() if k != "model_type"}
    make_hf_model(tiny_olmoe_config(**hf)).save_pretrained(tmp_path / "hf")
    r = _tool("--moe-ce-split", "mass", "--moe-ce-main-mass", "1", "--hf-model", str(tmp_path / "hf"),
              "--num-samples", "4", *DATA_FLAGS)
    assert r["expected_active"] == fixed["active_base"]


def test_mass_without_checkpoint_is_an_error():
    out = subprocess.run([sys.executable, os.path.join(REPO, "tools", "count_params.py"), "--model", "olmoe",
                          "--moe-ce-split", "mass"], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 2 and "--load or --hf-model" in out.stderr
