"""Every megatron-core name megatron-ce touches beyond its imports is listed (issue #15 item 1): private
names it reads or sets, module attributes it assigns (monkeypatching), and methods its subclasses
override. The lists are compat.MCORE_NAMES_BY_RELEASE (what we use) and runtime/cpu_shims'
PATCHED_NAMES / ADDED_NAMES (what the CPU shims replace or add); tests/runtime/test_compat.py and
tests/runtime/test_cpu_shims.py check that each listed name exists in the installed release."""

import ast
import importlib
import pathlib
import pkgutil

from megatron_ce import compat
from megatron_ce.runtime.cpu_shims import ADDED_NAMES, PATCHED_NAMES

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "megatron_ce"
LISTED = set(compat.MCORE_NAMES_BY_RELEASE) | set(PATCHED_NAMES) | set(ADDED_NAMES)

# Private names megatron_ce uses that belong to other libraries, not megatron-core.
NOT_MCORE = {
    "_foreach_mul_": "torch",
    "_torchdynamo_orig_callable": "torch.compile's wrapper of a compiled function",
    "_write_data": "torch.distributed.checkpoint FileSystemWriter",
    "_samples_": "a file-name prefix (eval), not an attribute",
}


def _trees():
    return [(p.relative_to(PACKAGE.parent), ast.parse(p.read_text(encoding="utf-8"))) for p in PACKAGE.rglob("*.py")]


def _names_defined_here(trees):
    """Every name megatron_ce itself defines (functions, classes, variables, arguments, attributes)."""
    names = set()
    for _, tree in trees:
        for n in ast.walk(tree):
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(n.name)
            elif isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store):
                names.add(n.id)
            elif isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store) and getattr(n.value, "id", "") == "self":
                names.add(n.attr)
            elif isinstance(n, ast.arg):
                names.add(n.arg)
    return names


def _private_names_used(tree):
    """_name attributes and '_name' strings (getattr / setattr targets); dunders excluded."""
    for n in ast.walk(tree):
        name = n.attr if isinstance(n, ast.Attribute) else n.value if isinstance(n, ast.Constant) else None
        if isinstance(name, str) and name.isidentifier() and name.startswith("_") and not name.startswith("__"):
            yield name


def test_foreign_private_names_are_listed():
    """A private name megatron_ce uses but does not define is megatron-core's (then it must be listed)
    or another library's (NOT_MCORE)."""
    trees = _trees()
    ours = _names_defined_here(trees)
    listed_tails = {attr.split(".")[-1] for _, attr in LISTED}
    unlisted = sorted(
        f"{path}: {name}"
        for path, tree in trees
        for name in set(_private_names_used(tree))
        if name not in ours and name not in listed_tails and name not in NOT_MCORE
    )
    assert not unlisted, "private megatron-core names not in compat.MCORE_NAMES_BY_RELEASE: " + ", ".join(unlisted)


def _mcore_module_aliases(tree):
    """Local name -> megatron-core module, for `from megatron.core.x import module` and
    `import megatron.core.x as name`."""
    aliases = {}
    for n in ast.walk(tree):
        if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("megatron.core"):
            for a in n.names:
                aliases[a.asname or a.name] = f"{n.module}.{a.name}"
        elif isinstance(n, ast.Import):
            for a in n.names:
                if a.name.startswith("megatron.core") and a.asname:
                    aliases[a.asname] = a.name
    return aliases


def _assigned_attributes(tree, aliases):
    """(module, attribute) for `alias.attr = ...` and `setattr(alias, "attr", ...)` on megatron-core names."""
    for n in ast.walk(tree):
        if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store) and getattr(n.value, "id", None) in aliases:
            yield aliases[n.value.id], n.attr
        if (isinstance(n, ast.Call) and getattr(n.func, "id", None) == "setattr" and len(n.args) >= 2
                and getattr(n.args[0], "id", None) in aliases and isinstance(n.args[1], ast.Constant)):
            yield aliases[n.args[0].id], n.args[1].value


def test_attributes_set_on_mcore_modules_are_listed():
    unlisted = sorted(
        f"{path}: {module}.{attr}"
        for path, tree in _trees()
        for module, attr in _assigned_attributes(tree, _mcore_module_aliases(tree))
        if (module, attr) not in LISTED
    )
    assert not unlisted, "megatron-core attributes set but not listed: " + ", ".join(unlisted)


def _package_classes():
    classes = set()
    for info in pkgutil.walk_packages([str(PACKAGE)], "megatron_ce."):
        if info.name == "megatron_ce.legacy_grouped_mlp" and compat.legacy_grouped_mlp() is None:
            continue  # code for megatron-core <0.17 only; refuses to import on later releases
        module = importlib.import_module(info.name)
        classes |= {c for c in vars(module).values() if isinstance(c, type) and c.__module__.startswith("megatron_ce")}
    return classes


def _mcore_overrides(cls):
    """(megatron-core class, method name) for each megatron-core method that cls, or a megatron_ce
    class in its MRO (mixins), redefines. Constructors are left out: every class has one, and
    building the layers tests their arguments."""
    mro = cls.__mro__
    for i, own in enumerate(mro):
        if not own.__module__.startswith("megatron_ce"):
            continue
        for name in vars(own):
            if name.startswith("__") or name == "_abc_impl":
                continue
            base = next((b for b in mro[i + 1:] if b.__module__.startswith("megatron.core") and name in vars(b)), None)
            if base is not None:
                yield base, name


def _listed_objects():
    from tests.runtime.test_compat import _resolve

    return {id(_resolve(m, a)) for m, a in compat.MCORE_NAMES}


def test_overridden_mcore_methods_are_listed():
    listed = _listed_objects()
    unlisted = sorted(
        {f"{cls.__qualname__}: {base.__module__}.{base.__qualname__}.{name}"
         for cls in _package_classes() for base, name in _mcore_overrides(cls) if id(vars(base)[name]) not in listed}
    )
    assert not unlisted, "overridden megatron-core methods not in compat.MCORE_NAMES_BY_RELEASE: " + ", ".join(unlisted)
