"""Package attributes imported on first use, so that importing a package stays light."""

from __future__ import annotations

import importlib
from typing import Any


def lazy_exports(namespace: dict[str, Any], exports: dict[str, str]) -> None:
    """Give a package's ``namespace`` a module ``__getattr__`` that imports each name of ``exports``
    (name -> the module that defines it) when it is first read, and a ``__dir__`` that lists them."""
    package = namespace["__name__"]

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value  # later reads skip __getattr__
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(exports))

    namespace["__getattr__"] = __getattr__
    namespace["__dir__"] = __dir__
    namespace["__all__"] = sorted(exports)
