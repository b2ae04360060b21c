"""The fault proxy's byte moving (scripts/faultproxy.py): its own upstream connection
on a plain socket, a response body in pieces, and a body spliced from the server's
socket to the client's through a pipe, without a copy in this process."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import socket

import h11

CHUNK = 64 * 1024  # reads of requests and of framed (chunked) bodies
BIG = 1 << 20  # reads of a body of known length: relayed as it comes, without h11
PIPE = 1 << 20  # the splice pipe's size (F_SETPIPE_SZ), at most what the system allows


class Closed(Exception):
    """The client connection is done (closed, faulted, or not reusable)."""


async def next_event(conn: h11.Connection, recv):
    """h11's next event, feeding it ``await recv(CHUNK)`` as it needs."""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await recv(CHUNK))
            continue
        return event


class Upstream:
    """One connection to the server: a plain non-blocking socket of this proxy's own
    (no stream buffer holds body bytes apart from h11's, so the rest can be spliced)."""

    def __init__(self, sock: socket.socket):
        self.sock, self.conn = sock, h11.Connection(h11.CLIENT)
        self.loop = asyncio.get_running_loop()

    @classmethod
    async def connect(cls, addr: tuple[str, int]) -> Upstream:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, addr)
        except BaseException:
            sock.close()
            raise
        return cls(sock)

    async def recv(self, n: int) -> bytes:
        return await self.loop.sock_recv(self.sock, n)

    async def send(self, data: bytes) -> None:
        await self.loop.sock_sendall(self.sock, data)

    def close(self) -> None:
        self.sock.close()


async def body(up: Upstream, length: int | None, left: int):
    """The response body in pieces: h11's Data events when its length is unknown, else
    the ``left`` bytes still on the socket as they come, in reads h11 never parses."""
    if length is None:
        while not isinstance(event := await next_event(up.conn, up.recv), h11.EndOfMessage):
            if not isinstance(event, h11.Data):
                raise Closed
            yield bytes(event.data)
        return
    while left > 0:
        data = await up.recv(min(BIG, left))
        if not data:  # the server closed early: the client sees a short body
            raise Closed
        left -= len(data)
        yield data


async def pieces(up: Upstream, length: int | None, buffered: bytes, left: int):
    """The whole body in pieces: what h11 read past the head, then the socket's."""
    if buffered:
        yield buffered
    async for data in body(up, length, left):
        yield data


class Spliced:
    """What h11 is told was sent when the kernel moved the bytes (h11's sendfile idiom)."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n


async def ready(loop: asyncio.AbstractEventLoop, readable: int | None, writable: int | None) -> None:
    """Wait until ``readable`` can be read or ``writable`` written (either; None: not watched)."""
    fut = loop.create_future()

    def wake() -> None:
        if not fut.done():
            fut.set_result(None)

    if readable is not None:
        loop.add_reader(readable, wake)
    if writable is not None:
        loop.add_writer(writable, wake)
    try:
        await fut
    finally:
        if readable is not None:
            loop.remove_reader(readable)
        if writable is not None:
            loop.remove_writer(writable)


def make_pipe() -> tuple[int, int, int]:
    """A non-blocking pipe: read end, write end, its size."""
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE)
    except OSError:
        pass  # the default size (64 KiB) works, in more steps
    return r, w, fcntl.fcntl(w, fcntl.F_GETPIPE_SZ)


async def splice(src: int, dst: int, left: int, pipe: tuple[int, int, int], count) -> None:
    """Move ``left`` bytes from socket ``src`` to socket ``dst`` through ``pipe`` (read
    end, write end, size), each step's bytes handed to ``count(n)`` as they enter the
    pipe (before the client can see them). Closed when either side goes away (the pipe
    may then hold bytes: close it, do not reuse it).

    Fill, then drain, one pipeful at a time: a pipe into which a socket spliced may be
    full (of slots) long before its size in bytes, so only an empty pipe is filled, and
    a step waits on the one side that blocks it (no spinning on the other). Each pipeful
    yields to the loop, so one long body does not hold up every other connection."""
    pr, pw, cap = pipe
    loop = asyncio.get_running_loop()
    flags = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
    while left > 0:
        try:
            n = os.splice(src, pw, min(left, cap), flags=flags)
        except BlockingIOError:
            await ready(loop, src, None)
            continue
        if n == 0:  # the server closed early: the client sees a short body
            raise Closed
        left -= n
        count(n)
        while n:
            try:
                n -= os.splice(pr, dst, n, flags=flags)
            except BlockingIOError:
                await ready(loop, None, dst)
            except OSError as exc:
                if exc.errno in (errno.EPIPE, errno.ECONNRESET):
                    raise Closed from None
                raise
        await asyncio.sleep(0)
