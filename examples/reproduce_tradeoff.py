"""Scaled-down reproduction of the paper's accuracy/latency trade-off (Fig. 4) on a CPU.

1. Pretrain a small OLMoE-style MoE (megatron-core GPTModel via `megatron_ce.models.olmoe`; softmax
   router, no top-k renormalisation, SwiGLU experts, RMSNorm) with top-k = 4 of 16 experts on a synthetic
   character-level corpus: a mixture of algorithmic tasks (addition of 1/3/4-digit numbers, subtraction,
   reversal, copy), with the load-balancing loss on. Additions of the SFT width never occur in it.
2. From that same checkpoint, SFT each variant on one task (2-digit addition by default, answer written least
   significant digit first), loss on the answer tokens, no load-balancing loss (docs/METHOD.md §1.11):
     top-4          : the pretrained routing
     top-2          : router top-k cut to 2
     top-2+CE       : top-k 4 with k_a = 2 compressed experts (ia3 variant; theta initialised to ones)
     mass tau=T     : top-k 4, adaptive split (--moe-ce-split mass): per token the shortest ranked prefix
                      holding a share >= T of the top-4 router mass runs (1..4 experts), the rest of the
                      top-4 are compressed experts; one variant per T of --taus
   Each seed redraws the SFT data order and the held-out set; the pretrained start is the same.
3. Metric: exact-match accuracy of greedy answers on held-out problems not seen in SFT. For the mass
   variants also the mean number of main experts per token (all layers), measured with the trainer's
   routing statistics on the held-out problems (prompt + answer, teacher-forced) after SFT.
4. Latency: greedy decoding (no KV cache, full recompute each step; same code for all variants) of
   batch 8 prompts, a fixed number of new tokens, warm-up + timed iterations, variants interleaved in
   rotating order so a load change on a shared machine hits all of them alike.

Writes DIR/results.md, DIR/results.json and DIR/tradeoff.png. `--smoke` is a tiny end-to-end run.

    python examples/reproduce_tradeoff.py --out runs/reproduce            # full mode
    python examples/reproduce_tradeoff.py --smoke --out /tmp/repro_smoke  # seconds
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from typing import Dict, List, Tuple

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

# ---------------------------------------------------------------------------------------- tokenizer
CHARS = "0123456789+-=rc:;"  # ';' ends an answer
PAD = 0
STOI = {c: i + 1 for i, c in enumerate(CHARS)}
ITOS = {i: c for c, i in STOI.items()}
EOS = STOI[";"]
VOCAB = 32  # padded


def encode(s: str) -> List[int]:
    return [STOI[c] for c in s]


def decode(ids) -> str:
    return "".join(ITOS.get(int(i), "?") for i in ids)


# ------------------------------------------------------------------------------------------- tasks
def add_example(rng: random.Random, digits: int = 3) -> Tuple[str, str]:
    a, b = rng.randrange(10 ** digits), rng.randrange(10 ** digits)
    prompt = f"{a:0{digits}d}+{b:0{digits}d}="
    return prompt, f"{a + b:0{digits + 1}d}"[::-1] + ";"


def pretrain_line(rng: random.Random, sft_digits: int) -> str:
    """One line of the pretraining mixture. Additions never use the SFT task's operand width, so no
    held-out SFT problem (nor the SFT format itself) is seen in pretraining: SFT is a transfer task."""
    t = rng.random()
    d = rng.randint(1, 3)
    if t < 0.4:
        p, a = add_example(rng, rng.choice([w for w in (1, 2, 3, 4) if w != sft_digits]))
        return p + a
    if t < 0.6:
        a, b = sorted((rng.randrange(10 ** d), rng.randrange(10 ** d)), reverse=True)
        return f"{a:0{d}d}-{b:0{d}d}=" + f"{a - b:0{d}d}"[::-1] + ";"
    s = "".join(rng.choice("0123456789") for _ in range(rng.randint(2, 7)))
    if t < 0.8:
        return f"r:{s}=" + s[::-1] + ";"
    return f"c:{s}=" + s + ";"


def pretrain_batch(rng: random.Random, batch: int, seq: int, sft_digits: int) -> torch.Tensor:
    """[batch, seq+1] packed blocks of pretraining lines (attention crosses lines, like packing)."""
    rows = []
    for _ in range(batch):
        ids: List[int] = []
        while len(ids) < seq + 1:
            ids += encode(pretrain_line(rng, sft_digits))
        rows.append(ids[: seq + 1])
    return torch.tensor(rows)


def sft_batch(problems: List[Tuple[str, str]]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(tokens [b, L], loss mask on the targets [b, L-1]: answer tokens only). Fixed-width problems."""
    toks = torch.tensor([encode(p + a) for p, a in problems])
    plen = len(problems[0][0])
    mask = torch.zeros(toks.shape[0], toks.shape[1] - 1)
    mask[:, plen - 1:] = 1.0
    return toks, mask


def split_problems(seed: int, n_eval: int, digits: int = 3):
    """Held-out set (by operand pair) and a training sampler that never draws a held-out pair."""
    rng = random.Random(10_000 + seed)
    held = set()
    while len(held) < n_eval:
        held.add((rng.randrange(10 ** digits), rng.randrange(10 ** digits)))
    eval_set = [(f"{a:0{digits}d}+{b:0{digits}d}=", f"{a + b:0{digits + 1}d}"[::-1] + ";")
                for a, b in sorted(held)]

    def sample(r: random.Random):
        while True:
            p, ans = add_example(r, digits)
            if (int(p[:digits]), int(p[digits + 1: 2 * digits + 1])) not in held:
                return p, ans

    return eval_set, sample


# ------------------------------------------------------------------------------------------- model
def hf_config(a, top_k: int) -> Dict:
    return dict(model_type="olmoe", vocab_size=VOCAB, hidden_size=a.hidden, intermediate_size=a.ffn,
                num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.heads,
                num_experts=a.experts, num_experts_per_tok=top_k, norm_topk_prob=False,
                max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0,
                tie_word_embeddings=False, output_router_logits=False, router_aux_loss_coef=0.01,
                pad_token_id=PAD, eos_token_id=EOS, bos_token_id=None)


FIXED = {  # name: (router top-k, k_a)
    "top-4": (4, 0),
    "top-2": (2, 0),
    "top-2+CE": (4, 2),
}


def variants(taus: List[float]) -> Dict[str, Tuple[int, int, float]]:
    """name: (router top-k, k_a, tau or None). Mass variants: top-4 with 1..4 main experts per token
    (k_a = 3 compressed slots, the most a token can have)."""
    out = {n: (k, k_a, None) for n, (k, k_a) in FIXED.items()}
    out.update({mass_name(t): (4, 3, t) for t in taus})
    return out


def mass_name(tau: float) -> str:
    return f"mass tau={tau:g}"


def build(a, top_k: int, k_a: int, aux: float, tau: float = None):
    from megatron_ce.models.olmoe import build_olmoe_model

    kw = dict(moe_router_load_balancing_type="aux_loss" if aux > 0 else "none", moe_aux_loss_coeff=aux)
    if tau is not None:
        kw.update(moe_ce_split="mass", moe_ce_main_mass=tau, moe_ce_min_main=top_k - k_a)
    return build_olmoe_model(hf_config(a, top_k), moe_ce_num_compressed=k_a, moe_ce_variant="ia3",
                             **kw)


def main_experts_per_token(model, problems: List[Tuple[str, str]], batch: int = 256) -> List[float]:
    """Mean main experts per token per layer on the problems (prompt + answer, one forward each)."""
    from megatron_ce.paper.params import measure_main_per_token

    toks = torch.tensor([encode(p + ans) for p, ans in problems])
    pos = torch.arange(toks.shape[1]).unsqueeze(0)
    batches = [dict(tokens=t, position_ids=pos.expand_as(t), attention_mask=None) for t in toks.split(batch)]
    return measure_main_per_token(model, batches)["main_per_token"]


def lm_loss(model, toks: torch.Tensor, mask: torch.Tensor = None) -> torch.Tensor:
    ids, labels = toks[:, :-1], toks[:, 1:]
    pos = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
    loss = model(ids, pos, None, labels=labels).float()
    if mask is None:
        return loss.mean()
    return (loss * mask).sum() / mask.sum()


def lr_at(step: int, total: int, lr: float, warmup: int) -> float:
    import math

    if step < warmup:
        return lr * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def train(model, steps: int, lr: float, batch_fn, log: str, log_every: int):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.95))
    model.train()
    warmup = max(1, steps // 20)
    t0 = time.perf_counter()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, warmup)
        loss = lm_loss(model, *batch_fn(step))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % log_every == 0 or step == steps - 1:
            print(f"  [{log}] step {step + 1}/{steps} loss {loss.item():.4f} "
                  f"({time.perf_counter() - t0:.0f}s)", flush=True)
    model.eval()


@torch.no_grad()
def greedy(model, prompts: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy decoding by full recompute (no KV cache); returns the new tokens [b, new_tokens]."""
    ids = prompts
    for _ in range(new_tokens):
        pos = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
        logits = model(ids, pos, None)
        nxt = logits[:, -1, :].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    return ids[:, prompts.shape[1]:]


@torch.no_grad()
def exact_match(model, problems: List[Tuple[str, str]], batch: int = 256) -> float:
    model.eval()
    n_ok = 0
    ans_len = len(problems[0][1])
    for i in range(0, len(problems), batch):
        chunk = problems[i: i + batch]
        prompts = torch.tensor([encode(p) for p, _ in chunk])
        out = greedy(model, prompts, ans_len)
        n_ok += sum(decode(o) == a for o, (_, a) in zip(out.tolist(), chunk))
    return n_ok / len(problems)


@torch.no_grad()
def latency(models: Dict[str, torch.nn.Module], a, seed: int) -> Dict[str, List[float]]:
    """Seconds per greedy generation of batch a.lat_batch, a.lat_prompt random prompt tokens,
    a.lat_new new tokens; variants interleaved in rotating order."""
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(1, len(CHARS) + 1, (a.lat_batch, a.lat_prompt), generator=g)
    names = list(models)
    times: Dict[str, List[float]] = {n: [] for n in names}
    for it in range(a.lat_warmup + a.lat_iters):
        order = names[it % len(names):] + names[: it % len(names)]
        for n in order:
            t = time.perf_counter()
            greedy(models[n], prompts, a.lat_new)
            dt = time.perf_counter() - t
            if it >= a.lat_warmup:
                times[n].append(dt)
    return times


# -------------------------------------------------------------------------------------------- main
def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/reproduce_tradeoff")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, 1 seed, seconds")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (1: tiny matmuls; more threads thrash on a shared CPU)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=128, help="expert intermediate size")
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--pretrain-steps", type=int, default=1000)
    p.add_argument("--pretrain-batch", type=int, default=32)
    p.add_argument("--pretrain-seq", type=int, default=64)
    p.add_argument("--pretrain-lr", type=float, default=3e-3)
    p.add_argument("--sft-steps", type=int, default=200)
    p.add_argument("--sft-batch", type=int, default=64)
    p.add_argument("--sft-lr", type=float, default=1e-3)
    p.add_argument("--n-eval", type=int, default=500)
    p.add_argument("--digits", type=int, default=2, help="operand digits of the SFT addition task")
    p.add_argument("--lat-batch", type=int, default=8)
    p.add_argument("--lat-prompt", type=int, default=32)
    p.add_argument("--lat-new", type=int, default=16)
    p.add_argument("--lat-warmup", type=int, default=3)
    p.add_argument("--lat-iters", type=int, default=10)
    p.add_argument("--taus", type=float, nargs="*", default=[0.3, 0.5, 0.7, 0.8, 0.9],
                   help="tau of the adaptive-split (mass) variants; none: only the fixed variants")
    a = p.parse_args(argv)
    if a.smoke:
        a.seeds, a.layers, a.hidden, a.heads, a.ffn, a.experts = 1, 1, 32, 2, 32, 8
        a.pretrain_steps, a.pretrain_batch, a.pretrain_seq = 4, 4, 32
        a.sft_steps, a.sft_batch, a.n_eval, a.digits = 3, 8, 16, 2
        a.lat_new, a.lat_warmup, a.lat_iters = 2, 1, 2
        a.taus = [0.5, 0.9]
    return a


def mean_spread(xs: List[float]) -> Tuple[float, float]:
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def write_outputs(res: Dict, out: str):
    agg = res["aggregate"]
    names = list(agg)
    lines = [
        "| variant | router top-k | k_a | experts run / token | active params / token | "
        "held-out exact match (mean ± std) | acc before SFT | latency s (mean ± std) | latency vs top-4 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for n in names:
        g = agg[n]
        k, k_a, tau = g["topk"], g["k_a"], g["tau"]
        run = f"{g['main_mean']:.2f} (measured)" if tau is not None else f"{k - k_a}"
        k_a_s = f"{k} − run (≤ {k_a})" if tau is not None else f"{k_a}"
        lines.append(
            f"| {n} | {k} | {k_a_s} | {run} | {g['active_params']:,.0f} | "
            f"{100 * g['acc_mean']:.1f} ± {100 * g['acc_std']:.1f} % | "
            f"{100 * g['acc0_mean']:.1f} % | {g['lat_mean']:.4f} ± {g['lat_std']:.4f} | "
            f"{g['lat_mean'] / agg['top-4']['lat_mean']:.3f} |")
    rec = res["recovery"]
    rec_line = ("recovery of the top-2→top-4 gap by CE, (acc_CE − acc_top2)/(acc_top4 − acc_top2): "
                + (f"{100 * rec['of_means']:.0f}% (of seed means)" if rec["of_means"] is not None
                   else "undefined (no gap)")
                + "; per seed: " + ", ".join("n/a" if r is None else f"{100 * r:.0f}%" for r in rec["per_seed"])
                + " (paper: 53–64%)")
    per_seed = ["| seed | " + " | ".join(names) + " | CE max abs(theta - 1) |", "|---" * (len(names) + 2) + "|"]
    for s, row in zip(res["seeds"], res["per_seed"]):
        per_seed.append(f"| {s} | " + " | ".join(f"{100 * row[n]['acc']:.1f}%" for n in names)
                        + f" | {row.get('theta_drift', float('nan')):.3f} |")
    mass = [n for n in names if agg[n]["tau"] is not None]
    mass_md = []
    if mass:
        mass_md = ["Adaptive split: measured main experts per token (mean over layers; per layer, seed "
                   "means) on the held-out problems after SFT:", "",
                   "| variant | tau | main / token | per layer | compressed / token |", "|---|---|---|---|---|"]
        for n in mass:
            g = agg[n]
            mass_md.append(f"| {n} | {g['tau']:g} | {g['main_mean']:.3f} ± {g['main_std']:.3f} | "
                           + ", ".join(f"{m:.2f}" for m in g["main_per_layer"])
                           + f" | {g['topk'] - g['main_mean']:.3f} |")
        mass_md.append("")
    md = ["# Scaled-down CE trade-off reproduction", "", *lines, "", rec_line, "", *mass_md,
          "Per-seed held-out accuracy:", "", *per_seed, "",
          f"settings: {json.dumps(res['settings'])}", f"wall time: {res['wall_s']:.0f} s", ""]
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(md))
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(res, f, indent=1)

    import matplotlib  # plotting only; not a dependency of the package

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    colors = {"top-4": "tab:blue", "top-2": "tab:orange", "top-2+CE": "tab:green"}
    for n in [n for n in names if n not in mass]:
        g = agg[n]
        ax.errorbar(g["lat_mean"], 100 * g["acc_mean"], xerr=g["lat_std"], yerr=100 * g["acc_std"],
                    fmt="o", color=colors.get(n, "k"), capsize=3, label=n)
        for row in res["per_seed"]:
            ax.plot(row[n]["lat"], 100 * row[n]["acc"], ".", color=colors.get(n, "k"), alpha=0.35)
    if mass:  # one curve through the tau points, in tau order
        pts = sorted(mass, key=lambda n: agg[n]["tau"])
        ax.errorbar([agg[n]["lat_mean"] for n in pts], [100 * agg[n]["acc_mean"] for n in pts],
                    xerr=[agg[n]["lat_std"] for n in pts], yerr=[100 * agg[n]["acc_std"] for n in pts],
                    fmt="s-", color="tab:purple", capsize=3, label="mass split (tau)")
        for n in pts:
            g = agg[n]
            ax.annotate(f"τ={g['tau']:g}\n{g['main_mean']:.2f} run", (g["lat_mean"], 100 * g["acc_mean"]),
                        textcoords="offset points", xytext=(6, -14), fontsize=7, color="tab:purple")
    ax.set_xlabel(f"greedy decode latency, batch {res['settings']['lat_batch']} (s)")
    ax.set_ylabel("held-out exact match (%)")
    ax.set_title("Accuracy vs latency (scaled-down, CPU)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "tradeoff.png"), dpi=120)
    plt.close(fig)


def main(argv=None):
    a = parse(argv)
    os.makedirs(a.out, exist_ok=True)
    torch.set_num_threads(a.threads)
    t_start = time.perf_counter()
    from megatron_ce.runtime import init_parallel

    init_parallel(seed=1234)
    log_every = max(1, a.pretrain_steps // 10)

    # 1. pretrain (top-4, load-balancing loss on), once; every variant and seed starts from it.
    torch.manual_seed(0)
    base = build(a, 4, 0, aux=0.01)
    prng = random.Random(0)
    print(f"pretrain: {sum(p.numel() for p in base.parameters())} params", flush=True)
    train(base, a.pretrain_steps, a.pretrain_lr,
          lambda s: (pretrain_batch(prng, a.pretrain_batch, a.pretrain_seq, a.digits),), "pretrain", log_every)
    state = {k: v.clone() for k, v in base.state_dict().items() if not k.endswith("_extra_state")}
    del base

    from megatron_ce.paper.params import expected_active_params, model_counts

    VARIANTS = variants(a.taus)
    seeds = list(range(a.seeds))
    per_seed = []
    counts = {}  # variant: parameter counts of its model (dense, per expert, per compressed expert)
    for seed in seeds:
        eval_set, sample = split_problems(seed, a.n_eval, a.digits)
        models = {}
        row = {}
        for n, (k, k_a, tau) in VARIANTS.items():
            torch.manual_seed(seed)
            m = build(a, k, k_a, aux=0.0, tau=tau)
            counts[n] = model_counts(m)
            missing, unexpected = m.load_state_dict(state, strict=False)
            missing = [x for x in missing if not x.endswith("_extra_state")]
            assert not unexpected and all(".mlp.ce." in x for x in missing), (missing, unexpected)
            acc0 = exact_match(m, eval_set)
            drng = random.Random(seed)  # same SFT data order for all variants of a seed
            train(m, a.sft_steps, a.sft_lr, lambda s: sft_batch([sample(drng) for _ in range(a.sft_batch)]),
                  f"seed {seed} {n}", max(1, a.sft_steps // 5))
            acc = exact_match(m, eval_set)
            print(f"seed {seed} {n}: held-out exact match {acc:.3f} (before SFT {acc0:.3f})", flush=True)
            row[n] = dict(acc=acc, acc0=acc0)
            ce = [p for name_, p in m.named_parameters() if ".mlp.ce." in name_]
            if ce:  # how far SFT moved the compressed experts from their initial ones
                row[n]["theta_drift"] = max(float((p.detach() - 1).abs().max()) for p in ce)
                print(f"seed {seed} {n}: max |theta - 1| after SFT {row[n]['theta_drift']:.4f}", flush=True)
                if n == "top-2+CE":  # the per-seed table's column
                    row["theta_drift"] = row[n]["theta_drift"]
            if tau is not None:
                row[n]["main_per_layer"] = main_experts_per_token(m, eval_set)
                print(f"seed {seed} {n}: main experts per token {row[n]['main_per_layer']}", flush=True)
            models[n] = m
        lat = latency(models, a, seed)
        for n in VARIANTS:
            row[n]["lat"] = statistics.mean(lat[n])
            row[n]["lat_times"] = lat[n]
            print(f"seed {seed} {n}: latency {row[n]['lat']:.4f} s", flush=True)
        per_seed.append(row)
        del models

    agg = {}
    for n, (k, k_a, tau) in VARIANTS.items():
        am, asd = mean_spread([r[n]["acc"] for r in per_seed])
        a0, _ = mean_spread([r[n]["acc0"] for r in per_seed])
        lm, lsd = mean_spread([r[n]["lat"] for r in per_seed])
        agg[n] = dict(topk=k, k_a=k_a, tau=tau, acc_mean=am, acc_std=asd, acc0_mean=a0, lat_mean=lm,
                      lat_std=lsd)
        if tau is not None:
            mm, msd = mean_spread([statistics.mean(r[n]["main_per_layer"]) for r in per_seed])
            layers = [statistics.mean(ls) for ls in zip(*(r[n]["main_per_layer"] for r in per_seed))]
            agg[n].update(main_mean=mm, main_std=msd, main_per_layer=layers)
        # active parameters per token: exact for the fixed splits, the expectation over the measured
        # main experts per token for the mass split (tools/count_params.py's formula)
        run = agg[n]["main_per_layer"] if tau is not None else [k - k_a] * counts[n]["moe_layers"]
        agg[n]["active_params"] = expected_active_params(counts[n], run, k)

    def recovery(ce, t2, t4):
        return None if abs(t4 - t2) < 1e-12 else (ce - t2) / (t4 - t2)

    rec = dict(
        of_means=recovery(agg["top-2+CE"]["acc_mean"], agg["top-2"]["acc_mean"], agg["top-4"]["acc_mean"]),
        per_seed=[recovery(r["top-2+CE"]["acc"], r["top-2"]["acc"], r["top-4"]["acc"]) for r in per_seed],
    )
    settings = {k: v for k, v in vars(a).items() if k != "out"}
    settings["threads"] = torch.get_num_threads()
    res = dict(settings=settings, seeds=seeds, per_seed=per_seed, aggregate=agg, recovery=rec,
               wall_s=time.perf_counter() - t_start)
    write_outputs(res, a.out)
    print(open(os.path.join(a.out, "results.md")).read())
    print(f"wrote {a.out}/results.md, results.json, tradeoff.png")


if __name__ == "__main__":
    main()
