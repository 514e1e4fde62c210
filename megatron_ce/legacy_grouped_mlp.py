"""Everything that exists only for megatron-core <0.17's legacy GroupedMLP (grouped_gemm package); delete
this file when 0.16 support ends.

The second half of the version adapter (megatron_ce/compat.py says which release is installed): the rest
of the package reaches this module only through `compat.legacy_grouped_mlp()`, which is None on releases
without the class, so there it is never imported. It holds
  * CEGroupedMLP, the CE experts on GroupedMLP, registered into megatron_ce.ce.experts.CE_EXPERTS on import;
  * the CPU stand-ins that megatron_ce.runtime.cpu_shims applies for it (a gmm for the CUDA-only
    grouped_gemm kernels, and GroupedMLP.forward without its bf16-only assertion);
  * reading its fused weights as per-expert vectors (calibration's expert similarity).
"""

from __future__ import annotations

import copy
import importlib
import types
from typing import List, Optional

import torch

from megatron_ce import compat

if not compat.HAS_LEGACY_GROUPED_MLP:
    raise ImportError(f"megatron_ce.legacy_grouped_mlp needs megatron-core <0.17; found {compat.MCORE_VERSION_STR}")

from megatron_ce.ce.experts import CE_EXPERTS, CEExpertsMixin, gate_up_gemm  # noqa: E402

# ----------------------------------------------------------------------------------------------
# CE experts on the legacy GroupedMLP
# ----------------------------------------------------------------------------------------------


def _use_grouped_gemm(x: torch.Tensor) -> bool:
    return x.is_cuda and compat.grouped_gemm_available()


def grouped_mm(x: torch.Tensor, w: torch.Tensor, tokens_per_expert: List[int]) -> torch.Tensor:
    """Rows of x grouped by expert times w[e] ([E, in, out]); grouped_gemm when it is usable."""
    if _use_grouped_gemm(x):
        return compat.grouped_gemm_util.ops.gmm(
            x, w.contiguous(), torch.tensor(tokens_per_expert, dtype=torch.long), trans_b=False
        )
    return cpu_gmm(x, w, tokens_per_expert)  # the same per-expert split and matmul


class CEGroupedMLP(CEExpertsMixin, compat.GroupedMLP):
    """Legacy GroupedMLP (grouped_gemm) with CE scales; weights are [d, E*2F] and [E*F, d].

    Unlike the other CE experts, the grouped_gemm path gathers each fc1 half into a dense [E, d, F]
    operand per step: the halves of the [d, E*2F] weight are strided column blocks, and that kernel
    needs them dense. megatron-core's GroupedMLP.forward only runs with bf16=True; without CE scales in
    fp32 (CPU tests) the same SwiGLU math runs through our grouped path instead.
    """

    def _parent_forward_ok(self) -> bool:
        return self.config.bf16

    def _ce_fc1(self, x_gate, x_up, tpe):
        d = self.config.hidden_size
        w1 = self.weight1.view(self.num_local_experts, d, -1)
        f = w1.shape[-1] // 2
        if _use_grouped_gemm(x_gate):
            return grouped_mm(x_gate, w1[..., :f], tpe), grouped_mm(x_up, w1[..., f:], tpe)
        return gate_up_gemm(x_gate, x_up, w1.unbind(0), tpe, out_dim_first=False)

    def _ce_fc2(self, h, tpe, probs):
        w2 = self.weight2.view(self.num_local_experts, -1, self.config.hidden_size)
        return grouped_mm(h, w2, tpe)


CE_EXPERTS[compat.GroupedMLP] = CEGroupedMLP

# ----------------------------------------------------------------------------------------------
# Calibration: the experts' weights as one flat vector each
# ----------------------------------------------------------------------------------------------


def expert_weight_vectors(experts) -> Optional[List[torch.Tensor]]:
    """Each local expert's fc1 and fc2 weights as one flat fp32 vector if experts is a GroupedMLP, else
    None. Its weight1 [d, E*2F] holds expert e as the e-th contiguous [d, 2F] block in memory (GroupedMLP's
    forward reads view(E, d, -1)), not as the columns e*2F..(e+1)*2F; weight2 [E*F, d] as rows."""
    if not isinstance(experts, compat.GroupedMLP):
        return None
    n = experts.num_local_experts
    w1 = experts.weight1.detach().float().reshape(n, -1)
    w2 = experts.weight2.detach().float().reshape(n, -1)
    return [torch.cat([a, b]) for a, b in zip(w1, w2)]


# ----------------------------------------------------------------------------------------------
# CPU stand-ins (applied by megatron_ce.runtime.cpu_shims)
# ----------------------------------------------------------------------------------------------

_GG = "megatron.core.transformer.moe.grouped_gemm_util"
_EXPERTS = "megatron.core.transformer.moe.experts"

#: Modules binding megatron.core.jit.jit_fuser by name that only GroupedMLP needs no-op'd on CPU
#: (GroupedMLP.__init__ applies it at run time).
CPU_JIT_FUSER_MODULES = (_EXPERTS,)

#: The megatron-core attributes apply_cpu_patches() replaces: (module, dotted attribute).
CPU_PATCHED_NAMES = ((_GG, "grouped_gemm"), (_GG, "ops"), (_EXPERTS, "GroupedMLP.forward"))


def cpu_gmm(a: torch.Tensor, b: torch.Tensor, batch_sizes, trans_b: bool = False) -> torch.Tensor:
    """CPU stand-in for ``grouped_gemm.ops.gmm``: rows of ``a`` [tokens, k] are split by
    ``batch_sizes`` (one count per group) and chunk i is multiplied by ``b[i]`` ([k, n], or
    [n, k] with ``trans_b``).  Plain autograd ops: gradients reach ``a`` and ``b``, and groups
    with zero rows get zero gradient."""
    sizes = [int(s) for s in (batch_sizes.tolist() if torch.is_tensor(batch_sizes) else batch_sizes)]
    if len(sizes) != b.shape[0]:
        raise ValueError(f"gmm: {len(sizes)} batch sizes for {b.shape[0]} weight groups")
    if sum(sizes) != a.shape[0]:
        raise ValueError(f"gmm: batch sizes sum to {sum(sizes)} but a has {a.shape[0]} rows")
    chunks = torch.split(a, sizes, dim=0)
    # unbind, not b[i]: each b[i]'s backward would materialise a zero tensor of b's full size
    # (quadratic in the number of experts: 60% of a 64-expert layer's time in a profile).
    out = [chunk @ (w.t() if trans_b else w) for w, chunk in zip(b.unbind(0), chunks)]
    if not out:
        return a.new_zeros((0, b.shape[1] if trans_b else b.shape[2]))
    return torch.cat(out, dim=0)


def _make_grouped_mlp_forward(orig_forward):
    def forward(self, *args, **kwargs):
        # Asserts config.bf16 because the CUDA kernels are bf16-only; cpu_gmm is not, so an fp32
        # model gets through with a bf16=True view of its config during forward.
        config = self.config
        if config.bf16:
            return orig_forward(self, *args, **kwargs)
        view = copy.copy(config)
        view.bf16 = True
        self.config = view
        try:
            return orig_forward(self, *args, **kwargs)
        finally:
            self.config = config

    forward.__wrapped__ = orig_forward
    return forward


def apply_cpu_patches() -> None:
    """GroupedMLP needs the CUDA grouped_gemm package: where it is missing, a CPU split-and-matmul gmm,
    and GroupedMLP.forward's bf16-only assertion (about those kernels) lifted. Called once by
    cpu_shims.apply_cpu_shims."""
    gg = importlib.import_module(_GG)
    if gg.grouped_gemm is None:
        gg.grouped_gemm = types.SimpleNamespace(ops=types.SimpleNamespace(gmm=cpu_gmm))
        gg.ops = gg.grouped_gemm.ops
        grouped_mlp = importlib.import_module(_EXPERTS).GroupedMLP
        grouped_mlp.forward = _make_grouped_mlp_forward(grouped_mlp.forward)
