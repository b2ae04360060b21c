"""Ranged reads of one remote object, through obstore (Rust's object_store): S3 with
SigV4 signing and HTTP(S), timeouts, retries with backoff and jitter. Credentials and
the endpoint are resolved by botocore, the way the AWS tools resolve them.

Every read names the object version seen at open: S3 and HTTP alike send If-Match with
its ETag, so a replaced object fails the read (412) instead of mixing its bytes with
the old ones. A reply of another length than asked is never returned.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import random
import re
import sys
import threading
import time
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

from ..errors import RemoteChanged, RemoteError
from .url import RemoteURL

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = timedelta(seconds=5)
# A whole ranged GET (at most a few MiB); LMDBFS_REMOTE_TIMEOUT (seconds) overrides it.
REQUEST_TIMEOUT = timedelta(seconds=float(os.environ.get("LMDBFS_REMOTE_TIMEOUT") or 20))
RETRIES = 4  # obstore's own retries of 5xx, 429 and connection errors, with backoff + jitter
ATTEMPTS = 3  # ours around them: short bodies, broken bodies, what obstore gave up on
_BACKOFF = (0.2, 2.0)  # our jittered wait between attempts: base, cap (s)


@dataclass(frozen=True)
class ObjectInfo:
    size: int
    etag: str  # the version: the ETag, else "mtime:<last-modified>"
    if_match: str | None  # what GETs send as If-Match (None: the server gave no ETag)


class _SinkFailed(Exception):
    """get_into's sink raised (args[0]): not the network's failure, so not retried."""


def _status(exc: BaseException) -> int | None:
    m = re.search(r"status(?: code)?:? (\d{3})", str(exc))
    return int(m.group(1)) if m else None


class Client:
    """One remote object. Thread-safe: the requests run on one event loop per process."""

    def __init__(self, url: RemoteURL) -> None:
        self.url = url
        self._store, self._path = _make_store(url)

    # -- open ---------------------------------------------------------------------------
    def head(self) -> ObjectInfo:
        """Size and version of the object, or one line naming the URL and the fix."""
        return run(self.head_async())

    async def head_async(self) -> ObjectInfo:
        """`head` on the running loop (several objects' HEADs in flight together). The
        RemoteError's ``status`` is the server's 404 or 403 when it answered one."""
        import obstore
        from obstore import exceptions as ox

        try:
            meta = await _rust(obstore.head_async, self._store, self._path)
        except ox.NotFoundError:
            raise self._missing() from None
        except (ox.PermissionDeniedError, ox.UnauthenticatedError):
            raise self._denied(403) from None
        except Exception as exc:  # noqa: BLE001 - obstore's own types: classified below
            raise self._open_error(exc) from None
        etag = meta.get("e_tag")
        if etag:
            return ObjectInfo(int(meta["size"]), etag, etag)
        return ObjectInfo(int(meta["size"]), f"mtime:{meta.get('last_modified')}", None)

    def sibling(self, suffix: str) -> Client:
        """The object named as this one plus ``suffix`` (a sidecar beside it), on the
        same store: the same credentials and connections, no second set-up."""
        other = object.__new__(Client)
        other.url = replace(self.url, path=self.url.path + suffix, full=self.url.full + suffix)
        other._store, other._path = self._store, self._path + suffix
        return other

    def _missing(self) -> RemoteError:
        return _with_status(RemoteError(f"{self.url}: no such object (404)", "check the bucket, key or path"), 404)

    def _denied(self, code: int) -> RemoteError:
        return _with_status(RemoteError(f"{self.url}: access denied ({code})", self._denied_hint()), 403)

    def _denied_hint(self) -> str:
        if self.url.scheme == "s3":
            return "set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE to credentials that may read it"
        return "the server refuses it: check the URL and the server's permissions"

    def _open_error(self, exc: BaseException) -> RemoteError:
        code = _status(exc)
        if code in (401, 403):
            return self._denied(code)
        if code == 404:
            return self._missing()
        if code is not None:
            return RemoteError(f"{self.url}: the server answered {code}", "retry later, or check the server")
        fix = "check the host, the port and the network"
        if self.url.scheme == "s3":
            fix += " (AWS_ENDPOINT_URL for a server other than AWS)"
        return RemoteError(f"{self.url}: cannot reach the server", fix)

    # -- reads --------------------------------------------------------------------------
    async def get_async(self, start: int, end: int, info: ObjectInfo) -> memoryview:
        """Bytes [start, end) of the object version ``info``, exactly; retried with
        backoff and jitter, bounded. RemoteChanged when the object was replaced,
        RemoteError when it still fails."""
        return await self._get(start, end, info, None, 0)

    async def get_into(self, start: int, end: int, info: ObjectInfo, sink: Any, chunk: int) -> None:
        """Bytes [start, end) as `get_async`, handed to ``sink(position, piece)`` as they
        arrive in pieces of at least ``chunk`` bytes, in order, each piece still in the
        processor's cache (no buffer of the whole GET gathered and read again). An
        attempt that fails midway starts over at ``start``: the sink may see a position
        twice, and only a call that returns had all of [start, end)."""
        await self._get(start, end, info, sink, chunk)

    async def _get(self, start: int, end: int, info: ObjectInfo, sink: Any, chunk: int) -> memoryview | None:
        import obstore
        from obstore import exceptions as ox

        options: dict[str, Any] = {"range": (start, end)}
        if info.if_match:
            options["if_match"] = info.if_match
        why = ""
        for attempt in range(ATTEMPTS):
            if attempt:
                cap = min(_BACKOFF[1], _BACKOFF[0] * 2**attempt)
                await asyncio.sleep(random.uniform(cap / 2, cap))
            got = 0
            try:
                result = await _rust(obstore.get_async, self._store, self._path, options=options)
                if info.if_match is None and result.meta.get("size") not in (None, info.size):
                    raise RemoteChanged(f"{self.url}: the object changed since it was opened", "mount it again")
                if sink is None:
                    data = memoryview(await _rust(result.bytes_async))  # obstore's buffer, not copied
                    got = len(data)
                else:
                    async for piece in _pieces(result.stream(min_chunk_size=chunk)):
                        view = memoryview(piece)
                        if got + len(view) > end - start:
                            got += len(view)
                            break
                        try:
                            sink(start + got, view)
                        except BaseException as exc:
                            raise _SinkFailed(exc) from None
                        got += len(view)
            except _SinkFailed as exc:  # the cache's failure (a full disk): no retry
                raise exc.args[0] from None
            except ox.PreconditionError:
                raise RemoteChanged(f"{self.url}: the object changed since it was opened", "mount it again") from None
            except (ox.NotFoundError, ox.PermissionDeniedError, ox.UnauthenticatedError) as exc:
                raise RemoteChanged(
                    f"{self.url}: the object is gone or denied since it was opened ({type(exc).__name__})",
                    "mount it again",
                ) from None
            except RemoteError:
                raise
            except Exception as exc:  # noqa: BLE001 - a network or server failure: retried
                code = _status(exc)
                why = f"status {code}" if code else type(exc).__name__
                if code == 412:
                    raise RemoteChanged(
                        f"{self.url}: the object changed since it was opened", "mount it again"
                    ) from None
                continue
            if got == end - start:
                return data if sink is None else None
            why = f"{got} bytes where {end - start} were asked"
        raise RemoteError(f"{self.url}: bytes {start}-{end - 1} failed after retries ({why})", "check the server")

    def get(self, start: int, end: int, info: ObjectInfo) -> bytes:
        return bytes(run(self.get_async(start, end, info)))


def _with_status(err: RemoteError, status: int) -> RemoteError:
    err.status = status  # type: ignore[attr-defined]
    return err


def _make_store(url: RemoteURL) -> tuple[Any, str]:
    from obstore.store import HTTPStore, S3Store

    client: dict[str, Any] = {"connect_timeout": CONNECT_TIMEOUT, "timeout": REQUEST_TIMEOUT}
    retry = {
        "max_retries": RETRIES,
        "retry_timeout": timedelta(seconds=20),
        "backoff": {"init_backoff": timedelta(milliseconds=100), "max_backoff": timedelta(seconds=2), "base": 2},
    }
    if url.scheme != "s3":
        from urllib.parse import urlsplit

        parts = urlsplit(url.full)
        if parts.query:
            raise RemoteError(f"{url}: URLs with a query string are not supported", "give the plain URL of the file")
        if parts.username or parts.password:
            raise RemoteError(f"{url}: user info in an http(s) URL is not supported", "serve the file without it")
        base, _, name = url.path.rpartition("/")
        client["allow_http"] = url.scheme == "http"
        return HTTPStore(f"{url.scheme}://{url.host}{base}/", client_options=client, retry_config=retry), name
    return _s3_store(url, client, retry, S3Store), url.path


def _s3_store(url: RemoteURL, client: dict, retry: dict, S3Store: Any) -> Any:  # noqa: N803
    """Credentials, region and endpoint the AWS way: AWS_* variables, AWS_PROFILE,
    ~/.aws/credentials and config; unsigned requests when there are no credentials."""
    import boto3
    import botocore.exceptions

    try:
        session = boto3.Session()
        region = session.region_name or "us-east-1"
        endpoint = session.client("s3", region_name=region).meta.endpoint_url
        creds = session.get_credentials()
    except botocore.exceptions.BotoCoreError as exc:
        raise RemoteError(
            f"{url}: the AWS configuration cannot be read ({type(exc).__name__})", "fix ~/.aws or AWS_PROFILE"
        ) from None
    config: dict[str, Any] = {"region": region}
    if endpoint and "amazonaws.com" not in endpoint:  # AWS_ENDPOINT_URL: another S3 server
        config["endpoint"] = endpoint.rstrip("/")
        config["virtual_hosted_style_request"] = False
        client["allow_http"] = endpoint.startswith("http://")
    provider = None
    if creds is None:
        config["skip_signature"] = True
    else:
        from obstore.auth.boto3 import Boto3CredentialProvider

        provider = Boto3CredentialProvider(session)
    return S3Store(url.host, config=config, client_options=client, retry_config=retry, credential_provider=provider)


# -- one event loop per process, in a daemon thread ---------------------------------------
# obstore runs each call on its Rust runtime's threads, which hand the result to the loop
# with call_soon_threadsafe; that call lets go of the GIL to wake the loop and takes it
# back after. A Rust thread that wants the GIL once the interpreter is finalizing is made
# to exit, which aborts the process (SIGABRT after a program's last line: one exit in
# five of a short script on a busy machine). So every obstore call under way and every
# thread inside call_soon_threadsafe is counted, and the interpreter's exit waits
# (_quiesce, an atexit handler) until none is left. The count is over-cautious, never
# short: a call is counted from before it starts until its result reached the loop.
_BUSY_LOCK = threading.Lock()
_BUSY = [0]
QUIESCE_S = 5.0  # at most this long, then the exit goes on as before


def _busy(step: int) -> None:
    with _BUSY_LOCK:
        _BUSY[0] += step


async def _rust(call: Any, *args: Any, **kwargs: Any) -> Any:
    """Await one obstore call, counted until its result reached the loop. A caller that
    is cancelled stops waiting, but the call goes on on the Rust side (and will hand its
    result to the loop), so it stays counted until then."""
    _busy(1)
    try:
        fut = asyncio.ensure_future(call(*args, **kwargs))
    except BaseException:
        _busy(-1)
        raise
    fut.add_done_callback(_rust_done)
    try:
        return await asyncio.shield(fut)
    finally:
        # A call that raised (every body stream ends with StopAsyncIteration) leaves
        # fut -> exception -> traceback -> this frame -> fut: a cycle only a full
        # collection frees, holding the stream and its connection's buffers meanwhile
        # (full-size tree: 230 ended streams, 52 MB of the daemon's 121 MB anonymous).
        del fut


async def _pieces(stream: Any) -> Any:
    """obstore's body stream, each step counted as one call (_rust)."""
    it = stream.__aiter__()
    while True:
        try:
            piece = await _rust(it.__anext__)
        except StopAsyncIteration:
            return
        yield piece


def _rust_done(fut: asyncio.Future) -> None:
    _busy(-1)
    if not fut.cancelled():
        fut.exception()  # taken, so a result nobody waits for any more is not reported


class _Loop(asyncio.SelectorEventLoop):
    def call_soon_threadsafe(self, callback: Any, *args: Any, context: Any = None) -> Any:
        _busy(1)
        try:
            return super().call_soon_threadsafe(callback, *args, context=context)
        finally:
            _busy(-1)


def _wait_idle(deadline: float) -> None:
    while _BUSY[0] > 0 and time.monotonic() < deadline:
        time.sleep(0.002)  # the GIL is free meanwhile: a Rust thread waiting for it finishes


def _quiesce() -> None:
    """At exit: let obstore's calls finish, stop the loop, and wait until no Rust thread
    is inside Python any more (bounded by QUIESCE_S)."""
    if not used():
        return
    deadline = time.monotonic() + QUIESCE_S
    _wait_idle(deadline)
    _stop_loop()
    _wait_idle(deadline)


def _stop_loop() -> None:
    if _LOOP is not None and _LOOP_THREAD[0] is not None and _LOOP_THREAD[0].is_alive():
        _LOOP.call_soon_threadsafe(_LOOP.stop)
        _LOOP_THREAD[0].join(timeout=5)


_LOOP: asyncio.AbstractEventLoop | None = None
_LOOP_PID = -1
_LOOP_LOCK = threading.Lock()
_LOOP_THREAD: list[threading.Thread | None] = [None]


def loop() -> asyncio.AbstractEventLoop:
    """The process's event loop for remote requests (started at first use, again after fork)."""
    global _LOOP, _LOOP_PID

    with _LOOP_LOCK:
        if _LOOP is None or _LOOP_PID != os.getpid():
            _reuse_large_buffers()
            if _LOOP is None:
                atexit.register(_quiesce)
            _BUSY[0] = 0  # after a fork: the parent's calls are not this process's
            new = _Loop()
            thread = threading.Thread(target=new.run_forever, name="lmdbfs-remote-io", daemon=True)
            thread.start()
            _LOOP_THREAD[0] = thread
            _LOOP, _LOOP_PID = new, os.getpid()
        return _LOOP


def used() -> bool:
    """Whether this process has started the remote loop (and so obstore's runtime)."""
    return _LOOP is not None and _LOOP_PID == os.getpid()


def exit_process(code: int) -> None:
    """End a command that used a remote DB: stop the loop, flush, run the atexit
    handlers, then `os._exit`. obstore's Rust runtime keeps worker threads that the
    C library's exit handlers do not wait for; a normal exit then sometimes tore the
    process down under them (SIGABRT or SIGBUS after the command had printed its last
    line, about one exit in ten on a loaded machine)."""
    atexit.unregister(_quiesce)  # os._exit below: no interpreter exit to wait for
    _stop_loop()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    atexit._run_exitfuncs()  # noqa: SLF001 - what a normal exit runs first
    os._exit(code)


def _reuse_large_buffers() -> None:
    """Keep a GET's body buffers (up to MAX_GET) in malloc's heap instead of a fresh
    mmap each: glibc maps every buffer above its threshold anew and unmaps it when
    freed, so each page of every GET was faulted in and zeroed again. In the mount
    daemon (whose own setting, 64 KiB, the C server leaves alone once this ran),
    medium tree, cold epoch streamed at +20 ms: 1.0-1.26 million page faults -> 14-22
    thousand, daemon 2.1-3.2 -> 1.5-1.65 CPU s per GB. The heap's top is handed back
    past 8 MB free (64 MB kept the full-size daemon above 150 MB), the rest of it by
    `release_free_memory`. No-op where the C library is not glibc."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.mallopt(_M_MMAP_THRESHOLD, 16 << 20)
        libc.mallopt(_M_TRIM_THRESHOLD, 8 << 20)
    except (OSError, AttributeError):
        pass


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


def release_free_memory() -> None:
    """Hand the C heap's free pages back to the system (glibc's malloc_trim): glibc
    gives back only the heap's top by itself, and freed buffers in the middle of it stay
    resident: after the full-size index was fetched at open (116 MB in 21 GETs) the
    mount daemon held 138 MB anonymous, 70 MB after a trim. The fetcher calls it now and
    then too. No-op where the C library is not glibc."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def run(coro: Any) -> Any:
    """Run a coroutine on the process's remote loop and wait for its result."""
    return asyncio.run_coroutine_threadsafe(coro, loop()).result()
