"""What the two converter command lines (tools/convert_*.py) share: quiet imports, one-line errors."""

import sys
from typing import Callable


def quiet_environment_warnings() -> None:
    """megatron-core warns on import that Apex / Transformer Engine are absent, and about its own
    default cuda_graph_scope: conversion runs no kernels, so these only bury the result (or the one-line
    error) on stderr."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine).* not installed")
    # torch >= 2.14 (the CUDA build used on Python 3.12 here) logs "No CUDA runtime is found" at import
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=r"full scope is deprecated")


def run_conversion(convert: Callable[[], str]) -> int:
    """Run `convert` (returns the line to print when done); a bad input is one `error: ...` line on
    stderr and exit code 2."""
    from megatron_ce.ce.config import ConfigError
    from megatron_ce.convert.mapping import ConversionError

    try:
        done = convert()
    except (ConversionError, ConfigError, OSError) as e:  # OSError: e.g. an unwritable --save-dir
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(done)
    return 0
