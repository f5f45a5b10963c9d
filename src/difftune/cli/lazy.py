"""Modules imported at their first use: a script names its heavy modules (torch, the model and training code)
at the top as usual, and `--help`, which exits while the flags are parsed, answers without loading them."""

from __future__ import annotations

import importlib
from types import ModuleType


class LazyModule:
    """Stands for the module `name`, imported at the first attribute read or write (`torch = LazyModule("torch")`).

    A stand-in rather than an entry in sys.modules (as importlib.util.LazyLoader makes): nothing is imported
    until used, and a test patching an attribute through it patches the module itself."""

    def __init__(self, name: str) -> None:
        object.__setattr__(self, "_name", name)

    def _module(self) -> ModuleType:
        return importlib.import_module(object.__getattribute__(self, "_name"))

    def __getattr__(self, attribute: str):
        return getattr(self._module(), attribute)

    def __setattr__(self, attribute: str, value) -> None:
        setattr(self._module(), attribute, value)

    def __delattr__(self, attribute: str) -> None:
        delattr(self._module(), attribute)

    def __repr__(self) -> str:
        return f"<lazy module {object.__getattribute__(self, '_name')!r}>"
