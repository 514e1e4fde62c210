"""Lazy exports for the family packages: `from megatron_ce.models.olmoe import build_olmoe_model` works
while importing the package itself stays torch-free (launch/plan.py reads its `presets` on login nodes)."""

import importlib
from typing import Callable, Dict, List, Tuple


def lazy_exports(package: str, names: Dict[str, str]) -> Tuple[Callable[[str], object], Callable[[], List[str]]]:
    """(__getattr__, __dir__) for `package`, resolving each name in `names` from its submodule."""

    def __getattr__(name):
        if name not in names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{names[name]}"), name)

    def __dir__():
        return sorted(names)

    return __getattr__, __dir__
