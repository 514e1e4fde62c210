"""SFT step throughput: our megatron-core CE model vs the HF transformers OLMoE model with our HF CE
block (`megatron_ce.hf.modeling_olmoe_ce`), same config, same data, same process, CPU.

A step is forward + backward + AdamW (torch.optim.AdamW, the same for both; fp32; grad clipping off).
The two models' steps are interleaved; the ratio is of mean step times.
Data: the bundled Alpaca-style SFT set (examples/data/sft_tiny.jsonl) tokenised with the bundled
tokenizer, concatenated and cut into [batch, seq] blocks (the reference's packing); loss on every token.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from typing import Any, Dict, List

import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ALPACA = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
          "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n{output}")


def sft_batches(batch: int, seq: int, n: int, vocab: int) -> List[torch.Tensor]:
    """n token blocks [batch, seq + 1] from the bundled SFT data (cycled when short)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(os.path.join(REPO, "examples", "data", "tokenizer"))
    ids: List[int] = []
    with open(os.path.join(REPO, "examples", "data", "sft_tiny.jsonl"), encoding="utf-8") as f:
        for line in f:
            ex = json.loads(line)
            ids += tok(ALPACA.format(**ex))["input_ids"] + ([tok.eos_token_id] if tok.eos_token_id is not None else [])
    need = n * batch * (seq + 1)
    ids = (ids * (need // len(ids) + 1))[:need]
    t = torch.tensor(ids, dtype=torch.long).clamp_max(vocab - 1)
    return list(t.view(n, batch, seq + 1))


def bench_config(args) -> Dict[str, Any]:
    return dict(
        model_type="olmoe", vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        num_experts=args.experts, num_experts_per_tok=args.topk, norm_topk_prob=False,
        max_position_embeddings=max(4096, args.seq), rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=False, output_router_logits=False, pad_token_id=0, eos_token_id=None,
        bos_token_id=None,
    )


def _mcore_model(cfg, k_a, variant):
    from megatron_ce.models.olmoe import build_olmoe_model

    return build_olmoe_model(cfg, moe_ce_num_compressed=k_a, moe_ce_variant=variant).train()


def _hf_model(cfg, k_a, variant):
    from megatron_ce.hf.configuration_olmoe_ce import OlmoeCEConfig
    from megatron_ce.hf.modeling_olmoe_ce import OlmoeCEForCausalLM

    hf_cfg = OlmoeCEConfig(**{k: v for k, v in cfg.items() if k != "model_type"},
                           moe_ce_num_compressed=k_a, moe_ce_variant=variant)
    return OlmoeCEForCausalLM(hf_cfg).train()


def _mcore_loss(model, block):
    ids, labels = block[:, :-1], block[:, 1:]
    pos = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
    return model(ids, pos, None, labels=labels).float().mean()


def _hf_loss(model, block):
    ids, labels = block[:, :-1], block[:, 1:]
    logits = model(input_ids=ids).logits
    return torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1))


def _step(model, opt, loss_fn, block):
    t = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(model, block)
    loss.backward()
    opt.step()
    return time.perf_counter() - t, float(loss)


def profile_step(model, loss_fn, block, top=12) -> str:
    from torch.profiler import ProfilerActivity, profile

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        opt.zero_grad(set_to_none=True)
        loss_fn(model, block).backward()
        opt.step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)


def run(args) -> Dict[str, Any]:
    cfg = bench_config(args)
    n = args.warmup + args.steps
    batches = sft_batches(args.batch, args.seq, n, args.vocab)
    tokens = args.batch * args.seq
    res: Dict[str, Any] = dict(config=cfg, k_a=args.k_a, variant=args.variant, batch=args.batch, seq=args.seq,
                               warmup=args.warmup, steps=args.steps, threads=torch.get_num_threads())
    # Both models live side by side and their steps are interleaved (order alternating every step), so
    # a load change on a shared machine hits both alike.
    builders = {"mcore": (_mcore_model, _mcore_loss), "hf": (_hf_model, _hf_loss)}
    state = {}
    for name, (build, loss_fn) in builders.items():
        torch.manual_seed(args.seed)
        model = build(cfg, args.k_a, args.variant)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
        state[name] = dict(model=model, opt=opt, loss_fn=loss_fn, times=[], losses=[])
    for i, block in enumerate(batches):
        for name in (["mcore", "hf"] if i % 2 == 0 else ["hf", "mcore"]):
            st = state[name]
            dt, loss = _step(st["model"], st["opt"], st["loss_fn"], block)
            st["losses"].append(loss)
            if i >= args.warmup:
                st["times"].append(dt)
    for name, st in state.items():
        times, losses = st["times"], st["losses"]
        mean = statistics.mean(times)
        res[name] = dict(params=sum(p.numel() for p in st["model"].parameters()), step_s_mean=mean,
                         step_s_std=statistics.stdev(times) if len(times) > 1 else 0.0,
                         step_s_median=statistics.median(times), tokens_per_s=tokens / mean,
                         first_loss=losses[0], last_loss=losses[-1])
        if args.profile:
            res[name]["profile"] = profile_step(st["model"], st["loss_fn"], batches[0])
    res["ratio_mcore_over_hf"] = res["mcore"]["tokens_per_s"] / res["hf"]["tokens_per_s"]
    res["ratio_mcore_over_hf_median"] = res["hf"]["step_s_median"] / res["mcore"]["step_s_median"]
    res["target_ratio"] = 1.5
    res["meets_target"] = res["ratio_mcore_over_hf"] >= 1.5
    return res


def format_result(res: Dict[str, Any]) -> str:
    c = res["config"]
    lines = [
        f"config: {c['num_hidden_layers']} layers, d {c['hidden_size']}, ffn {c['intermediate_size']}, "
        f"{c['num_experts']} experts top-{c['num_experts_per_tok']} ({c['num_experts_per_tok'] - res['k_a']} main + "
        f"{res['k_a']} CE {res['variant']}), vocab {c['vocab_size']}; batch {res['batch']} x seq {res['seq']}; "
        f"{res['warmup']} warm-up + {res['steps']} timed steps; fp32 AdamW; {res['threads']} threads",
        f"{'model':8s} {'params':>12s} {'step s':>9s} {'std':>7s} {'median':>7s} {'tokens/s':>10s} {'loss first->last':>18s}",
    ]
    for name in ("mcore", "hf"):
        r = res[name]
        lines.append(f"{name:8s} {r['params']:12,d} {r['step_s_mean']:9.4f} {r['step_s_std']:7.4f} {r['step_s_median']:7.4f} "
                     f"{r['tokens_per_s']:10.1f} {r['first_loss']:8.3f} -> {r['last_loss']:.3f}")
    lines.append(f"ratio mcore/hf tokens/s: {res['ratio_mcore_over_hf']:.3f} from means, "
                 f"{res['ratio_mcore_over_hf_median']:.3f} from medians (target >= 1.5: "
                 f"{'met' if res['meets_target'] else 'NOT met'})")
    for name in ("mcore", "hf"):
        if "profile" in res[name]:
            lines += [f"--- profile of one {name} step (self CPU time) ---", res[name]["profile"]]
    return "\n".join(lines)
