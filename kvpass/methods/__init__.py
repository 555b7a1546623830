"""The method registry: one module per scheme or policy in this package, each registering its class.

Adding a method is adding a file here whose class is decorated with :func:`register`; the registry, the
CLI and the shared test matrix pick it up from the registry.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil

from ..errors import OptionError, UnknownMethodError
from .base import BufferSpec, CacheShape, KVState, Scheme

_REGISTRY: dict[str, type[Scheme]] = {}


def register(cls: type[Scheme]) -> type[Scheme]:
    """Class decorator: make a scheme available by its ``name``."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} must set a non-empty `name`")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise TypeError(f"method name {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def _discover() -> None:
    for mod in pkgutil.iter_modules(__path__):
        if mod.name != "base" and not mod.name.startswith("_"):
            importlib.import_module(f"{__name__}.{mod.name}")


def methods() -> list[str]:
    """Names of all registered compression schemes (``method=``), sorted."""
    return sorted(n for n, cls in _REGISTRY.items() if not cls.policy and not getattr(cls, "wrapper", False))


def policies() -> list[str]:
    """Names of the registered head policies (``heads=``, besides "full"), sorted."""
    return sorted(n for n, cls in _REGISTRY.items() if cls.policy)


def scheme_class(name: str) -> type[Scheme]:
    """The registered class for ``name``; raises :class:`UnknownMethodError` listing the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownMethodError(f"unknown method {name!r}; known methods: {', '.join(methods())}") from None


def get_scheme(name: str, **options) -> Scheme:
    """Build the scheme ``name`` with ``options``; unknown options raise :class:`OptionError`."""
    cls = scheme_class(name)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise OptionError(f"{name} has no option {', '.join(map(repr, unknown))}; "
                          f"its options: {', '.join(sorted(fields)) or '(none)'}")
    return cls(**options)


_discover()

__all__ = ["BufferSpec", "CacheShape", "KVState", "Scheme", "get_scheme", "methods", "policies", "register",
           "scheme_class"]
