"""Built-in methods: one folder per method, named as users type it (`method: lora` is `methods/lora/`).

A folder's `__init__.py` registers its method (`register(Method(...))`) and its `config.py` defines the config
dataclass. Adding a method touches only its own folder: `load_builtin_methods` imports every folder found here.

Importing this package imports no method (and no torch). Two ways in:
- `load_builtin_methods()` imports every folder, which registers the methods; peftlab/__init__.py hands it to
  core's registry, which calls it on the first lookup (core itself never imports this package).
- `config_class(name)` returns a built-in method's config class without importing torch, so that `peftlab train`
  can check a config's method section (unknown keys, bad values) before the 5 CPU-seconds of torch + transformers.
  A folder's `__init__.py` imports its layers (torch), and Python runs a package's `__init__.py` before any of its
  submodules; so the folders are first created without running their `__init__.py` (`_defer_folders`), their
  config modules imported, and each `__init__.py` runs on the first use of a name it defines (or when
  `load_builtin_methods` runs). Config modules therefore import no torch at module level.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import pkgutil
import sys

# folder name -> its _Deferred (folders created by _defer_folders whose __init__.py has not run yet)
_DEFERRED: dict[str, _Deferred] = {}


def builtin_names() -> list[str]:
    """The built-in methods' names: the method folders in this package."""
    return sorted(info.name for info in pkgutil.iter_modules(__path__) if info.ispkg)


def load_builtin_methods() -> None:
    """Import every method folder, which registers its method."""
    for name in builtin_names():
        importlib.import_module(f"{__name__}.{name}")
        _DEFERRED.get(name, _nothing)()


def _nothing() -> None:
    return None


def config_class(name: str) -> type | None:
    """The config dataclass of the built-in method `name`, read from its folder's config.py (its `__init__.py` if
    it has none) without importing torch; None when no folder has that name. The class is the one config dataclass
    the module defines itself (tests/test_layers.py checks that it is the registered method's `config_cls`)."""
    if name not in builtin_names():
        return None
    _defer_folders()
    folder = importlib.import_module(f"{__name__}.{name}")
    has_config = importlib.util.find_spec(f"{__name__}.{name}.config") is not None
    if not has_config:  # the config is defined in __init__.py: run it
        _DEFERRED.get(name, _nothing)()
    module = importlib.import_module(f"{__name__}.{name}.config") if has_config else folder
    own = [c for c in vars(module).values() if isinstance(c, type) and dataclasses.is_dataclass(c)
           and c.__module__ == module.__name__ and hasattr(c, "peft_type")]
    if len(own) != 1:
        raise TypeError(f"{module.__name__} defines {len(own)} config dataclasses; a method folder's config module "
                        "defines exactly one (its method's config class).")
    return own[0]


def _defer_folders() -> None:
    """Put every method folder not imported yet into sys.modules without running its `__init__.py`: importing
    `peftlab.methods.lora.config` (and the other folders' config modules it imports) then runs config.py alone.
    The first access to a name the folder does not have yet (`peftlab.methods.lora.LoraLayer`, `from
    peftlab.methods.lora import METHOD`, ...) runs its `__init__.py`, so the folder then behaves as if imported
    normally."""
    package = sys.modules[__name__]
    for name in builtin_names():
        full = f"{__name__}.{name}"
        if full not in sys.modules:
            spec = importlib.util.find_spec(full)
            module = importlib.util.module_from_spec(spec)  # its __path__ is set, so its submodules import
            _DEFERRED[name] = _Deferred(name, module, spec)
            sys.modules[full] = module
            setattr(package, name, module)


class _Deferred:
    """A method folder whose `__init__.py` has not run yet; calling it runs it (once)."""

    def __init__(self, name: str, module, spec) -> None:
        self.name, self.module, self.spec = name, module, spec
        module.__getattr__ = self.first_use  # PEP 562: called only for names the module does not have

    def first_use(self, attr: str):
        self()
        return getattr(self.module, attr)  # AttributeError as usual if __init__.py does not define it

    def __call__(self) -> None:
        if _DEFERRED.get(self.name) is not self:
            return
        del _DEFERRED[self.name], self.module.__getattr__
        try:
            self.spec.loader.exec_module(self.module)
        except BaseException:  # as a failed import would: the next use tries again
            _DEFERRED[self.name] = self
            self.module.__getattr__ = self.first_use
            raise


__all__ = ["builtin_names", "config_class", "load_builtin_methods"]
