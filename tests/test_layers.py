"""The package's layers (shared/design.md): every import points down or sideways, never up, also inside functions.

The scan parses every module under peftlab/ with ast (no import runs): `import x`, `from x import y`, relative
imports, imports inside functions and under `if TYPE_CHECKING:` (a type-only import is still a dependency), and the
lazy export tables (`_EXPORTS = {name: ".module"}`) that packages load from with importlib. Each module is mapped to
its layer; an import of a module in a higher layer is a violation. There is no allowlist: a violation is fixed by
moving code (or by taking the higher layer's object as an argument), not by listing it here.

Also here: the torch-free config path that `peftlab train` relies on to answer config errors before importing torch
(tests/test_error_boundary.py runs the CLI itself with torch made unimportable).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "peftlab"

# Top first. `peftlab` is the package root (peftlab/__init__.py: the public names, loaded lazily from every layer,
# and the hook that loads the built-in methods into core's registry); `integrations` is HF PEFT's and transformers'
# drop-in surface (AutoPeftModel*, Trainer, status), a user-facing API beside the CLI that trains nothing itself.
LAYERS = ["peftlab", "cli", "compare", "serve", "integrations", "train", "export", "data", "methods", "core", "models",
          "io", "kernels"]
RANK = {name: i for i, name in enumerate(LAYERS)}
# Modules directly under peftlab/ that are not a folder, with the layer they belong to: none today (retrieval.py
# moved into methods/icl/); a new one must be placed here and in shared/design.md.
ROOT_MODULES: dict[str, str] = {}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> str:
    parts = module.split(".")
    if parts[0] != "peftlab":
        raise ValueError(module)
    if len(parts) == 1:
        return "peftlab"
    if parts[1] in ROOT_MODULES:
        return ROOT_MODULES[parts[1]]
    if parts[1] not in RANK:
        raise AssertionError(f"{module}: peftlab/{parts[1]} is in no layer; add it to LAYERS (and shared/design.md)")
    return parts[1]


def resolve(module: str, is_package: bool, level: int, target: str | None) -> str:
    """The absolute name of `from <level dots><target> import ...` written in `module`."""
    if level == 0:
        return target or ""
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def imports_of(path: Path, text: str | None = None) -> list[tuple[int, str]]:
    """(line, absolute module name) of every peftlab module `path` (or `text` as if it were that file) imports,
    wherever the import statement is."""
    module, is_package = module_name(path), path.name == "__init__.py"
    tree = ast.parse(path.read_text(encoding="utf-8") if text is None else text, str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = resolve(module, is_package, node.level, node.module)
            # `from . import x` / `from .pkg import sub`: a name that is a module counts as that module; the package
            # itself counts when a name is one of its attributes (`from ..core import config` does not use core's
            # __init__.py, `from .. import __version__` does use peftlab's)
            modules = [f"{base}.{a.name}" for a in node.names if _is_module(f"{base}.{a.name}")]
            found += [(node.lineno, m) for m in modules]
            if len(modules) < len(node.names):
                found.append((node.lineno, base))
        elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "_EXPORTS" for t in node.targets):
            found += [(c.lineno, resolve(module, is_package, len(c.value) - len(c.value.lstrip(".")),
                                         c.value.lstrip(".") or None))
                      for c in ast.walk(node.value) if isinstance(c, ast.Constant) and isinstance(c.value, str)
                      and c.value.startswith(".")]
    return [(line, name) for line, name in found if name == "peftlab" or name.startswith("peftlab.")]


def _is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def upward_imports() -> list[str]:
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        here = layer_of(module_name(path))
        for line, target in imports_of(path):
            there = layer_of(target)
            if RANK[there] < RANK[here]:
                problems.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {here} imports {target} ({there})")
    return sorted(set(problems))


def test_the_scan_reads_every_kind_of_import():
    """The scanner itself, on known text: relative, absolute, in-function, TYPE_CHECKING and _EXPORTS imports."""
    path = PACKAGE / "core" / "model.py"  # a real module, so that relative names resolve from core
    code = ("from typing import TYPE_CHECKING\nfrom ..io import atomic, names\nimport peftlab.train.loop\n"
            "if TYPE_CHECKING:\n    from ..methods import lora\n"
            "def f():\n    from ..cli import main\n"
            "_EXPORTS = {'x': '.tuner', **{n: '..data.config' for n in 'ab'}}\n")
    found = {name for _, name in imports_of(path, code)}
    assert "peftlab.io" not in found  # only its modules are imported
    assert found >= {"peftlab.io.atomic", "peftlab.io.names", "peftlab.train.loop", "peftlab.methods.lora",
                     "peftlab.cli.main", "peftlab.core.tuner", "peftlab.data.config"}
    assert [layer_of(n) for n in ("peftlab", "peftlab.cli.main", "peftlab.kernels.nf4")] == ["peftlab", "cli",
                                                                                             "kernels"]
    with pytest.raises(AssertionError, match="in no layer"):
        layer_of("peftlab.helpers")


def test_imports_point_down_the_layers():
    problems = upward_imports()
    assert not problems, (f"{len(problems)} import(s) point up the layers ({' > '.join(LAYERS)}; "
                          "shared/design.md):\n" + "\n".join(problems))


def test_core_never_imports_the_methods():
    """core's registry is filled by a loader the package root hands it; core has no import of peftlab.methods, not
    even inside a function (the one circle of the import graph before)."""
    for path in sorted((PACKAGE / "core").rglob("*.py")):
        assert not [t for _, t in imports_of(path) if t.startswith("peftlab.methods")], path


def test_peft_model_methods_used_by_other_layers_are_public():
    """PeftModel's methods that methods/, train/ and cli/ call are public and documented (adapter_layers,
    load_tensors, trains_base_in_place); their old private names are gone everywhere."""
    old = {"_adapter_layers", "_load_tensors", "_trains_base_in_place"}
    used = [f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {node.attr}" for path in sorted(PACKAGE.rglob("*.py"))
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
            if isinstance(node, ast.Attribute) and node.attr in old]
    assert not used, used
    from peftlab.core.model import PeftModel

    for name in ("adapter_layers", "load_tensors", "trains_base_in_place"):
        assert getattr(PeftModel, name).__doc__, name


# ---- the torch-free config path ---------------------------------------------------------------------------------

def test_config_modules_import_no_torch():
    """Reading a run config imports the run config's modules, every built-in method's config class and the registry
    without torch, transformers or accelerate."""
    code = ("import sys\nfrom peftlab.train.config import load_run_config\nfrom peftlab.methods import builtin_names, "
            "config_class\nfor name in builtin_names():\n    config_class(name)\n"
            "load_run_config(None)\n"
            "print(sorted(m for m in ('torch', 'transformers', 'accelerate', 'datasets') if m in sys.modules))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "[]", proc.stdout


def test_torch_free_config_classes_are_the_registered_ones():
    """`config_class(name)` (read from the folder without its torch code) is the class the registry holds."""
    from peftlab.core.method import registered_methods
    from peftlab.methods import builtin_names, config_class

    registered = {m.name: m.config_cls for m in registered_methods()}
    assert set(builtin_names()) <= set(registered)
    for name in builtin_names():
        assert config_class(name) is registered[name], name
    assert config_class("no_such_method") is None


def test_torch_free_name_lists_match_their_tables():
    """Names checked without torch and the tables of torch functions they select from list the same rows."""
    from peftlab.methods.lora.config import INIT_SCHEMES
    from peftlab.methods.lora.init import INITIALIZERS
    from peftlab.models.dtype import DTYPE_CHOICES, DTYPES
    from peftlab.train.preference import DPO_LOSSES
    from peftlab.train.preference_config import DPO_LOSS_TYPES

    assert list(INIT_SCHEMES) == list(INITIALIZERS)
    assert list(DPO_LOSS_TYPES) == list(DPO_LOSSES)
    assert DTYPE_CHOICES == ["auto", *DTYPES]


def test_a_deferred_method_folder_runs_its_init_on_first_use():
    """After config_class has imported a folder's config alone, the folder still works as a normal import."""
    code = ("import sys\nfrom peftlab.methods import config_class\ncls = config_class('lora')\n"
            "assert 'torch' not in sys.modules\n"
            "from peftlab.methods.lora import LoraConfig, METHOD\n"
            "assert LoraConfig is cls and METHOD.config_cls is cls and 'torch' in sys.modules\n"
            "from peftlab.core.method import get_method\nassert get_method('lora') is METHOD\n"
            "import peftlab.methods.dora as dora\nassert dora.METHOD.name == 'dora'\nprint('ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "ok", proc.stderr[-3000:]


@pytest.mark.parametrize("name", ["peftlab.core.config", "peftlab.core.method", "peftlab.io.adapter_files",
                                  "peftlab.io.yaml_file", "peftlab.data.config", "peftlab.models.dtype",
                                  "peftlab.train.preference_config", "peftlab.train.ppo_config", "peftlab.cli.main"])
def test_module_imports_no_torch(name):
    proc = subprocess.run([sys.executable, "-c", f"import sys, {name}; print('torch' in sys.modules)"],
                          capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "False", proc.stderr[-2000:]
