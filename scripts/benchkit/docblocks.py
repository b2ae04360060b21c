"""Sections of docs/benchmarks.md that one script writes and the others keep as they are:
each lives between a begin and an end marker (an HTML comment), its heading inside them."""

from __future__ import annotations


def kept_block(old: str, begin: str, end: str) -> str | None:
    """The block between two markers of an existing benchmarks.md, markers included; None
    when it is absent or empty."""
    if begin not in old or end not in old:
        return None
    inner = old.split(begin, 1)[1].split(end, 1)[0]
    return f"{begin}{inner}{end}" if inner.strip() else None


def replace_block(text: str, block: str, begin: str, end: str, before: str = "## How to reproduce") -> str:
    """``text`` with ``block`` (markers included) in place of the old block between the
    markers, or, when there is none, before the heading ``before``, or at the end."""
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        return head + block + rest.split(end, 1)[1]
    if before in text:
        head, tail = text.split(before, 1)
        return f"{head}{block}\n\n{before}{tail}"
    return text.rstrip("\n") + "\n\n" + block + "\n"
