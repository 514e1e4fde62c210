"""Model building, training, evaluation and latency of the scaled-down reproduction.

One process, one rank: megatron-core GPTModel through `megatron_ce.models.olmoe.build_olmoe_model`
(CPU shims, fp32). Training is plain torch AdamW, the CE theta tables (tagged `is_ce_table`) in a param
group of their own with lr x `ce_lr_mult` and no weight decay (the trainer's rule, docs/METHOD.md §1.10).
"""

from __future__ import annotations

import math
import time
from typing import Dict, List, Optional

import torch

from .tasks import CHARS, EOS, PAD, VOCAB, Problem, encode, decode


def hf_config(a, top_k: int) -> Dict:
    return dict(model_type="olmoe", vocab_size=VOCAB, hidden_size=a.hidden, intermediate_size=a.ffn,
                num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.heads,
                num_experts=a.experts, num_experts_per_tok=top_k, norm_topk_prob=False,
                max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0,
                tie_word_embeddings=False, output_router_logits=False, router_aux_loss_coef=0.01,
                pad_token_id=PAD, eos_token_id=EOS, bos_token_id=None)


def build(a, top_k: int, k_a: int, aux: float, variant: str = "ia3", tau: Optional[float] = None):
    from megatron_ce.models.olmoe import build_olmoe_model

    kw = dict(moe_router_load_balancing_type="aux_loss" if aux > 0 else "none", moe_aux_loss_coeff=aux)
    if tau is not None:
        kw.update(moe_ce_split="mass", moe_ce_main_mass=tau, moe_ce_min_main=top_k - k_a)
    return build_olmoe_model(hf_config(a, top_k), moe_ce_num_compressed=k_a, moe_ce_variant=variant, **kw)


def load_pretrained(model, state: Dict[str, torch.Tensor]) -> None:
    """Pretrained weights into a variant; only the CE tables (left at their init, ones) may be missing."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [x for x in missing if not x.endswith("_extra_state")]
    assert not unexpected and all(".mlp.ce." in x for x in missing), (missing, unexpected)


def ce_tables(model) -> List[torch.nn.Parameter]:
    from megatron_ce.training.optimizer import is_ce_table

    return [p for p in model.parameters() if is_ce_table(p)]


def tie_theta_rows(model) -> None:
    """Control for the theta learning-rate rows: every expert's theta row gets the summed gradient of
    all rows, so the rows start equal (ones) and stay equal under Adam (no weight decay on theta). Then
    theta = sum_j a'_j theta_j is one per-layer vector whatever the auxiliary experts are: the same
    trainable per-channel scales on the main experts, with the auxiliary experts' identity removed."""
    for p in ce_tables(model):
        p.register_hook(lambda g: g.sum(0, keepdim=True).expand_as(g).clone())


def theta_drift(model) -> Optional[float]:
    """max |theta - 1| over the CE tables (None without CE)."""
    tabs = ce_tables(model)
    return max(float((p.detach() - 1).abs().max()) for p in tabs) if tabs else None


def lm_loss(model, toks: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    ids, labels = toks[:, :-1], toks[:, 1:]
    pos = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
    loss = model(ids, pos, None, labels=labels).float()
    if mask is None:
        return loss.mean()
    return (loss * mask).sum() / mask.sum()


def lr_at(step: int, total: int, lr: float, warmup: int) -> float:
    """Linear warm-up, cosine to 0.1 x lr at `total`; steps past `total` (the pretraining gate's
    extension) stay at the floor."""
    if step < warmup:
        return lr * (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def make_optimizer(model, lr: float, ce_lr_mult: float) -> torch.optim.AdamW:
    ce_ids = {id(p) for p in ce_tables(model)}
    rest = [p for p in model.parameters() if id(p) not in ce_ids]
    groups = [dict(params=rest, lr_mult=1.0)]
    if ce_ids:  # theta's neutral value is 1: never decayed (decay is 0 everywhere here anyway)
        groups.append(dict(params=ce_tables(model), lr_mult=ce_lr_mult, weight_decay=0.0))
    return torch.optim.AdamW(groups, lr=lr, weight_decay=0.0, betas=(0.9, 0.95))


def run_steps(model, opt, steps: range, total: int, lr: float, batch_fn, log: str, log_every: int,
              losses: Optional[List[float]] = None) -> None:
    """Optimizer steps `steps` of a schedule over `total` steps (one optimizer across calls, so a run cut
    into pieces equals an uncut one)."""
    model.train()
    warmup = max(1, total // 20)
    t0 = time.perf_counter()
    for step in steps:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total, lr, warmup) * g["lr_mult"]
        loss = lm_loss(model, *batch_fn(step))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if losses is not None:
            losses.append(loss.item())
        if step % log_every == 0 or step == steps[-1]:
            print(f"  [{log}] step {step + 1}/{total} loss {loss.item():.4f} "
                  f"({time.perf_counter() - t0:.0f}s)", flush=True)
    model.eval()


def train(model, steps: int, lr: float, batch_fn, log: str, log_every: int, ce_lr_mult: float = 1.0,
          losses: Optional[List[float]] = None):
    run_steps(model, make_optimizer(model, lr, ce_lr_mult), range(steps), steps, lr, batch_fn, log, log_every,
              losses)


@torch.no_grad()
def greedy(model, prompts: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy decoding by full recompute (no KV cache); returns the new tokens [b, new_tokens]."""
    ids = prompts
    for _ in range(new_tokens):
        pos = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
        logits = model(ids, pos, None)
        ids = torch.cat([ids, logits[:, -1, :].argmax(-1, keepdim=True)], dim=1)
    return ids[:, prompts.shape[1]:]


@torch.no_grad()
def evaluate(model, problems: List[Problem], batch: int = 256) -> Dict[str, List[float]]:
    """Per problem: `correct` (greedy answer exact match, 0/1) and `nll` (teacher-forced mean
    negative log-likelihood of the answer tokens, nats)."""
    from .tasks import sft_batch

    model.eval()
    correct: List[float] = []
    nll: List[float] = []
    ans_len = len(problems[0][1])
    for i in range(0, len(problems), batch):
        chunk = problems[i: i + batch]
        out = greedy(model, torch.tensor([encode(p) for p, _ in chunk]), ans_len)
        correct += [float(decode(o) == a) for o, (_, a) in zip(out.tolist(), chunk)]
        toks, mask = sft_batch(chunk)
        ids, labels = toks[:, :-1], toks[:, 1:]
        pos = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
        loss = model(ids, pos, None, labels=labels).float()
        nll += ((loss * mask).sum(1) / mask.sum(1)).tolist()
    return dict(correct=correct, nll=nll)


@torch.no_grad()
def latency(models: Dict[str, torch.nn.Module], a, seed: int) -> Dict[str, List[float]]:
    """Seconds per greedy generation of batch a.lat_batch, a.lat_prompt random prompt tokens,
    a.lat_new new tokens; variants interleaved in rotating order so load changes hit all alike."""
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(1, len(CHARS) + 1, (a.lat_batch, a.lat_prompt), generator=g)
    names = list(models)
    times: Dict[str, List[float]] = {n: [] for n in names}
    for it in range(a.lat_warmup + a.lat_iters):
        for n in names[it % len(names):] + names[: it % len(names)]:
            t = time.perf_counter()
            greedy(models[n], prompts, a.lat_new)
            if it >= a.lat_warmup:
                times[n].append(time.perf_counter() - t)
    return times


def main_experts_per_token(model, problems: List[Problem], batch: int = 256) -> List[float]:
    """Mean main experts per token per layer on the problems (prompt + answer, one forward each)."""
    from megatron_ce.paper.params import measure_main_per_token

    toks = torch.tensor([encode(p + ans) for p, ans in problems])
    pos = torch.arange(toks.shape[1]).unsqueeze(0)
    batches = [dict(tokens=t, position_ids=pos.expand_as(t), attention_mask=None) for t in toks.split(batch)]
    return measure_main_per_token(model, batches)["main_per_token"]
