"""The remote test infrastructure itself: real nginx, real SeaweedFS S3, the fault proxy.

Each server serves ranges byte-exact and is counted; each fault of the proxy really
happens on the wire; its counters count; its delay and bandwidth cap hold (asserted
only as generous lower bounds on elapsed time). Every server stops with its block,
also when the block raises.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from botocore.exceptions import ClientError

from tests.conftest import ROOT, load_script
from tests.servers import _port_open, nginx, s3

pytestmark = pytest.mark.slow  # real nginx and S3 servers

faultproxy = load_script("faultproxy")

DATA = os.urandom(3_000_000)


def get(port: int, path: str, headers: dict | None = None, timeout: float = 30):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    conn.request("GET", path, headers=headers or {})
    resp = conn.getresponse()
    return conn, resp


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A zombie is gone too (its parent reaped it in stop_group; this is belt and braces).
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(") ", 1)[1].startswith("Z")


@pytest.fixture
def served(nginx_server):
    (nginx_server.root / "d").mkdir(parents=True)
    (nginx_server.root / "d" / "blob.bin").write_bytes(DATA)
    return nginx_server


# --- nginx


def test_nginx_serves_ranges_byte_exact_with_etag_and_counts_them(served):
    _, resp = get(served.port, "/d/blob.bin", {"Range": "bytes=1000-1999"})
    assert resp.status == 206
    assert resp.headers["Content-Range"] == f"bytes 1000-1999/{len(DATA)}"
    assert resp.read() == DATA[1000:2000]
    etag = resp.headers["ETag"]
    assert etag
    _, resp = get(served.port, "/d/blob.bin", {"Range": f"bytes={len(DATA) - 10}-"})
    assert resp.read() == DATA[-10:]
    assert resp.headers["ETag"] == etag
    hits = served.hits("d/blob.bin")
    # Two workers log as each request ends: the lines can come in either order.
    assert sorted((h.method, h.range, h.status, h.body_bytes) for h in hits) == sorted(
        [("GET", "bytes=1000-1999", 206, 1000), ("GET", f"bytes={len(DATA) - 10}-", 206, 10)]
    )
    assert served.gets() == 2 and served.bytes_sent("d/blob.bin") == 1010
    served.reset()
    assert served.gets() == 0


def test_nginx_honours_if_match_on_a_ranged_get(served):
    _, resp = get(served.port, "/d/blob.bin", {"Range": "bytes=0-9"})
    etag = resp.headers["ETag"]
    resp.read()
    _, resp = get(served.port, "/d/blob.bin", {"Range": "bytes=0-9", "If-Match": etag})
    assert resp.status == 206 and resp.read() == DATA[:10]
    _, resp = get(served.port, "/d/blob.bin", {"Range": "bytes=0-9", "If-Match": '"not-the-etag"'})
    assert resp.status == 412
    # A replaced file gets a new ETag: the old one no longer matches.
    served.put(__file__, "d/blob.bin")
    _, resp = get(served.port, "/d/blob.bin", {"Range": "bytes=0-9", "If-Match": etag})
    assert resp.status == 412


def test_nginx_stops_with_its_block_even_when_the_block_raises(tmp_path):
    with pytest.raises(RuntimeError, match="test body failed"):
        with nginx(tmp_path / "www") as server:
            assert _port_open(server.port)
            pid, port = server.pid, server.port
            raise RuntimeError("test body failed")
    assert gone(pid)
    assert not _port_open(port)


# --- S3 (SeaweedFS)


@pytest.fixture(scope="module")
def s3_blob(s3_server, tmp_path_factory):
    path = tmp_path_factory.mktemp("s3src") / "blob.bin"
    path.write_bytes(DATA)
    assert s3_server.put(path, "dir/blob.bin") == f"s3://{s3_server.bucket}/dir/blob.bin"
    return s3_server


def test_s3_serves_signed_ranges_byte_exact_with_etag(s3_blob):
    client = s3_blob.client()
    head = client.head_object(Bucket=s3_blob.bucket, Key="dir/blob.bin")
    assert head["ContentLength"] == len(DATA) and head["ETag"].startswith('"')
    got = client.get_object(Bucket=s3_blob.bucket, Key="dir/blob.bin", Range="bytes=5-104")
    assert got["ResponseMetadata"]["HTTPStatusCode"] == 206
    assert got["ContentRange"] == f"bytes 5-104/{len(DATA)}"
    assert got["ETag"] == head["ETag"]
    assert got["Body"].read() == DATA[5:105]
    # If-Match on a ranged GET: the same ETag reads, another answers 412.
    got = client.get_object(Bucket=s3_blob.bucket, Key="dir/blob.bin", Range="bytes=0-9", IfMatch=head["ETag"])
    assert got["Body"].read() == DATA[:10]
    with pytest.raises(ClientError) as err:
        client.get_object(Bucket=s3_blob.bucket, Key="dir/blob.bin", Range="bytes=0-9", IfMatch='"0000"')
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412


def test_s3_refuses_anonymous_and_wrongly_signed_requests(s3_blob):
    port = int(s3_blob.endpoint.rsplit(":", 1)[1])
    _, resp = get(port, f"/{s3_blob.bucket}/dir/blob.bin", {"Range": "bytes=0-9"})
    assert resp.status == 403
    assert DATA[:10] not in resp.read()
    s3_blob_wrong = type(s3_blob)(s3_blob.endpoint, s3_blob.bucket, s3_blob.access_key, "wrong-secret")
    with pytest.raises(ClientError) as err:
        s3_blob_wrong.client().get_object(Bucket=s3_blob.bucket, Key="dir/blob.bin", Range="bytes=0-9")
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403


def test_s3_through_the_proxy_sees_slowdown_and_is_counted(s3_blob):
    port = int(s3_blob.endpoint.rsplit(":", 1)[1])
    key, path = "dir/blob.bin", f"/{s3_blob.bucket}/dir/blob.bin"
    with faultproxy.FaultProxy(("127.0.0.1", port), labels=["node0", "node1"]) as proxy:
        got = s3_blob.client(endpoint=proxy.url("node0")).get_object(Bucket=s3_blob.bucket, Key=key, Range="bytes=0-99")
        assert got["Body"].read() == DATA[:100]
        node1 = s3_blob.client(endpoint=proxy.url("node1"))  # two attempts per call
        proxy.add_rule(fault="slowdown", count=1, label="node1")
        assert node1.get_object(Bucket=s3_blob.bucket, Key=key, Range="bytes=0-99")["Body"].read() == DATA[:100]
        proxy.add_rule(fault="slowdown", count=2, label="node1")
        with pytest.raises(ClientError) as err:
            node1.get_object(Bucket=s3_blob.bucket, Key=key, Range="bytes=0-99")
        assert err.value.response["Error"]["Code"] == "SlowDown"
        assert proxy.totals("node0", path).gets == 1 and proxy.totals("node0", path).bytes == 100
        n1 = proxy.totals("node1", path)
        assert (n1.gets, n1.faults, n1.bytes) == (4, 3, 100)


def test_s3_stops_with_its_block_and_leaves_nothing(tmp_path):
    with s3(bucket="stopcheck") as server:
        port = int(server.endpoint.rsplit(":", 1)[1])
        pid = server.pid
    assert gone(pid)
    assert not _port_open(port)


# --- the fault proxy in front of nginx


def test_proxy_forwards_byte_exact_and_counts_per_label_and_path(served):
    with faultproxy.FaultProxy(("127.0.0.1", served.port), labels=["a", "b"]) as proxy:
        conn, resp = get(proxy.ports["a"], "/d/blob.bin", {"Range": "bytes=10-1009"})
        assert resp.status == 206 and resp.read() == DATA[10:1010]
        conn.request("GET", "/d/blob.bin")  # the same kept-alive connection
        assert conn.getresponse().read() == DATA
        conn.request("HEAD", "/d/blob.bin")
        resp = conn.getresponse()
        assert resp.read() == b"" and int(resp.headers["Content-Length"]) == len(DATA)
        _, resp = get(proxy.ports["b"], "/nothing-here")
        assert resp.status == 404
        resp.read()
        counts = proxy.counters()
        assert counts["a"]["/d/blob.bin"] == {"requests": 3, "gets": 2, "bytes": 1000 + len(DATA), "faults": 0}
        assert counts["b"]["/nothing-here"]["gets"] == 1
        assert served.gets("d/blob.bin") == 2  # the server saw the same
        proxy.reset_counters()
        assert proxy.counters() == {}


@pytest.mark.parametrize("status", [503, 429])
def test_proxy_injects_a_status_for_the_next_n_requests(served, status):
    with faultproxy.FaultProxy(("127.0.0.1", served.port)) as proxy:
        proxy.add_rule(fault="status", status=status, count=2)
        statuses = []
        for _ in range(3):
            _, resp = get(proxy.ports["default"], "/d/blob.bin", {"Range": "bytes=0-9"})
            statuses.append(resp.status)
            resp.read()
        assert statuses == [status, status, 206]
        assert proxy.totals().faults == 2
        assert served.gets() == 1  # faulted requests never reach the server


def test_proxy_slowdown_is_the_s3_error_document(served):
    with faultproxy.FaultProxy(("127.0.0.1", served.port)) as proxy:
        proxy.add_rule(fault="slowdown", count=1)
        _, resp = get(proxy.ports["default"], "/d/blob.bin")
        assert resp.status == 503
        assert b"<Code>SlowDown</Code>" in resp.read()


def test_proxy_truncates_a_body_under_a_correct_content_length(served):
    with faultproxy.FaultProxy(("127.0.0.1", served.port)) as proxy:
        proxy.add_rule(fault="truncate", count=1, after=0.25)
        _, resp = get(proxy.ports["default"], "/d/blob.bin")
        assert int(resp.headers["Content-Length"]) == len(DATA)
        with pytest.raises(http.client.IncompleteRead) as short:
            resp.read()
        assert short.value.partial == DATA[: len(DATA) // 4]
        _, resp = get(proxy.ports["default"], "/d/blob.bin")  # the rule is spent
        assert resp.read() == DATA


def test_proxy_resets_the_connection_mid_body(served):
    with faultproxy.FaultProxy(("127.0.0.1", served.port)) as proxy:
        proxy.add_rule(fault="reset", count=1)
        _, resp = get(proxy.ports["default"], "/d/blob.bin")
        assert resp.status == 200
        with pytest.raises(ConnectionResetError):
            resp.read()
        assert 0 < proxy.totals().bytes < len(DATA)


def test_proxy_stalls_longer_than_a_client_timeout(served):
    with faultproxy.FaultProxy(("127.0.0.1", served.port)) as proxy:
        proxy.add_rule(fault="stall", count=1, stall_s=30)
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            get(proxy.ports["default"], "/d/blob.bin", timeout=1)
        assert time.monotonic() - start >= 1
    # Stopping the proxy ends the stalled connection instead of waiting 30 s.


def test_proxy_fraction_rule_faults_some_but_not_all(served):
    with faultproxy.FaultProxy(("127.0.0.1", served.port)) as proxy:
        proxy.add_rule(fault="status", fraction=0.5, path="blob")
        statuses = [get(proxy.ports["default"], "/d/blob.bin", {"Range": "bytes=0-0"})[1].status for _ in range(40)]
        assert 5 < statuses.count(503) < 35 and statuses.count(206) == 40 - statuses.count(503)
        assert get(proxy.ports["default"], "/other")[1].status == 404  # path does not match: never faulted


def test_proxy_adds_round_trips_per_connection_and_per_request(served):
    rtt = 0.1
    with faultproxy.FaultProxy(("127.0.0.1", served.port), rtt=rtt) as proxy:
        start = time.monotonic()
        conn, resp = get(proxy.ports["default"], "/d/blob.bin", {"Range": "bytes=0-9"})
        resp.read()
        for _ in range(2):
            conn.request("GET", "/d/blob.bin", headers={"Range": "bytes=0-9"})
            conn.getresponse().read()
        assert time.monotonic() - start >= 4 * rtt  # one connection set-up + three requests


def test_proxy_caps_bandwidth_for_all_connections_together(served):
    mbit = 40.0  # 5 MB/s: two 3 MB bodies need at least ~1.2 s
    with faultproxy.FaultProxy(("127.0.0.1", served.port), mbit=mbit) as proxy:
        start = time.monotonic()
        c1, r1 = get(proxy.ports["default"], "/d/blob.bin")
        c2, r2 = get(proxy.ports["default"], "/d/blob.bin")
        assert r1.read() == DATA and r2.read() == DATA
        elapsed = time.monotonic() - start
        burst = proxy.bucket.burst
        assert elapsed >= (2 * len(DATA) - burst) / (mbit * 1e6 / 8)
        assert proxy.totals().bytes == 2 * len(DATA)


def test_proxy_runs_as_a_command_with_a_control_endpoint(served):
    rules = json.dumps([{"fault": "status", "status": 503, "count": 1}])
    proc = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "scripts" / "faultproxy.py"),
            f"127.0.0.1:{served.port}",
            "--label",
            "n0",
            "--label",
            "n1",
            "--rules",
            rules,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        ports = json.loads(proc.stdout.readline())["ports"]
        assert set(ports) == {"n0", "n1"}
        assert get(ports["n0"], "/d/blob.bin")[1].status == 503
        assert get(ports["n1"], "/d/blob.bin")[1].read() == DATA
        counters = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{ports['n0']}/__faultproxy__/counters").read())
        assert counters["n0"]["/d/blob.bin"]["faults"] == 1 and counters["n1"]["/d/blob.bin"]["bytes"] == len(DATA)
        rules = json.dumps([{"fault": "status", "status": 429, "count": 1, "label": "n1"}]).encode()
        urllib.request.urlopen(
            urllib.request.Request(f"http://127.0.0.1:{ports['n0']}/__faultproxy__/rules", data=rules, method="POST")
        )
        assert get(ports["n1"], "/d/blob.bin")[1].status == 429
        urllib.request.urlopen(
            urllib.request.Request(f"http://127.0.0.1:{ports['n0']}/__faultproxy__/reset", data=b"", method="POST")
        )
        counters = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{ports['n0']}/__faultproxy__/counters").read())
        assert counters == {}
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(f"http://127.0.0.1:{ports['n0']}/__faultproxy__/nonsense")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
