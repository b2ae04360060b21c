"""Checking parsed JSON from an untrusted file against the fields a record expects.

Generic on purpose (it knows nothing of lmdbfs records): `meta.Meta.decode` gives it
each field's type and range. Nothing here recurses, so any nesting is safe to check.
"""

from __future__ import annotations

from typing import Any

INT64_MAX = (1 << 63) - 1
STR_MAX = 4096  # characters in one string field


def depth(value: Any, stop: int) -> int:
    """Nesting depth of parsed JSON (a scalar is 1), counted no further than ``stop`` + 1."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        item, level = todo.pop()
        deepest = max(deepest, level)
        if level <= stop and isinstance(item, dict | list):
            todo.extend((child, level + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def field_problem(
    data: dict[str, Any],
    types: dict[str, tuple[type, ...]],
    ranges: dict[str, tuple[int, int]],
    choices: dict[str, tuple[Any, ...]],
    max_depth: int,
) -> str | None:
    """What is wrong with ``data``'s fields, or None.

    Each field present must be exactly one of its ``types`` (bool is not an int here);
    ints within their range (default 0..2^63-1), strings at most STR_MAX characters,
    values listed in ``choices`` one of those, and the whole at most ``max_depth`` deep."""
    if depth(data, max_depth) > max_depth:
        return f"nested deeper than {max_depth} levels"
    for name, allowed in types.items():
        if name not in data:
            continue
        value = data[name]
        if type(value) not in allowed:
            return f"{name} is {value!r:.40}"
        low, high = ranges.get(name, (0, INT64_MAX))
        if type(value) is int and not low <= value <= high:
            return f"{name} is {value} (out of range)"
        if isinstance(value, str) and len(value) > STR_MAX:
            return f"{name} is {len(value)} characters long"
        if name in choices and value not in choices[name]:
            return f"{name} is {value!r:.40}"
    return None
