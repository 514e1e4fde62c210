"""What calibration reports: output errors against the full top-k, expert similarity, LM losses."""

from typing import Dict, Iterable, List, Sequence

import torch
import torch.distributed as dist

from megatron_ce import compat
from megatron_ce.calibrate.capture import LayerBatch, layer_output, run_model
from megatron_ce.calibrate.dist import sequence_groups, sum_over, token_groups


def relative_error(layer, data: Sequence[LayerBatch]) -> float:
    """||y - y_full|| / ||y_full|| (Frobenius, over every rank's tokens) of the layer as it runs now."""
    sums = None
    with torch.no_grad():
        for batch in data:
            out = layer_output(layer, batch.x, batch.kwargs).float()
            ref = batch.target.float()
            s = torch.stack([(out - ref).pow(2).sum(), ref.pow(2).sum()]).double()
            sums = s if sums is None else sums + s
    sum_over(sums, token_groups())
    return float((sums[0] / sums[1].clamp_min(1e-300)).sqrt())


def local_expert_weights(experts) -> List[torch.Tensor]:
    """Each local expert's weights (fc1 and fc2, this rank's expert-TP shard) as one flat vector."""
    n = experts.num_local_experts
    if hasattr(experts, "local_experts"):  # SequentialMLP
        return [torch.cat([p.detach().float().reshape(-1) for p in e.parameters() if p.dim() > 1])
                for e in experts.local_experts]
    legacy = compat.legacy_grouped_mlp()  # megatron-core <0.17's grouped experts, else None
    vecs = legacy.expert_weight_vectors(experts) if legacy is not None else None
    if vecs is not None:
        return vecs
    fc1, fc2 = experts.linear_fc1, experts.linear_fc2  # TEGroupedMLP (weight0..weight{E-1})
    return [torch.cat([getattr(fc1, f"weight{i}").detach().float().reshape(-1),
                       getattr(fc2, f"weight{i}").detach().float().reshape(-1)]) for i in range(n)]


def expert_similarity(layer) -> float:
    """Mean pairwise cosine similarity of the layer's flattened expert weights (1 = identical experts).

    mean_{i != j} cos(w_i, w_j) = (||sum_i u_i||^2 - n) / (n (n - 1)) with u_i = w_i / ||w_i||: one
    expert-sized sum reduced over the expert-parallel ranks, never all experts on one rank. Under
    expert TP each rank holds a slice of every expert: norms and the final square sum over those."""
    from megatron.core import parallel_state as ps

    vecs = local_expert_weights(layer.experts)
    etp = ps.get_expert_tensor_parallel_group() if _expert_groups_up(ps) else None
    ep = ps.get_expert_model_parallel_group() if _expert_groups_up(ps) else None
    norms2 = torch.stack([v.double().pow(2).sum() for v in vecs])
    if etp is not None and dist.get_world_size(etp) > 1:
        dist.all_reduce(norms2, group=etp)
    total = sum(v.double() / n.sqrt() for v, n in zip(vecs, norms2))
    if ep is not None and dist.get_world_size(ep) > 1:
        dist.all_reduce(total, group=ep)
    sq = total.pow(2).sum()
    if etp is not None and dist.get_world_size(etp) > 1:
        dist.all_reduce(sq, group=etp)
    n = layer.config.num_moe_experts
    return float((sq - n) / (n * (n - 1))) if n > 1 else 1.0


def _expert_groups_up(ps) -> bool:
    return dist.is_available() and dist.is_initialized() and ps.model_parallel_is_initialized()


def lm_loss(model, batches: Iterable[Dict[str, torch.Tensor]]) -> float:
    """Mean next-token cross-entropy over every position but the last of each sequence, all ranks."""
    sums = None
    with torch.no_grad():
        for batch in batches:
            losses = token_losses(model, batch)[:, :-1].double()
            s = torch.stack([losses.sum(), torch.tensor(float(losses.numel()), dtype=torch.float64,
                                                        device=losses.device)])
            sums = s if sums is None else sums + s
    sum_over(sums, sequence_groups())
    return float(sums[0] / sums[1])


def token_losses(model, batch) -> torch.Tensor:
    """[b, s] losses against the next token (the last position's label wraps around; callers drop it).
    Vocabulary-parallel logits go through megatron-core's own loss (labels=); gathered logits
    (parallel_output=False), which that loss would treat as a vocabulary shard under TP, through
    torch's cross-entropy."""
    labels = torch.roll(batch["tokens"], -1, dims=1).to(next(model.parameters()).device)
    if getattr(model, "parallel_output", True):
        return run_model(model, batch, labels=labels)
    logits = run_model(model, batch).float()
    return torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
