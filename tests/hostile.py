"""Crafting damaged DBs and checking the contract every command keeps on them.

A DB is untrusted input: whatever its bytes, a command either succeeds or prints ONE
line `lmdbfs: error: …` — never a traceback, never `internal error`, never a signal,
within bounded time and memory. Damage is made the two ways it happens: records
rewritten through LMDB (offsets kept trusted, as if packed so), and bytes patched in
place.
"""

from __future__ import annotations

import json
import logging
import os
import random
import resource
import shutil
import signal
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import lmdb
import numpy as np

from lmdbfs.format.records import (
    ENTRY_DTYPE,
    FLAG_INLINE,
    INDEX_DB,
    META_DB,
    META_KEY,
    dir_key,
    encode_dir,
    pack_inline,
    pack_names,
)
from lmdbfs.pack.packer import PackOptions, pack

_HEADER = struct.Struct("<4sIII")
CHILD_MEMORY = 192 << 20  # address space a command may add to what it starts with
CHILD_SECONDS = 30


def build_tree(root: Path) -> dict[str, bytes]:
    """A small tree with every kind of entry; returns each file's bytes by path."""
    rng = random.Random(5)
    files = {
        "a.txt": b"alpha\n",
        "big.bin": rng.randbytes(30_000),
        "seq1/f0.txt": b"0" * 100,
        "seq1/f1.txt": b"1" * 200,
        "seq1/frame.jpg": rng.randbytes(9_000),
        "seq2/deep/g.txt": b"deep\n",
        "seq2/deep/h.bin": rng.randbytes(5_000),
    }
    for i in range(60):  # a record big enough for LMDB overflow pages
        files[f"many/m{i:02d}.txt"] = f"{i}\n".encode() * 20
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    os.symlink("../a.txt", root / "seq2" / "link")
    os.symlink("seq1", root / "dirlink")
    os.chmod(root / "a.txt", 0o4755)  # setuid: unpack keeps it only when asked
    for rel in files:
        os.utime(root / rel, ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))
    return files


def pack_tree(src: Path, db: Path) -> None:
    pack(str(src), str(db), PackOptions(workers=2, progress=False))


def base_db(root: Path) -> tuple[Path, dict[str, bytes]]:
    """The undamaged DB every hostile case starts from, and its files' bytes."""
    files = build_tree(root / "src")
    pack_tree(root / "src", root / "base.lmdb")
    return root / "base.lmdb", files


def _writable(db: Path) -> lmdb.Environment:
    return lmdb.open(str(db), subdir=False, max_dbs=4, lock=False, map_size=4 * db.stat().st_size + (8 << 20))


def _raw_record(db: Path, rel: str) -> bytes:
    env = _writable(db)
    try:
        with env.begin() as txn:
            return txn.get(dir_key(rel), db=env.open_db(INDEX_DB, txn=txn, create=False))
    finally:
        env.close()


def split_record(raw: bytes) -> tuple[np.ndarray, bytes, bytes, bytes]:
    """(rows as a writable copy, name blob, tail, own path) of a raw directory record."""
    _magic, count, own_len, blob_len = _HEADER.unpack_from(raw)
    rows_at = _HEADER.size + own_len
    rows = np.frombuffer(raw, ENTRY_DTYPE, count=count, offset=rows_at).copy()
    blob_at = rows_at + count * ENTRY_DTYPE.itemsize
    return rows, raw[blob_at : blob_at + blob_len], raw[blob_at + blob_len :], raw[_HEADER.size : rows_at]


def read_record(db: Path, rel: str) -> tuple[np.ndarray, bytes, bytes]:
    """(rows as a writable copy, name blob, own path) of a directory record."""
    rows, blob, _tail, own = split_record(_raw_record(db, rel))
    return rows, blob, own


def read_tail(db: Path, rel: str) -> bytes:
    """The inline bytes after a (version 4) record's name blob."""
    return split_record(_raw_record(db, rel))[2]


def encode_dir_v3(
    own: bytes, rows: np.ndarray, names: list[bytes], targets: list[bytes], inline: list[bytes | None]
) -> bytes:
    """A record in the format 2-3 layout ("LDR1"): each inline file's bytes right after
    its name and target, the record ending with the blob. Sets the rows' name offsets,
    FLAG_INLINE, and data_off 0 on inline rows (unused there)."""
    extras = [t + (d or b"") for t, d in zip(targets, inline)]
    blob = pack_names(rows, names, extras)
    rows["target_len"] = [len(t) for t in targets]
    is_inline = np.array([d is not None for d in inline], bool)
    rows["flags"] = np.where(is_inline, rows["flags"] | FLAG_INLINE, rows["flags"] & np.uint8(~FLAG_INLINE & 0xFF))
    rows["data_off"][is_inline] = 0
    return _HEADER.pack(b"LDR1", len(rows), len(own), len(blob)) + own + rows.tobytes() + blob


def put_records(db: Path, records: dict[str, bytes], meta_change: dict | None = None, meta_raw: bytes | None = None):
    """Write raw index records (and meta changes) in one commit, keeping the value
    offsets trusted: the meta record names this commit, as a pack's final one would."""
    env = _writable(db)
    try:
        index = env.open_db(INDEX_DB)
        meta_db = env.open_db(META_DB)
        with env.begin(write=True) as txn:
            for rel, raw in records.items():
                txn.put(dir_key(rel), raw, db=index)
            meta = json.loads(txn.get(META_KEY, db=meta_db))
            if meta.get("offsets_txnid"):
                meta["offsets_txnid"] = txn.id()
            meta.update(meta_change or {})
            txn.put(META_KEY, meta_raw if meta_raw is not None else json.dumps(meta).encode(), db=meta_db)
    finally:
        env.close()


def to_version_3(db: Path) -> None:
    """Rewrite every directory record in the format 2-3 layout ("LDR1": each inline
    file's bytes right after its name) and mark the DB version 3, as an older lmdbfs
    packed it."""
    env = _writable(db)
    try:
        with env.begin() as txn:
            index = env.open_db(INDEX_DB, txn=txn, create=False)
            raws = dict(txn.cursor(db=index))
    finally:
        env.close()
    records = {}
    for key, raw in raws.items():
        rows, blob, tail, own = split_record(raw)
        names, targets, inline = split_blob(rows, blob, tail)
        records[key] = encode_dir_v3(own, rows, names, targets, inline)
    env = _writable(db)
    try:
        meta_db, index = env.open_db(META_DB), env.open_db(INDEX_DB)
        with env.begin(write=True) as txn:
            for key, raw in records.items():
                txn.put(key, raw, db=index)
            meta = json.loads(txn.get(META_KEY, db=meta_db))
            meta["format_version"] = 3
            if meta.get("offsets_txnid"):
                meta["offsets_txnid"] = txn.id()
            txn.put(META_KEY, json.dumps(meta).encode(), db=meta_db)
    finally:
        env.close()


def put_rows(db: Path, rel: str, rows: np.ndarray, blob: bytes, tail: bytes | None = None) -> None:
    """Write ``rel``'s record from rows, name blob and inline tail (None: the tail it has)."""
    put_records(db, {rel: encode_dir(rel, rows, blob, read_tail(db, rel) if tail is None else tail)})


def split_blob(rows: np.ndarray, blob: bytes, tail: bytes = b"") -> tuple[list[bytes], list[bytes], list[bytes | None]]:
    """Each row's name, symlink target and inline bytes (None: not inline), the inverse of
    pack_names and pack_inline."""
    names, targets, inline = [], [], []
    for row in rows:
        at, n, t = int(row["name_off"]), int(row["name_len"]), int(row["target_len"])
        names.append(blob[at : at + n])
        targets.append(blob[at + n : at + n + t])
        off, size = int(row["data_off"]), int(row["size"])
        inline.append(tail[off : off + size] if int(row["flags"]) & FLAG_INLINE else None)
    return names, targets, inline


def edit_row(db: Path, rel: str, name: bytes, new_name: bytes | None = None, target: bytes | None = None, **fields):
    """Rewrite one row of ``rel``'s record: its name, its symlink target or raw fields."""
    rows, blob, _own = read_record(db, rel)
    names, targets, inline = split_blob(rows, blob, read_tail(db, rel))
    i = names.index(name)
    if new_name is not None:
        names[i] = new_name
    if target is not None:
        targets[i] = target
        rows["size"][i] = len(target)
    blob = pack_names(rows, names, targets)
    tail = pack_inline(rows, inline)
    for key, value in fields.items():  # after packing, which recomputes offsets
        rows[key][i] = value
    put_rows(db, rel, rows, blob, tail)


def patch_bytes(db: Path, at: int, data: bytes) -> None:
    with open(db, "r+b") as fh:
        fh.seek(at)
        fh.write(data)


def node_of(db: Path, rel: str) -> int:
    """File offset of the LMDB leaf node holding ``rel``'s record (its 8-byte header)."""
    data = db.read_bytes()
    at = data.find(dir_key(rel))
    assert at > 8 and struct.unpack_from("<H", data, at - 2)[0] == 16, "record node not found"
    return at - 8


# -- running commands with bounded time and memory -------------------------------------


@dataclass
class Outcome:
    argv: list[str]
    code: int  # exit status, or -signal
    stdout: bytes
    stderr: str
    seconds: float


def _vm_size() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def run_forked(argv: list[str], tmp: Path, memory: int = CHILD_MEMORY, seconds: int = CHILD_SECONDS) -> Outcome:
    """`lmdbfs ARGV` in a forked child (no interpreter start-up: fuzzing stays fast),
    with its address space and time limited; a signal shows as a negative code."""
    out, err = tmp / "stdout", tmp / "stderr"
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 97
        try:
            for fd, path in ((1, out), (2, err)):
                os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), fd)
            sys.stdout = open(1, "w", closefd=False, errors="surrogateescape")  # noqa: SIM115
            sys.stderr = open(2, "w", closefd=False, errors="backslashreplace")  # noqa: SIM115
            logging.root.handlers.clear()
            limit = _vm_size() + memory
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
            signal.alarm(seconds)
            from lmdbfs.cli.main import main

            code = main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 2
        except BaseException:  # noqa: BLE001 - reported to the parent as a traceback
            import traceback

            traceback.print_exc()
            code = 99
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    deadline = time.monotonic() + seconds + 10
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            status = signal.SIGKILL
            break
        time.sleep(0.002)
    code = os.waitstatus_to_exitcode(status)
    return Outcome(argv, code, out.read_bytes(), err.read_text(errors="replace"), time.monotonic() - started)


def contract_problem(res: Outcome) -> str | None:
    """What breaks the CLI contract in ``res``, or None."""
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    where = f"`lmdbfs {' '.join(map(str, res.argv))}`"
    if res.code < 0:
        return f"{where} died of signal {-res.code} (a hang or a crash)"
    if "Traceback" in res.stderr or "internal error" in res.stderr:
        return f"{where} broke: {res.stderr.strip()[-800:]}"
    if res.code == 0:
        odd = [line for line in lines if not line.startswith("lmdbfs: warning: ")]
        return f"{where} succeeded but said {odd}" if odd else None
    if len(lines) != 1 or not lines[0].startswith("lmdbfs: error: "):
        return f"{where} failed ({res.code}) without one error line: {lines[-5:]}"
    return None


def fresh_copy(base: Path, tmp: Path, name: str) -> Path:
    db = tmp / f"{name}.lmdb"
    shutil.copy(base, db)
    return db
