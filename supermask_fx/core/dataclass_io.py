"""Building the library's config dataclasses from plain dicts (JSON), refusing fields they do not have."""

from __future__ import annotations

from dataclasses import fields
from typing import Any, TypeVar

T = TypeVar("T")


def dataclass_from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """``cls(**data)``, or ``ValueError`` naming the unknown fields of ``data`` and the fields ``cls`` has."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {unknown}; known fields: {sorted(known)}")
    return cls(**data)
