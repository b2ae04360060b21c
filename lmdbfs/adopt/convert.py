"""Turning the md5 converter's values back into files.

The original GOT-10k converter did not store files: it stored ``groundtruth.txt`` as
float32 array bytes (``pandas.read_csv(..., dtype=float32).values.tobytes()``),
``*.label`` as uint8 array bytes, ``meta_info.ini`` as ``pickle.dumps(readlines())``
and JPEGs re-encoded by PIL. `lmdbfs adopt --paths` serves such a DB as files again:
these functions rebuild text that the GOT-10k toolkit and pytracking parse to the same
numbers (boxes to float32 precision). JPEGs and anything else are served as stored.

The pickles are never unpickled: ``pickle.loads`` runs whatever a crafted value asks
for (a GLOBAL opcode imports any callable, REDUCE calls it), and a DB is untrusted
input. `lines_from_pickle` instead walks the opcodes with ``pickletools.genops``
(which only decodes them) and accepts exactly what ``pickle.dumps`` of a list of str
produces; anything else is refused.
"""

from __future__ import annotations

import os
import pickletools
import struct

import numpy as np

BOX_COLUMNS = 4  # groundtruth.txt rows: x, y, w, h
_TEXT_CONTROLS = frozenset(b"\t\n\r")

_STRING_OPS = frozenset({"UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8"})
_PUT_OPS = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})
_GET_OPS = frozenset({"GET", "BINGET", "LONG_BINGET"})


class ConvertError(ValueError):
    """A value that does not have the shape the converter gave files of its kind."""


def _is_text(value: bytes) -> bool:
    """Stored as is (the converter kept files it could not parse, e.g. list.txt)?

    Float32 and uint8 array bytes hold control bytes (0.0 is four NULs, labels are
    0-8), so UTF-8 text without control characters is taken to be the file itself."""
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return bool(text.strip()) and all(ord(c) >= 0x20 or ord(c) in _TEXT_CONTROLS for c in text)


def boxes_text(value: bytes, columns: int = BOX_COLUMNS) -> bytes:
    """float32 rows -> 'x,y,w,h' lines with 4 decimals, like GOT-10k's own files.

    A number whose 4-decimal text would parse to another float32 (8 significant
    digits, e.g. 1234.5678) is written with the digits that give back the same one."""
    if len(value) % 4:
        raise ConvertError(f"{len(value)} bytes is not a whole number of float32 values")
    values = np.frombuffer(value, dtype="<f4")
    texts = np.char.mod("%.4f", values).tolist()
    back = np.array(texts, dtype=np.float64).astype(np.float32)
    for i in np.flatnonzero((back != values) & ~np.isnan(values)).tolist():
        texts[i] = np.format_float_positional(values[i], unique=True, trim="-")
    width = columns if len(texts) % columns == 0 else max(len(texts), 1)
    return "".join(",".join(texts[i : i + width]) + "\n" for i in range(0, len(texts), width)).encode()


def labels_text(value: bytes) -> bytes:
    """uint8 array -> one number per line."""
    return "".join(f"{v}\n" for v in value).encode()


def lines_from_pickle(value: bytes) -> list[str]:
    """The list of str a pickle of ``readlines()`` holds, read without unpickling."""
    stack: list[object] = []
    marks: list[int] = []
    memo: dict[int, object] = {}
    try:
        for op, arg, _pos in pickletools.genops(value):
            name = op.name
            if name in ("PROTO", "FRAME"):
                continue
            if name == "STOP":
                break
            if name == "EMPTY_LIST":
                stack.append([])
            elif name == "MARK":
                marks.append(len(stack))
            elif name == "LIST":  # protocol 0/1: MARK items... LIST
                at = marks.pop()
                items = stack[at:]
                del stack[at:]
                stack.append(items)
            elif name in _STRING_OPS:
                stack.append(arg)
            elif name == "APPEND":
                item = stack.pop()
                _list_on(stack).append(item)
            elif name == "APPENDS":
                at = marks.pop()
                items = stack[at:]
                del stack[at:]
                _list_on(stack).extend(items)
            elif name in _PUT_OPS:
                memo[arg] = stack[-1]
            elif name == "MEMOIZE":
                memo[len(memo)] = stack[-1]
            elif name in _GET_OPS:
                stack.append(memo[arg])
            else:
                raise ConvertError(f"the pickle holds {name}, not just a list of strings (not unpickled)")
        else:
            raise ConvertError("the pickle has no STOP")
    except ConvertError:
        raise
    except (ValueError, IndexError, KeyError, TypeError, struct.error) as exc:
        raise ConvertError(f"not a readable pickle ({exc})") from None
    if len(stack) != 1 or not isinstance(stack[0], list) or not all(isinstance(x, str) for x in stack[0]):
        raise ConvertError("the pickle is not a list of strings")
    return stack[0]


def _list_on(stack: list[object]) -> list[object]:
    if not stack or not isinstance(stack[-1], list):
        raise ConvertError("the pickle appends to something that is not a list")
    return stack[-1]


def restore(name: str, value: bytes) -> bytes | None:
    """The original file's bytes for a value the converter transformed, judged by the
    file's extension; None when the value is served as stored (JPEGs and the rest)."""
    ext = os.path.splitext(name)[1].lower()
    if ext == ".ini":
        try:
            return "".join(lines_from_pickle(value)).encode("utf-8", "surrogateescape")
        except ConvertError:
            if _is_text(value):
                return None
            raise
    if ext in (".txt", ".label") and not _is_text(value):
        return boxes_text(value) if ext == ".txt" else labels_text(value)
    return None
