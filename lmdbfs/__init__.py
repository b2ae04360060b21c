"""lmdbfs: pack a tree of millions of small files into one LMDB file, read it back
through a path index, or mount it read-only over FUSE so loaders work unchanged."""

__version__ = "0.1.0"

from .errors import LmdbfsError  # noqa: E402
from .reader import Archive, open  # noqa: E402,A004

__all__ = ["Archive", "LmdbfsError", "open", "__version__"]
