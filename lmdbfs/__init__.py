"""lmdbfs: pack a tree of millions of small files into one LMDB file, read it back
through a path index, or mount it read-only over FUSE so loaders work unchanged."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from .errors import LmdbfsError  # noqa: E402

if TYPE_CHECKING:
    from .read.reader import Archive
    from .read.tree import Tree

__all__ = ["Archive", "LmdbfsError", "open", "__version__"]


def open(*dbs: Any, **kwargs: Any) -> Tree:  # noqa: A001 - the API's name
    """Open packed DBs for reading: ``open("got10k.lmdb")`` gives an `Archive`;
    several DBs (``open("a.lmdb", "b.lmdb")``, ``open(["got10k.0.lmdb", ...])``) or
    DBs under folders (``open("got10k=GOT-10k.lmdb", "lasot=LaSOT.lmdb")``) give one
    `lmdbfs.read.union.Union` tree with the same API (both are `lmdbfs.read.tree.Tree`s)."""
    from .read.union import open_tree

    return open_tree(*dbs, **kwargs)


def __getattr__(name: str) -> Any:
    # Imported on first use, so `lmdbfs mount` and `--help` do not pay for numpy.
    if name == "Archive":
        from .read.reader import Archive

        return Archive
    raise AttributeError(f"module 'lmdbfs' has no attribute {name!r}")
