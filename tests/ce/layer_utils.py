"""Build single CE MoE layers and read their weights in the plain layout of tests/ce/reference.py."""

import torch
import torch.nn.functional as F
from megatron_ce import compat
from megatron_ce.ce import CETransformerConfig, build_ce_moe_layer


def ce_config(n=8, k=2, k_a=1, variant="ia3", d=32, ffn=48, dispatcher="allgather", **kw):
    # ffn > d on purpose: the reference code's [n, 3, d] theta table breaks there (Phi-MoE case).
    base = dict(
        num_layers=1,
        hidden_size=d,
        num_attention_heads=4,
        num_moe_experts=n,
        moe_router_topk=k,
        moe_ffn_hidden_size=ffn,
        ffn_hidden_size=ffn,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        bias_activation_fusion=False,
        moe_router_pre_softmax=True,
        use_cpu_initialization=True,
        moe_token_dispatcher_type=dispatcher,
        moe_ce_num_compressed=k_a,
        moe_ce_variant=variant,
    )
    base.update(kw)
    return CETransformerConfig(**base)


def build_moe(config, grouped=False, ce=True):
    """One MoE layer from the CE spec (or megatron-core's own spec when ce=False). grouped: the legacy
    GroupedMLP where megatron-core has it (<0.17), else TEGroupedMLP on TorchGroupedLinear."""
    legacy = grouped and compat.HAS_LEGACY_GROUPED_MLP
    return build_ce_moe_layer(config, grouped_gemm=legacy, torch_grouped=grouped and not legacy, ce=ce)


def _grouped_linear_weights(linear, n):
    return torch.stack([getattr(linear, f"weight{i}") for i in range(n)])


def expert_weights(layer):
    """(w_gate [n,F,d], w_up [n,F,d], w_down [n,d,F]) views of the layer's expert parameters."""
    experts = layer.experts
    if hasattr(experts, "local_experts"):
        fc1 = torch.stack([e.linear_fc1.weight for e in experts.local_experts])  # [n, 2F, d]
        f = fc1.shape[1] // 2
        w_down = torch.stack([e.linear_fc2.weight for e in experts.local_experts])
        return fc1[:, :f], fc1[:, f:], w_down
    n, d = experts.num_local_experts, layer.config.hidden_size
    if hasattr(experts, "linear_fc1"):  # TEGroupedMLP: weight{i} [2F, d] and [d, F] per expert
        fc1 = _grouped_linear_weights(experts.linear_fc1, n)
        f = fc1.shape[1] // 2
        return fc1[:, :f], fc1[:, f:], _grouped_linear_weights(experts.linear_fc2, n)
    w1 = experts.weight1.view(n, d, -1)  # GroupedMLP: [d, n*2F] -> per expert [d, 2F]
    f = w1.shape[-1] // 2
    w2 = experts.weight2.view(n, -1, d)  # [n*F, d] -> per expert [F, d]
    return w1[..., :f].transpose(1, 2), w1[..., f:].transpose(1, 2), w2.transpose(1, 2)


def randomize(layer, seed=0, scale=0.12, router_scale=0.3):
    """Non-trivial weights and non-unit thetas. Outputs come out O(1): large enough for a 1e-6
    tolerance to mean something, small enough that fp32 rounding stays well below it."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.startswith("ce."):
                p.copy_(1.0 + 0.5 * torch.randn(p.shape, generator=g))
            else:
                s = router_scale if name.startswith("router.") else scale
                p.copy_(s * torch.randn(p.shape, generator=g))


def thetas_of(layer):
    return {name: p for name, p in layer.ce.named_parameters()} if layer.ce is not None else {}
