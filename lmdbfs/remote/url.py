"""Remote DB addresses: ``s3://BUCKET/KEY``, ``http://HOST/PATH``, ``https://HOST/PATH``.

A URL may carry secrets (user info, a presigned query string); `RemoteURL.shown` is the
form every log line, error, cache key and /proc/mounts entry uses: scheme, host (and
port), path — never the user info, the query or the fragment.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from ..errors import BadDatabase

SCHEMES = ("s3", "http", "https")


def is_url(text: str | os.PathLike[str]) -> bool:
    """True for a remote DB's address (a path never starts with a scheme and ``://``)."""
    if not isinstance(text, str):
        return False
    scheme, sep, _rest = text.partition("://")
    return bool(sep) and scheme.lower() in SCHEMES


@dataclass(frozen=True)
class RemoteURL:
    scheme: str  # "s3", "http" or "https"
    host: str  # the bucket for s3://, else host[:port]
    path: str  # the key for s3:// (no leading slash), else the path (leading slash)
    full: str  # as given, secrets included: handed to the client only, never shown

    @property
    def shown(self) -> str:
        """The URL without user info, query string or fragment."""
        if self.scheme == "s3":
            return f"s3://{self.host}/{self.path}"
        return urlunsplit((self.scheme, self.host, self.path, "", ""))

    def __str__(self) -> str:
        return self.shown

    def __repr__(self) -> str:
        return f"RemoteURL({self.shown!r})"


def redact(text: str) -> str:
    """``text`` with user info and query strings of any URL in it removed (the CLI's
    echo of arguments, mount options)."""
    if not is_url(text):
        return text
    try:
        return parse(text).shown
    except BadDatabase:
        return text.split("://", 1)[0] + "://…"


def parse(text: str) -> RemoteURL:
    """Check and split a remote DB's URL; one line naming the problem otherwise."""
    scheme = text.partition("://")[0].lower()
    try:
        parts = urlsplit(text)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        raise BadDatabase(
            f"{scheme}://…: not a valid URL", "write it as s3://BUCKET/KEY or https://HOST/PATH"
        ) from None
    if scheme not in SCHEMES:
        raise BadDatabase(f"{scheme}://…: unsupported URL scheme", "use s3://, http:// or https://")
    netloc = host if port is None else f"{host}:{port}"
    if ":" in host:  # an IPv6 literal
        netloc = f"[{host}]" if port is None else f"[{host}]:{port}"
    if scheme == "s3":
        key = parts.path.lstrip("/")
        if not host or not key:
            raise BadDatabase(f"s3://{host}/{key}: needs a bucket and a key", "write it as s3://BUCKET/KEY")
        if parts.query or parts.username or parts.password:
            raise BadDatabase(
                f"s3://{host}/{key}: an s3:// URL takes no query or user info",
                "give credentials through AWS_* variables or ~/.aws",
            )
        return RemoteURL("s3", host, key, text)
    if not host or not parts.path or parts.path.endswith("/"):
        shown = urlunsplit((scheme, netloc, parts.path, "", ""))
        raise BadDatabase(f"{shown}: names no file", "give the URL of the DB file itself")
    return RemoteURL(scheme, netloc, parts.path, text)
