"""Layer-spec factories for the multi-process CE tests (top-level so spawned ranks can unpickle them)."""

import torch

from megatron_ce import compat
from megatron_ce.ce import CEMoELayer, get_gpt_ce_layer_local_spec


class RandomThetaCEMoELayer(CEMoELayer):
    """CE layer whose theta tables start random instead of at ones.

    With theta = 1 every compressed expert is the same vector, so a mix-up of aux indices across
    ranks would not change the forward pass; random thetas make such a bug visible.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.ce is not None:
            with torch.no_grad():
                for p in self.ce.parameters():
                    p.copy_(1.0 + 0.5 * torch.randn_like(p))


def ce_spec(config):
    spec = get_gpt_ce_layer_local_spec(
        num_experts=config.num_moe_experts,
        moe_grouped_gemm=config.moe_grouped_gemm,
        normalization=config.normalization,
        **compat.legacy_grouped_gemm_kwargs(compat.uses_legacy_grouped_gemm(config)),
    )
    # The MoE spec is a ModuleSpec (0.16) or a functools.partial (0.18+): replace_spec keeps the kind.
    spec.submodules.mlp = compat.replace_spec(spec.submodules.mlp, module=RandomThetaCEMoELayer)
    return spec
