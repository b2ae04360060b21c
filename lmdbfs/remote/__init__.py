"""Remote DBs (``s3://``, ``http(s)://``): a byte source under a layer, read through a
persistent local block cache (docs/remote.md)."""

from .url import is_url, redact

__all__ = ["is_url", "redact"]
