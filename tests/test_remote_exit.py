"""A user's own program that reads a remote DB with `lmdbfs.open(URL)` ends the normal
way, with its own exit status: obstore's Rust threads must not be inside Python when
the interpreter finalizes (a thread that asks for the GIL then is made to exit, which
aborts the process after the program's last line). The race needs a busy CPU to show,
so each program runs on CPU 0 beside a process that keeps it busy: without the wait at
exit, 1 to 7 of each 16 such exits aborted here."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.servers import nginx

pytestmark = pytest.mark.slow  # a real nginx

RUNS = 16
BUSY = 1

PROGRAM = textwrap.dedent(
    """
    import os, sys
    os.sched_setaffinity(0, {0})  # beside the busy processes: threads wait for the CPU
    import lmdbfs
    url, mode = sys.argv[1], sys.argv[2]
    try:
        fs = lmdbfs.open(url)
    except Exception as exc:
        print("refused:", str(exc).splitlines()[0])
        sys.exit(3)
    for name in sorted(fs.listdir("seq"))[:4]:
        data = fs.read_bytes("seq/" + name)
        assert data == bytes([int(name[1:4])]) * int(name[5:11]), name
    if mode == "open":  # left open: the interpreter's exit closes what is left
        print("read, left open")
    else:
        fs.close()
        print("read, closed")
    """
)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    base = tmp_path_factory.mktemp("exit")
    tree = base / "src" / "seq"
    tree.mkdir(parents=True)
    for i in range(8):
        size = (5, 3000, 70_000, 300_000)[i % 4]
        (tree / f"f{i:03d}_{size:06d}").write_bytes(bytes([i]) * size)
    db = base / "exit.lmdb"
    run_cli("pack", base / "src", db, "--no-progress")
    with nginx(base / "www") as server:
        yield server.put(db, "exit.lmdb"), base


def _busy_cpu() -> list[subprocess.Popen]:
    """Processes that keep CPU 0 busy (the programs run there too), for at most 10 min."""
    loop = "import os, time\nos.sched_setaffinity(0, {0})\nend = time.monotonic() + 600\nwhile time.monotonic() < end: pass"
    return [subprocess.Popen([sys.executable, "-c", loop]) for _ in range(BUSY)]


@pytest.mark.parametrize("mode", ["open", "closed", "refused"])
def test_a_program_that_read_a_remote_db_exits_cleanly(served: tuple[str, Path], mode: str) -> None:
    url, base = served
    if mode == "refused":
        url = url.replace("exit.lmdb", "missing.lmdb")  # nginx: 404 at open
    program = base / "reader.py"
    program.write_text(PROGRAM)
    env = dict(os.environ, XDG_CACHE_HOME=str(base / f"cache-{mode}"))
    busy = _busy_cpu()
    try:
        results = [
            subprocess.run(
                [sys.executable, str(program), url, mode], capture_output=True, text=True, env=env, timeout=120
            )
            for _ in range(RUNS)
        ]
    finally:
        for proc in busy:
            proc.kill()
            proc.wait()
    want = 3 if mode == "refused" else 0
    codes = [r.returncode for r in results]
    bad = [r for r in results if r.returncode != want]
    assert not bad, f"{len(bad)} of {RUNS} exits: {codes}; {bad[0].stderr[-300:]}"
    for r in results:
        assert "Traceback" not in r.stderr, r.stderr
        assert r.stdout.startswith("refused: " if mode == "refused" else "read, "), r.stdout
