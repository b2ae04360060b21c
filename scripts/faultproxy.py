#!/usr/bin/env python3
"""An HTTP/1.1 proxy on 127.0.0.1 that adds latency, caps bandwidth, injects faults
and counts, between a client and one upstream server (nginx, an S3 server).

This kernel has no netem, so tests and the benchmark put this in the path instead:

* delay: `rtt` seconds before each request is forwarded, and once more when a
  connection is accepted (the handshake's round trip);
* bandwidth: one token bucket shared by every connection caps response bytes/s;
* faults, by rule (the next N matching requests, or a fraction of them): a status
  (503, 429, ...), S3's 503 SlowDown, a connection reset mid-body, a body cut short
  under a correct Content-Length, a stall longer than a client's timeout;
* counters of requests, GETs and body bytes per listener label and per path.

Several labelled listeners share one upstream, so simulated nodes are counted apart.
In a test: `with FaultProxy(("127.0.0.1", port)) as proxy: proxy.url("a")`. From a
shell: `faultproxy.py 127.0.0.1:8080 --rtt-ms 20 --mbit 1000 --label n0 --label n1`
prints one JSON line of ports; `GET /__faultproxy__/counters` on any listener
returns the counters, `POST /__faultproxy__/reset` zeroes them, `POST
/__faultproxy__/rules` (a JSON list of rules) replaces the rules.

HTTP framing is h11's; a response body of known length never passes through it: without
a bandwidth cap or a cut to make, the kernel moves it from the server's socket to the
client's (splice(2) through a pipe, no copy in this process); else it is relayed as it
arrives, in reads of up to 1 MiB. Bytes are counted as they are handed to the client.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import struct
import sys
import threading
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field

import h11

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # its sibling, faultrelay.py
from faultrelay import (  # noqa: E402
    BIG,
    CHUNK,
    Closed,
    Spliced,
    Upstream,
    make_pipe,
    next_event,
    pieces,
    splice,
)

_Closed = Closed

CONTROL = "/__faultproxy__/"
FAULTS = ("status", "slowdown", "reset", "truncate", "stall")
SLOWDOWN_XML = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message><RequestId>faultproxy</RequestId></Error>"
)


@dataclass
class Rule:
    """Which requests get which fault. `count` (the next N matches) or `fraction`."""

    fault: str  # one of FAULTS
    status: int = 503  # for fault "status"
    count: int | None = None
    fraction: float | None = None
    method: str | None = "GET"  # None: any method
    path: str | None = None  # a substring of the request target
    label: str | None = None  # only this listener
    after: float = 0.5  # reset/truncate: cut after this share of the body
    stall_s: float = 30.0

    def __post_init__(self):
        if self.fault not in FAULTS:
            raise ValueError(f"unknown fault {self.fault!r}; one of {', '.join(FAULTS)}")

    def matches(self, label: str, method: str, target: str) -> bool:
        return (
            (self.method is None or self.method == method)
            and (self.label is None or self.label == label)
            and (self.path is None or self.path in target)
        )


@dataclass
class Counts:
    requests: int = 0
    gets: int = 0
    bytes: int = 0  # response body bytes sent to the client
    faults: int = 0


@dataclass
class State:
    rules: list[Rule] = field(default_factory=list)
    counts: dict = field(default_factory=lambda: defaultdict(lambda: defaultdict(Counts)))
    lock: threading.Lock = field(default_factory=threading.Lock)
    rng: random.Random = field(default_factory=lambda: random.Random(0))

    def pick(self, label: str, method: str, target: str) -> Rule | None:
        with self.lock:
            for rule in self.rules:
                if not rule.matches(label, method, target):
                    continue
                if rule.count is not None:
                    if rule.count <= 0:
                        continue
                    rule.count -= 1
                    return rule
                if rule.fraction is not None and self.rng.random() < rule.fraction:
                    return rule
            return None

    def count(self, label: str, path: str, **add: int) -> None:
        with self.lock:
            c = self.counts[label][path]
            for key, n in add.items():
                setattr(c, key, getattr(c, key) + n)

    def snapshot(self) -> dict:
        """{label: {path: {requests, gets, bytes, faults}}}"""
        with self.lock:
            return {label: {path: asdict(c) for path, c in paths.items()} for label, paths in self.counts.items()}


class TokenBucket:
    """Bytes per second shared by every connection of one event loop."""

    def __init__(self, rate: float, burst: float):
        self.rate, self.burst = rate, burst
        self.tokens, self.last = burst, time.monotonic()

    async def take(self, n: int) -> None:
        while True:
            now = time.monotonic()
            self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
            self.last = now
            if self.tokens >= n:
                self.tokens -= n
                return
            await asyncio.sleep((n - self.tokens) / self.rate)


def _length(request: h11.Request, response: h11.Response) -> int | None:
    """The response body's length when the head fixes it (None: chunked, or to the end)."""
    if request.method == b"HEAD" or response.status_code in (204, 304):
        return 0
    if any(k == b"transfer-encoding" for k, _v in response.headers):
        return None
    return next((int(v) for k, v in response.headers if k == b"content-length"), None)


def _keep_alive(response: h11.Response) -> bool:
    close = any(k == b"connection" and b"close" in v.lower() for k, v in response.headers)
    return response.http_version == b"1.1" and not close


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST, not FIN: the peer sees 'connection reset'."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class Handler:
    """One client connection: requests in, upstream responses (or faults) out."""

    def __init__(self, proxy: FaultProxy, label: str, reader, writer):
        self.proxy, self.label, self.reader, self.writer = proxy, label, reader, writer
        writer.transport.set_write_buffer_limits(high=2 * BIG)  # drain() waits less often
        self.client = h11.Connection(h11.SERVER)
        self.up: Upstream | None = None
        self._pipe: tuple[int, int, int] | None = None  # made at the first spliced body

    async def run(self) -> None:
        try:
            if self.proxy.rtt:
                await asyncio.sleep(self.proxy.rtt)  # the connection's handshake
            while True:
                await self.one_request()
                if self.client.our_state is not h11.DONE or self.client.their_state is not h11.DONE:
                    break
                self.client.start_next_cycle()
        except (_Closed, ConnectionError, h11.ProtocolError, asyncio.IncompleteReadError):
            pass
        finally:
            self.writer.close()
            if self.up:
                self.up.close()
            for fd in (self._pipe or ())[:2]:
                os.close(fd)

    def send(self, event) -> None:
        self.writer.write(self.client.send(event))

    async def recv(self, n: int) -> bytes:
        return await self.reader.read(n)

    async def one_request(self) -> None:
        request = await next_event(self.client, self.recv)
        if not isinstance(request, h11.Request):
            raise _Closed
        body = bytearray()
        if self.client.they_are_waiting_for_100_continue:
            self.send(h11.InformationalResponse(status_code=100, headers=[]))
        while not isinstance(event := await next_event(self.client, self.recv), h11.EndOfMessage):
            if isinstance(event, h11.ConnectionClosed):
                raise _Closed
            body += event.data
        method, target = request.method.decode(), request.target.decode("latin-1")
        if target.startswith(CONTROL):
            return await self.control(method, target[len(CONTROL) :], bytes(body))
        path = target.split("?", 1)[0]
        state = self.proxy.state
        state.count(self.label, path, requests=1, gets=int(method == "GET"))
        rule = state.pick(self.label, method, target)
        if rule:
            state.count(self.label, path, faults=1)
        if self.proxy.rtt:
            await asyncio.sleep(self.proxy.rtt)
        if rule and rule.fault in ("status", "slowdown"):
            status = 503 if rule.fault == "slowdown" else rule.status
            payload = SLOWDOWN_XML if rule.fault == "slowdown" else f"injected {status}\n".encode()
            ctype = b"application/xml" if rule.fault == "slowdown" else b"text/plain"
            self.send(
                h11.Response(
                    status_code=status,
                    headers=[(b"Content-Length", str(len(payload)).encode()), (b"Content-Type", ctype)],
                )
            )
            self.send(h11.Data(data=payload))
            self.send(h11.EndOfMessage())
            await self.writer.drain()
            return
        if rule and rule.fault == "stall":
            await asyncio.sleep(rule.stall_s)
            raise _Closed
        await self.forward(request, bytes(body), path, rule)

    async def exchange(self, request: h11.Request, body: bytes):
        """Send the request upstream and read the response head; one retry on a fresh
        connection if a kept-alive one was closed by the server meanwhile."""
        for attempt in (0, 1):
            if self.up is None:
                self.up = await Upstream.connect(self.proxy.upstream)
            up = self.up
            try:
                head = h11.Request(
                    method=request.method, target=request.target, headers=list(request.headers.raw_items())
                )
                out = up.conn.send(head) + (up.conn.send(h11.Data(data=body)) if body else b"")
                await up.send(out + up.conn.send(h11.EndOfMessage()))
                response = await next_event(up.conn, up.recv)
                while isinstance(response, h11.InformationalResponse):
                    response = await next_event(up.conn, up.recv)
                if isinstance(response, h11.Response):
                    return up, response
            except (ConnectionError, h11.ProtocolError):
                if attempt:
                    raise
            up.close()
            self.up = None
        raise _Closed

    async def forward(self, request: h11.Request, body: bytes, path: str, rule: Rule | None) -> None:
        up, response = await self.exchange(request, body)
        self.send(
            h11.Response(
                status_code=response.status_code, reason=response.reason, headers=list(response.headers.raw_items())
            )
        )
        length = _length(request, response)
        cut = int((length or 0) * rule.after) if rule and rule.fault in ("reset", "truncate") else None
        buffered, left = b"", 0
        if length is not None:  # the body's first bytes, read by h11 past the head
            buffered = bytes(up.conn.trailing_data[0][:length])
            left = length - len(buffered)
        if cut is None and self.proxy.bucket is None and length:
            if buffered:
                await self.relay(buffered, path)
            await self.splice(up, left, path)
        else:
            sent = 0
            async for data in pieces(up, length, buffered, left):
                if cut is not None and sent + len(data) >= cut:
                    await self.relay(data[: cut - sent], path)
                    return await self.cut(rule)
                await self.relay(data, path)
                sent += len(data)
            if cut is not None:  # a body shorter than the cut: cut at its end
                return await self.cut(rule)
        self.send(h11.EndOfMessage())
        await self.writer.drain()
        if length is not None and _keep_alive(response):  # exactly the body was read: ready again
            up.conn = h11.Connection(h11.CLIENT)
        elif length is None and up.conn.our_state is h11.DONE and up.conn.their_state is h11.DONE:
            up.conn.start_next_cycle()
        else:
            up.close()
            self.up = None

    async def splice(self, up: Upstream, left: int, path: str) -> None:
        """``left`` body bytes from the server's socket to the client's, moved by the
        kernel through a pipe (no copy here); counted as they enter the pipe."""
        transport = self.writer.transport
        transport.set_write_buffer_limits(high=0)  # the head and earlier bytes out first
        await self.writer.drain()
        transport.set_write_buffer_limits(high=2 * BIG)
        if self._pipe is None:
            self._pipe = make_pipe()
        dst = os.dup(transport.get_extra_info("socket").fileno())  # the loop watches it for us
        clean = False
        try:
            await splice(
                up.sock.fileno(), dst, left, self._pipe, lambda n: self.proxy.state.count(self.label, path, bytes=n)
            )
            clean = True
        finally:
            os.close(dst)
            if not clean:  # the client went away mid-body: the pipe's bytes are dropped with it
                for fd in self._pipe[:2]:
                    os.close(fd)
                self._pipe = None
        self.client.send_with_data_passthrough(h11.Data(data=Spliced(left)))

    async def relay(self, data: bytes, path: str) -> None:
        """Body bytes to the client, at most the bucket's burst at a time; counted first."""
        step = int(self.proxy.bucket.burst) if self.proxy.bucket else len(data) or 1
        for i in range(0, len(data), step):
            piece = data[i : i + step] if step < len(data) else data
            if self.proxy.bucket:
                await self.proxy.bucket.take(len(piece))
            self.proxy.state.count(self.label, path, bytes=len(piece))  # before the client sees it
            for out in self.client.send_with_data_passthrough(h11.Data(data=piece)):
                self.writer.write(out)
            await self.writer.drain()

    async def cut(self, rule: Rule):
        await self.writer.drain()
        if rule.fault == "reset":
            _reset(self.writer)
        raise _Closed  # truncate: a clean FIN before Content-Length bytes

    async def control(self, method: str, what: str, body: bytes) -> None:
        state = self.proxy.state
        if what == "counters":
            reply = state.snapshot()
        elif what == "reset" and method == "POST":
            with state.lock:
                state.counts.clear()
            reply = {}
        elif what == "rules" and method == "POST":
            self.proxy.set_rules([Rule(**r) for r in json.loads(body or b"[]")])
            reply = {}
        else:
            reply = {"error": f"unknown control {method} {what}"}
        payload = json.dumps(reply).encode()
        self.send(
            h11.Response(
                status_code=200 if "error" not in reply else 404,
                headers=[(b"Content-Length", str(len(payload)).encode()), (b"Content-Type", b"application/json")],
            )
        )
        self.send(h11.Data(data=payload))
        self.send(h11.EndOfMessage())
        await self.writer.drain()


class FaultProxy:
    """The proxy, on its own event loop in a thread (`start`/`stop`, or `with`)."""

    def __init__(
        self,
        upstream: tuple[str, int],
        labels=("default",),
        rtt: float = 0.0,
        mbit: float | None = None,
        host: str = "127.0.0.1",
    ):
        self.upstream, self.labels, self.rtt, self.host = upstream, list(labels), rtt, host
        self.mbit = mbit
        self.bucket: TokenBucket | None = None
        self.state = State()
        self.ports: dict[str, int] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self._servers: list[asyncio.base_events.Server] = []
        self._tasks: set[asyncio.Task] = set()
        self._thread: threading.Thread | None = None

    # --- in the loop
    async def _start(self) -> None:
        if self.mbit:
            rate = self.mbit * 1e6 / 8
            self.bucket = TokenBucket(rate, burst=max(CHUNK, rate / 100))
        for label in self.labels:
            server = await asyncio.start_server(
                lambda r, w, label=label: self._track(Handler(self, label, r, w).run()), self.host, 0
            )
            self._servers.append(server)
            self.ports[label] = server.sockets[0].getsockname()[1]

    def _track(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _stop(self) -> None:
        for server in self._servers:
            server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # --- from any thread
    def start(self) -> FaultProxy:
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run():
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(self._start())
            ready.set()
            self.loop.run_forever()

        self._thread = threading.Thread(target=run, name="faultproxy", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("fault proxy did not start")
        return self

    def stop(self) -> None:
        if self.loop and self._thread:
            asyncio.run_coroutine_threadsafe(self._stop(), self.loop).result(10)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()
            self.loop = self._thread = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def url(self, label: str | None = None) -> str:
        return f"http://{self.host}:{self.ports[label or self.labels[0]]}"

    def set_rules(self, rules: list[Rule]) -> None:
        with self.state.lock:
            self.state.rules = list(rules)

    def add_rule(self, **kw) -> Rule:
        rule = Rule(**kw)
        with self.state.lock:
            self.state.rules.append(rule)
        return rule

    def counters(self) -> dict:
        return self.state.snapshot()

    def totals(self, label: str | None = None, path: str | None = None) -> Counts:
        total = Counts()
        for lab, paths in self.counters().items():
            for p, c in paths.items():
                if (label is None or lab == label) and (path is None or p == path):
                    for key, n in c.items():
                        setattr(total, key, getattr(total, key) + n)
        return total

    def reset_counters(self) -> None:
        with self.state.lock:
            self.state.counts.clear()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("upstream", help="HOST:PORT of the server behind the proxy")
    ap.add_argument("--rtt-ms", type=float, default=0.0, help="added round trip per request and per connection")
    ap.add_argument("--mbit", type=float, default=None, help="bandwidth cap in Mbit/s, shared by all connections")
    ap.add_argument("--label", action="append", help="one listener per label (default: one, 'default')")
    ap.add_argument("--rules", default="[]", help="JSON list of fault rules")
    args = ap.parse_args(argv)
    host, _, port = args.upstream.rpartition(":")
    proxy = FaultProxy(
        (host or "127.0.0.1", int(port)), labels=args.label or ["default"], rtt=args.rtt_ms / 1000, mbit=args.mbit
    )
    proxy.set_rules([Rule(**r) for r in json.loads(args.rules)])
    proxy.start()
    print(json.dumps({"ports": proxy.ports}), flush=True)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    proxy.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
