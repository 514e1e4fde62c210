"""Typed name mappings between HF tensors and megatron-core parameters.

A family's table is a list of mappings. Each mapping names its megatron-core parameters (the state-dict
names of a TP=PP=EP=1 model, e.g. `decoder.layers.{layer}.self_attention.linear_qkv.weight`) and its
HF tensors (e.g. `model.layers.{layer}.self_attn.q_proj.weight`), with `{layer}` / `{expert}`
placeholders, and converts a group of tensors in each direction:

    Direct     one HF tensor  <-> one mcore tensor (norms, embeddings, projections, router)
    Router     Direct, named for what it is (the MoE gate [E, d])
    QKV        q, k, v        <-> linear_qkv, interleaved per query group: [q_g, k_g, v_g] for g = 0..G-1
    GatedMLP   gate, up       <-> linear_fc1 = [gate; up]
    Ones       nothing        -> a tensor of ones (CE tables created at conversion time)
    Sliced     one HF tensor  -> several mcore tensors, each an index of it (import only; e.g. the
               reference CE tensor `ces` [n, 3, d] -> gate, up, down[:ffn])

Expanding `{layer}` over range(num_layers) and `{expert}` over range(num_experts) gives the concrete
instances (`Bound`), which the engine uses to stream one layer at a time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

Shape = Tuple[int, ...]


class ConversionError(ValueError):
    """A checkpoint does not match the model it is converted to/from (one message lists every
    problem)."""


@dataclass
class Context:
    """What a typed mapping needs to know about the model."""

    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    hidden_size: int
    moe_ffn_hidden_size: Optional[int] = None
    num_experts: Optional[int] = None
    dtype: Optional[torch.dtype] = None  # dtype for tensors created by the conversion (Ones)


def _fmt(pattern: str, bind: Dict[str, int]) -> str:
    return pattern.format(**bind) if "{" in pattern else pattern


def placeholders(pattern: str) -> List[str]:
    return re.findall(r"{(\w+)}", pattern)


class Mapping:
    """Base class: `megatron` and `hf` are dicts role -> name pattern."""

    megatron: Dict[str, str]
    hf: Dict[str, str]
    import_only: bool = False

    def to_megatron(self, hf: Dict[str, torch.Tensor], ctx: Context) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    def to_hf(self, mc: Dict[str, torch.Tensor], ctx: Context) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    def hf_shapes(self, mc_shapes: Dict[str, Shape], ctx: Context) -> Dict[str, Shape]:
        """Expected HF shapes (by role) given the megatron-core shapes (by role)."""
        raise NotImplementedError

    def placeholders(self) -> List[str]:
        names = []
        for p in list(self.megatron.values()) + list(self.hf.values()):
            for n in placeholders(p):
                if n not in names:
                    names.append(n)
        return names

    def bind(self, **values: int) -> "Bound":
        return Bound(
            self,
            dict(values),
            {r: _fmt(p, values) for r, p in self.megatron.items()},
            {r: _fmt(p, values) for r, p in self.hf.items()},
        )


@dataclass
class Bound:
    """A mapping with its placeholders filled in."""

    mapping: Mapping
    values: Dict[str, int]
    megatron: Dict[str, str]  # role -> concrete mcore param name
    hf: Dict[str, str]  # role -> concrete HF tensor name

    @property
    def layer(self) -> Optional[int]:
        return self.values.get("layer")

    def to_megatron(self, hf_tensors: Dict[str, torch.Tensor], ctx: Context) -> Dict[str, torch.Tensor]:
        """HF tensors by name -> mcore tensors by name."""
        by_role = {r: hf_tensors[n] for r, n in self.hf.items()}
        out = self.mapping.to_megatron(by_role, ctx)
        return {self.megatron[r]: t for r, t in out.items()}

    def to_hf(self, mc_tensors: Dict[str, torch.Tensor], ctx: Context) -> Dict[str, torch.Tensor]:
        by_role = {r: mc_tensors[n] for r, n in self.megatron.items()}
        out = self.mapping.to_hf(by_role, ctx)
        return {self.hf[r]: t for r, t in out.items()}

    def hf_shapes(self, mc_shapes: Dict[str, Shape], ctx: Context) -> Dict[str, Shape]:
        by_role = {r: tuple(mc_shapes[n]) for r, n in self.megatron.items()}
        return {self.hf[r]: tuple(s) for r, s in self.mapping.hf_shapes(by_role, ctx).items()}


def _own(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor with its own storage (safetensors refuses shared storage)."""
    return t.contiguous().clone()


class Direct(Mapping):
    def __init__(self, megatron: str, hf: str):
        self.megatron = {"w": megatron}
        self.hf = {"w": hf}

    def to_megatron(self, hf, ctx):
        return {"w": hf["w"]}

    def to_hf(self, mc, ctx):
        return {"w": mc["w"]}

    def hf_shapes(self, mc_shapes, ctx):
        return {"w": mc_shapes["w"]}

    def __repr__(self):
        return f"Direct({self.megatron['w']!r} <- {self.hf['w']!r})"


class Router(Direct):
    """The MoE gate: HF [E, d] <-> mcore router.weight [E, d]."""


class QKV(Mapping):
    """Separate q/k/v projections (weight [out, d] or bias [out]) <-> mcore's fused linear_qkv, whose
    rows are grouped per query group g: [q heads of g (H/G * hd rows), k_g (hd), v_g (hd)]."""

    def __init__(self, megatron: str, q: str, k: str, v: str):
        self.megatron = {"qkv": megatron}
        self.hf = {"q": q, "k": k, "v": v}

    @staticmethod
    def _sizes(ctx: Context):
        g = ctx.num_query_groups
        return g, ctx.num_attention_heads // g * ctx.head_dim, ctx.head_dim

    def to_megatron(self, hf, ctx):
        g, qs, hd = self._sizes(ctx)
        q, k, v = hf["q"], hf["k"], hf["v"]
        rest = tuple(q.shape[1:])
        qkv = torch.cat([q.reshape(g, qs, *rest), k.reshape(g, hd, *rest), v.reshape(g, hd, *rest)], dim=1)
        return {"qkv": qkv.reshape(-1, *rest)}

    def to_hf(self, mc, ctx):
        g, qs, hd = self._sizes(ctx)
        qkv = mc["qkv"]
        rest = tuple(qkv.shape[1:])
        q, k, v = torch.split(qkv.reshape(g, qs + 2 * hd, *rest), [qs, hd, hd], dim=1)
        return {
            "q": _own(q.reshape(-1, *rest)),
            "k": _own(k.reshape(-1, *rest)),
            "v": _own(v.reshape(-1, *rest)),
        }

    def hf_shapes(self, mc_shapes, ctx):
        g, qs, hd = self._sizes(ctx)
        rest = tuple(mc_shapes["qkv"][1:])
        return {"q": (g * qs, *rest), "k": (g * hd, *rest), "v": (g * hd, *rest)}


class GatedMLP(Mapping):
    """gate [F, d], up [F, d] <-> linear_fc1 [2F, d] = [gate; up]."""

    def __init__(self, megatron: str, gate: str, up: str):
        self.megatron = {"fc1": megatron}
        self.hf = {"gate": gate, "up": up}

    def to_megatron(self, hf, ctx):
        return {"fc1": torch.cat([hf["gate"], hf["up"]], dim=0)}

    def to_hf(self, mc, ctx):
        gate, up = torch.chunk(mc["fc1"], 2, dim=0)
        return {"gate": _own(gate), "up": _own(up)}

    def hf_shapes(self, mc_shapes, ctx):
        two_f, *rest = mc_shapes["fc1"]
        return {"gate": (two_f // 2, *rest), "up": (two_f // 2, *rest)}


class Ones(Mapping):
    """mcore tensor(s) created as ones (CE tables on a checkpoint without them); HF side: none."""

    import_only = True

    def __init__(self, *megatron: str):
        self.megatron = {f"t{i}": m for i, m in enumerate(megatron)}
        self.hf = {}
        self.shapes: Dict[str, Shape] = {}

    def to_megatron(self, hf, ctx):
        raise RuntimeError("Ones needs shapes: the engine fills it through make()")

    def make(self, shapes: Dict[str, Shape], dtype: torch.dtype) -> Dict[str, torch.Tensor]:
        return {r: torch.ones(shapes[r], dtype=dtype) for r in self.megatron}

    def hf_shapes(self, mc_shapes, ctx):
        return {}


class Sliced(Mapping):
    """One HF tensor -> several mcore tensors, each `hf[index]` (import only)."""

    import_only = True

    def __init__(self, hf: str, parts: Dict[str, Tuple[str, Callable[[torch.Tensor, Context], torch.Tensor]]],
                 hf_shape: Callable[[Dict[str, Shape], Context], Shape]):
        self.hf = {"src": hf}
        self.megatron = {r: name for r, (name, _) in parts.items()}
        self._parts = {r: fn for r, (_, fn) in parts.items()}
        self._hf_shape = hf_shape

    def to_megatron(self, hf, ctx):
        return {r: _own(fn(hf["src"], ctx)) for r, fn in self._parts.items()}

    def hf_shapes(self, mc_shapes, ctx):
        return {"src": self._hf_shape(mc_shapes, ctx)}


def expand(mappings: Sequence[Mapping], ranges: Dict[str, int]) -> List[Bound]:
    """All instances of the mappings: each placeholder p over range(ranges[p])."""
    out: List[Bound] = []
    for m in mappings:
        names = m.placeholders()
        missing = [n for n in names if n not in ranges]
        if missing:
            raise KeyError(f"{m!r}: no range for placeholder(s) {missing}")
        combos: List[Dict[str, int]] = [{}]
        for n in names:
            combos = [dict(c, **{n: i}) for c in combos for i in range(ranges[n])]
        out.extend(m.bind(**c) for c in combos)
    return out
