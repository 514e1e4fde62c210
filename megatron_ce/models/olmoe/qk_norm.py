"""OLMoE's QK-norm on megatron-core: one RMSNorm over the whole projected q (width heads*head_dim) and k
(width kv_heads*head_dim) of a token, before the split into heads.

megatron-core's `qk_layernorm` normalises each head separately, a different function. `FullWidthRMSNorm`
replaces mcore's q/k layernorm submodules through the spec: it receives the heads of this TP rank
([..., heads/tp, head_dim]), takes the sum of squares over them, all-reduces it over the tensor-parallel
group (an autograd all-reduce: the backward all-reduces as well, since every rank's mean depends on
every rank's slice) and divides by the full width. Its weight is TP-sharded like the q/k columns of
linear_qkv (partition_dim 0, so the dist checkpoint holds the full HF vector), which also makes its
gradients correct under SP: the attention input is all-gathered over the sequence before linear_qkv,
so each rank sees every token for its own slice of the weight. `config.qk_layernorm` stays False: with
it megatron-core would all-reduce these (sharded) gradients over TP as if they were replicated.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_ce.ce.config import ConfigError
from megatron_ce.ce.layer import param_device


class _AllReduceSum(torch.autograd.Function):
    """Sum over a process group whose backward is a sum as well (each rank's output depends on every
    rank's input)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.contiguous().clone()
        torch.distributed.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        torch.distributed.all_reduce(grad, group=ctx.group)
        return grad, None


class FullWidthRMSNorm(torch.nn.Module):
    """RMSNorm over all heads of a token (q or k), TP-aware. Input [..., heads/tp, head_dim].

    Built by mcore's SelfAttention as its q_layernorm / k_layernorm with hidden_size = head_dim;
    `num_heads` (spec param) is the global number of heads of that projection.
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, num_heads: Optional[int] = None):
        super().__init__()
        from megatron.core import parallel_state, tensor_parallel

        if num_heads is None:
            raise ValueError("FullWidthRMSNorm needs num_heads (set it in the ModuleSpec params)")
        self.tp_group = parallel_state.get_tensor_model_parallel_group()
        tp = self.tp_group.size()
        if num_heads % tp != 0:
            raise ConfigError(
                f"{num_heads} heads must be divisible by --tensor-model-parallel-size={tp}"
            )
        self.head_dim = hidden_size
        self.num_heads_local = num_heads // tp
        self.full_width = num_heads * hidden_size
        self.eps = eps
        self.weight = torch.nn.Parameter(
            torch.ones(
                self.num_heads_local * hidden_size,
                dtype=config.params_dtype,
                device=param_device(config),  # where mcore puts linear_qkv, whose columns it scales
            )
        )
        tensor_parallel.set_tensor_model_parallel_attributes(self.weight, True, 0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = x.float()
        ss = xf.pow(2).sum(dim=(-2, -1), keepdim=True)
        if self.tp_group.size() > 1:
            ss = _AllReduceSum.apply(ss, self.tp_group)
        y = xf * torch.rsqrt(ss / self.full_width + self.eps)
        return self.weight.view(self.num_heads_local, self.head_dim) * y.to(dtype)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        from megatron.core import parallel_state
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        state_dict = self.state_dict(prefix="", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(
            state_dict,
            prefix,
            {"weight": 0},  # TP-sharded like the q/k columns of linear_qkv
            sharded_offsets,
            tp_group=self.tp_group,
            dp_cp_group=parallel_state.get_data_parallel_group(with_context_parallel=True),
        )

    def extra_repr(self) -> str:
        return f"width={self.full_width}, local_heads={self.num_heads_local}, eps={self.eps}"
