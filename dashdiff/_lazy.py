"""Lazy attributes for the method packages (PEP 562): ``import dashdiff.dash`` loads no submodule,
so the layer can import a method's kernel without its lifecycle (which imports the layer)."""

from __future__ import annotations

import importlib
from typing import Any, Callable, Mapping, Optional


def lazy_getattr(package: str, exports: Mapping[str, str],
                 fallback: Optional[Callable[[str], Optional[str]]] = None) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package``: ``exports`` maps a name to the submodule holding it;
    ``fallback(name)`` may name a submodule for other names (None: no such attribute)."""

    def __getattr__(name: str) -> Any:
        module = exports.get(name) or (fallback(name) if fallback is not None else None)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{module}"), name)

    return __getattr__
