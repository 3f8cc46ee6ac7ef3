"""A package's lazy names: a module `__getattr__` that imports a heavy submodule only when one of its names is used."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_getattr(package: str, names: Mapping[str, str], namespace: dict[str, Any]) -> Callable[[str], Any]:
    """`__getattr__` for `package`: `names` maps an attribute to the submodule defining it; the first use
    imports that submodule and caches the value in `namespace` (the package's globals), so later uses
    never come back here."""

    def __getattr__(name: str) -> Any:
        module = names.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{module}"), name)
        namespace[name] = value
        return value

    return __getattr__
