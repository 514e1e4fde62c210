"""Issue #15: everything that exists only for megatron-core <0.17's legacy GroupedMLP lives in
megatron_ce/legacy_grouped_mlp.py (plus the version facts in megatron_ce/compat.py), so dropping 0.16
support is deleting that file; on later releases the file is never imported."""

import io
import os
import pathlib
import re
import subprocess
import sys
import tokenize

import pytest

from megatron_ce import compat

ROOT = pathlib.Path(__file__).resolve().parents[2]
SOURCES = ("megatron_ce", "tools", "examples", "launch")
TEXT_SUFFIXES = (".py", ".sh", ".sbatch", ".yaml", ".yml")
LEGACY_MODULE = "megatron_ce.legacy_grouped_mlp"

# The only files that may name the legacy pieces. No per-line exceptions: every other file reaches the
# legacy module through compat.legacy_grouped_mlp(), which is None on megatron-core >= 0.17.
ALLOWED = {"megatron_ce/compat.py", "megatron_ce/legacy_grouped_mlp.py"}

# The legacy class and its CE subclass (not TEGroupedMLP / CETEGroupedMLP / GroupedMLPSubmodules), its grouped_gemm module,
# its fused [d, E*2F] weight, the CPU stand-in for its kernel, and the version flag guarding them.
LEGACY = re.compile(r"(?<![A-Za-z])(?:CE)?GroupedMLP\b|grouped_gemm_util|\bweight1\b|\bcpu_gmm\b|HAS_LEGACY_GROUPED_MLP")


def _code_text(path: pathlib.Path) -> str:
    """The file without its comments (a comment is no code path; docstrings and strings stay)."""
    text = path.read_text(encoding="utf-8")
    if path.suffix != ".py":
        return "\n".join("" if line.lstrip().startswith("#") else line for line in text.splitlines())
    tokens = tokenize.generate_tokens(io.StringIO(text).readline)
    lines = text.splitlines()
    for tok in tokens:
        if tok.type == tokenize.COMMENT:
            row, col = tok.start
            lines[row - 1] = lines[row - 1][:col]
    return "\n".join(lines)


def legacy_mentions(root: pathlib.Path = ROOT):
    for top in SOURCES:
        for path in sorted((root / top).rglob("*")):
            rel = path.relative_to(root).as_posix()
            if path.suffix not in TEXT_SUFFIXES or not path.is_file() or rel in ALLOWED:
                continue
            for lineno, line in enumerate(_code_text(path).splitlines(), 1):
                if LEGACY.search(line):
                    yield f"{rel}:{lineno}: {line.strip()}"


def test_pattern_tells_the_legacy_class_from_its_successors():
    hits = ["compat.GroupedMLP", "class CEGroupedMLP(", "x.weight1.view", "gg.ops.gmm = cpu_gmm", "grouped_gemm_util.ops"]
    misses = ["TEGroupedMLP", "CETEGroupedMLP", "GroupedMLPSubmodules", "weight10", "weight0", "legacy_grouped_mlp"]
    assert all(LEGACY.search(s) for s in hits)
    assert not any(LEGACY.search(s) for s in misses)


def test_comments_are_not_code(tmp_path):
    src = tmp_path / "megatron_ce" / "m.py"
    src.parent.mkdir()
    src.write_text("x = 1  # the legacy GroupedMLP went in 0.17\n'''GroupedMLP in a docstring'''\n")
    assert list(legacy_mentions(tmp_path)) == ["megatron_ce/m.py:2: '''GroupedMLP in a docstring'''"]


def test_legacy_code_is_confined_to_the_adapter():
    found = list(legacy_mentions())
    assert not found, "legacy GroupedMLP code outside megatron_ce/legacy_grouped_mlp.py and compat.py:\n" + "\n".join(found)


def _loaded_after(*modules: str) -> dict:
    """In a fresh interpreter (other tests' imports do not count): is the legacy module loaded after
    importing `modules` in this order, and is CEGroupedMLP the CE class of GroupedMLP."""
    code = (
        "import importlib, sys\n"
        f"for m in {list(modules)!r}: importlib.import_module(m)\n"
        "from megatron_ce import compat\n"
        "from megatron_ce.ce.experts import CE_EXPERTS\n"
        f"mod = sys.modules.get({LEGACY_MODULE!r})\n"
        "ce = CE_EXPERTS.get(compat.GroupedMLP) if compat.GroupedMLP is not None else None\n"
        "print(mod is not None, ce is not None and ce is getattr(mod, 'CEGroupedMLP', None))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-3000:]
    loaded, registered = out.stdout.split()
    return {"loaded": loaded == "True", "registered": registered == "True"}


# cpu_shims first: on megatron-core <0.17 the legacy module is then imported before megatron_ce.ce, and
# the import cycle (legacy -> ce.experts -> legacy) must still end with its experts registered.
@pytest.mark.parametrize("modules", [
    ("megatron_ce.ce", "megatron_ce.runtime.cpu_shims"),
    ("megatron_ce.runtime.cpu_shims", "megatron_ce.ce"),
], ids=["ce-first", "cpu_shims-first"])
def test_legacy_module_loaded_exactly_where_megatron_core_has_the_legacy_class(modules):
    legacy = compat.HAS_LEGACY_GROUPED_MLP
    assert _loaded_after(*modules) == {"loaded": legacy, "registered": legacy}


@pytest.mark.skipif(compat.HAS_LEGACY_GROUPED_MLP, reason=f"megatron-core {compat.MCORE_VERSION_STR} has it")
def test_legacy_module_refuses_to_import_without_the_legacy_class():
    with pytest.raises(ImportError, match="megatron-core <0.17"):
        __import__(LEGACY_MODULE)
    assert compat.legacy_grouped_mlp() is None
