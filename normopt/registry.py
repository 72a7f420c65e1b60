"""The pass registry: name -> pass class, filled by ``@register_pass`` in import order."""
from __future__ import annotations

from normopt.errors import UnknownPassError

_PASSES: dict[str, type] = {}


def register_pass(name: str):
    def decorate(cls):
        if name in _PASSES:
            raise ValueError(f"pass '{name}' is registered twice")
        cls.name = name
        _PASSES[name] = cls
        return cls
    return decorate


def available() -> dict[str, type]:
    """Every registered pass, in the order it runs."""
    import normopt.passes  # noqa: F401  (registers the passes, in a fixed order)
    return dict(_PASSES)


def describe(cls) -> str:
    doc = (cls.__doc__ or "").strip()
    return doc.splitlines()[0] if doc else ""


def resolve(names: list[str] | None, skip: list[str] | None = None) -> list[str]:
    """Validate and order pass names. None means every pass."""
    table = available()
    for name in list(names or []) + list(skip or []):
        if name not in table:
            raise UnknownPassError(
                f"unknown pass '{name}'; available: {', '.join(sorted(table))} (see 'normopt passes')")
    chosen = set(table) if names is None else set(names)
    chosen -= set(skip or [])
    return [n for n in table if n in chosen]
