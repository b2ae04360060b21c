"""lmdbfs: pack a tree of millions of small files into one LMDB file, read it back
through a path index, or mount it read-only over FUSE so loaders work unchanged."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from .errors import LmdbfsError  # noqa: E402

if TYPE_CHECKING:
    from .reader import Archive

__all__ = ["Archive", "LmdbfsError", "open", "__version__"]


def open(path: Any, **kwargs: Any) -> Archive:  # noqa: A001 - the API's name
    """Open a packed DB for reading (see `lmdbfs.reader.Archive`)."""
    from .reader import Archive

    return Archive(path, **kwargs)


def __getattr__(name: str) -> Any:
    # Imported on first use, so `lmdbfs mount` and `--help` do not pay for numpy.
    if name == "Archive":
        from .reader import Archive

        return Archive
    raise AttributeError(f"module 'lmdbfs' has no attribute {name!r}")
