"""Class lists for the generic readers (`folder`, `csv`), which have no fixed class order.

Ids must mean the same thing in every split of a dataset (and, with an explicit list, the same
thing as in another dataset one wants to combine with), so the list is either given or inferred
once from all splits together — never per split.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

from .options import as_list


def class_list(explicit: str | Sequence[str] | None, found: Iterable[str]) -> list[str]:
    """The explicit list as given, else the sorted names found."""
    names = as_list(explicit)
    if names:
        if len(set(names)) != len(names):
            raise ValueError(f"option classes={names} repeats a name")
        return names
    return sorted(set(found))
