"""Phi-MoE's LongRoPE: its parameters from an HF config and its inverse frequencies.

LongRoPE, as transformers 5.24 `PhimoeRotaryEmbedding.forward` actually computes it:
  inv_freq = 1 / (short_factor * base^(2i/dim))  -- ALWAYS short_factor: the forward calls
      `rope_init_fn(config)` without seq_len (the `dynamic_rope_update` decorator's long/short buffer
      update is then ignored), so long_factor is never used by the pinned transformers;
  cos, sin = cos(p * inv_freq) * mscale, sin(p * inv_freq) * mscale, with
      mscale = long_mscale if max(position_ids) + 1 > original_max_position_embeddings else short_mscale.
  Here mscale is applied by scaling q and k by mscale before RoPE (RoPE is linear, so this equals
  scaling cos and sin; fp32 results agree to rounding). The length that decides is the full rotary
  length of the forward (sequence length incl. CP; mcore's RoPE always uses positions 0..S-1, so
  with default position ids it is HF's max(position_ids)+1). With packed sequences whose positions
  restart per document HF would decide by the longest document; we decide by the packed length.
  `long_factor` is read and validated but unused by default, to match the pinned transformers
  (`longrope_inv_freq(..., long=True)` gives the long set should a later transformers use it).
  Note: real Phi-3.5-MoE has short_mscale == long_mscale, so under transformers 5.24 sequences past
  4096 get no LongRoPE extension at all; we reproduce that (parity with the pinned transformers).
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

import torch

from megatron_ce.ce.config import ConfigError


def longrope_params(cfg: Mapping[str, Any]) -> Optional[Dict[str, Any]]:
    """LongRoPE parameters of a 5.x (`rope_parameters`) or 4.x (`rope_scaling`) config, or None for
    plain RoPE. Returns short/long factor, short/long mscale, original_max_position_embeddings."""
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if not isinstance(params, Mapping):
        params = {}
    rtype = params.get("rope_type") or params.get("type") or "default"
    if rtype == "default":
        return None
    if rtype != "longrope":
        raise ConfigError(f"Phi-MoE rope_type={rtype!r}: only 'default' and 'longrope' are supported")
    out = {}
    for key in ("short_factor", "long_factor", "short_mscale", "long_mscale"):
        if params.get(key) is None:
            raise ConfigError(f"Phi-MoE longrope config lacks {key!r}")
        out[key] = params[key]
    omp = params.get("original_max_position_embeddings") or cfg.get("original_max_position_embeddings")
    if omp is None:
        raise ConfigError("Phi-MoE longrope config lacks 'original_max_position_embeddings'")
    out["original_max_position_embeddings"] = int(omp)
    if float(params.get("partial_rotary_factor", 1.0) or 1.0) != 1.0:
        raise ConfigError("Phi-MoE with partial_rotary_factor != 1 is not supported")
    return out


def longrope_inv_freq(longrope: Dict[str, Any], base: float, dim: int, long: bool = False) -> torch.Tensor:
    """transformers' `_compute_longrope_parameters` inverse frequencies (short factors unless `long`)."""
    ext = torch.tensor(longrope["long_factor" if long else "short_factor"], dtype=torch.float32, device="cpu")
    inv_freq_shape = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim
    return 1.0 / (ext * base**inv_freq_shape)
