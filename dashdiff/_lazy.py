"""Lazy attributes for dashdiff and its method packages (PEP 562): ``import dashdiff`` loads neither
torch nor PEFT, and ``import dashdiff.dash`` no submodule, so the layer can import a method's kernel
without its lifecycle (which imports the layer)."""

from __future__ import annotations

import importlib
import sys
from typing import Any, Callable, Mapping


def lazy_getattr(package: str, exports: Mapping[str, str], bind: bool = False) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package``: ``exports`` maps a name to the submodule (relative,
    dotted) holding it.

    ``bind``: behave like the eager imports this replaces. A name is bound in the package on first
    use, so that deleting it afterwards (``monkeypatch.delattr``) makes it absent, as it would be for
    an eager import; and any other name that is a submodule is imported (``dashdiff.export`` without
    ``import dashdiff.export``)."""
    resolved: set[str] = set()

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is not None and name not in resolved:
            value = getattr(importlib.import_module(f"{package}.{module}"), name)
            if bind:
                resolved.add(name)
                setattr(sys.modules[package], name, value)
            return value
        if bind and module is None and not name.startswith("_"):
            try:
                return importlib.import_module(f"{package}.{name}")
            except ModuleNotFoundError as err:
                if err.name != f"{package}.{name}":
                    raise  # the submodule exists but something it imports is missing
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
