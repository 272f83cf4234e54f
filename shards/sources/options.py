"""Coercing reader options, which arrive as Python values from code or as strings from the CLI
(`classes=8`, `train=a.txt,b.txt`). Bad option values are the caller's mistake, not the
dataset's, so they raise ValueError rather than SourceFormatError."""
from __future__ import annotations

from collections.abc import Sequence


def as_int(value: int | str, name: str, allowed: Sequence[int] | None = None) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"option {name}={value!r} is not an integer") from None
    if allowed is not None and number not in allowed:
        raise ValueError(f"option {name}={number} must be one of {list(allowed)}")
    return number


def as_list(value: str | Sequence[str] | None) -> list[str]:
    """A list option: a sequence, or one comma-separated string; None and '' are empty."""
    if value is None:
        return []
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return [str(item) for item in value]


def as_choice(value: str, name: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"option {name}={value!r} must be one of {list(choices)}")
    return value
