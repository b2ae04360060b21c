"""Mounting the way clusters do: mount(8) and fstab, non-root users, failures that
leave nothing behind. Real mounts; the tests run as root and create a user."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import ROOT, daemon_pids, is_mounted, one_error_line, run_cli
from .test_mount import _without_write_bits
from .treecmp import differences, snapshot

pytestmark = pytest.mark.mount  # every test here mounts a FUSE filesystem

HELPER = Path("/sbin/mount.fuse.lmdbfs")


def _umount8(mnt: Path) -> None:
    """umount(8), as an admin or systemd would; the daemon must go away with the mount."""
    pids = daemon_pids(mnt)
    subprocess.run(["umount", str(mnt)], check=True, capture_output=True, text=True)
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{p}").exists() for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not is_mounted(mnt)
    assert not any(Path(f"/proc/{p}").exists() for p in pids), "the daemon outlived its mount"


@pytest.fixture(scope="module")
def shards(got10k_tree: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    base = tmp_path_factory.mktemp("shards")
    out = []
    for i in range(2):
        db = base / f"got10k.{i}.lmdb"
        run_cli("pack", "--shard", f"{i}/2", got10k_tree, db, "--no-progress")
        out.append(db)
    return out


def test_mount_t_fuse_lmdbfs_and_umount(got10k_tree: Path, shards: list[Path], tmp_path: Path) -> None:
    assert HELPER.exists(), f"{HELPER} is missing: run scripts/setup.sh as root (it links it to mount.lmdbfs)"
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    source = str(shards[0].parent / "got10k.*.lmdb")  # a glob: the whole shard set in one field
    proc = subprocess.run(["mount", "-t", "fuse.lmdbfs", source, str(mnt), "-o", "ro,allow_other"], text=True,
                          capture_output=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    try:
        assert is_mounted(mnt)
        assert differences(_without_write_bits(snapshot(got10k_tree)), snapshot(mnt)) == []
        fields = next(line.split() for line in open("/proc/self/mountinfo") if line.split()[4] == str(mnt))
        assert fields[fields.index("-") + 1] == "fuse.lmdbfs" and "allow_other" in fields[-1]
    finally:
        _umount8(mnt)


def test_fstab_line_with_several_dbs(got10k_tree: Path, shards: list[Path], tmp_path: Path) -> None:
    """The documented fstab form, read by mount(8) from an fstab file of its own."""
    assert HELPER.exists(), f"{HELPER} is missing: run scripts/setup.sh as root"
    mnt = tmp_path / "data"
    mnt.mkdir()
    fstab = tmp_path / "fstab"
    source = f"{shards[0]}:{shards[1]}:copy={shards[0].parent}/got10k.*.lmdb"
    fstab.write_text(f"# test\n{source} {mnt} fuse.lmdbfs ro,allow_other,noauto,nofail,x-systemd.automount 0 0\n")
    proc = subprocess.run(["mount", "-T", str(fstab), str(mnt)], text=True, capture_output=True)
    assert proc.returncode == 0, proc.stderr
    try:
        assert sorted(os.listdir(mnt)) == ["copy", "test", "train", "val"]
        expected = _without_write_bits(snapshot(got10k_tree))
        assert differences(expected, snapshot(mnt / "copy")) == []
    finally:
        _umount8(mnt)


def test_helper_forms_of_this_checkout(got10k_tree: Path, shards: list[Path], tmp_path: Path) -> None:
    """mount.lmdbfs as mount(8) calls it, and `lmdbfs SOURCE MNT -o …` as mount.fuse3 calls it."""
    bindir = Path(sys.executable).parent
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    source = ":".join(map(str, shards))
    calls = [
        [str(bindir / "mount.lmdbfs"), source, str(mnt), "-n", "-o", "ro,noauto,_netdev,dev,suid"],
        ["mount.fuse3", source, str(mnt), "-t", "fuse.lmdbfs", "-o", "ro"],
    ]
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}")
    for cmd in calls:
        proc = subprocess.run(cmd, text=True, capture_output=True, env=env)
        assert proc.returncode == 0 and proc.stdout == proc.stderr == "", (cmd, proc.stderr)
        try:
            assert differences(_without_write_bits(snapshot(got10k_tree)), snapshot(mnt)) == []
        finally:
            _umount8(mnt)
    bad = subprocess.run([str(bindir / "mount.lmdbfs"), "/nowhere/x.*.lmdb", str(mnt), "-o", "ro"], text=True,
                         capture_output=True)  # fmt: skip
    assert bad.returncode != 0 and bad.stderr.startswith("lmdbfs: error: /nowhere/x.*.lmdb: no DB matches")


def test_mount_is_silent_unless_asked(shards: list[Path], tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    for verbose in ([], ["-v"]):
        proc = run_cli("mount", *verbose, *shards, mnt)
        try:
            said = proc.stdout + proc.stderr
            assert (said == "") if not verbose else ("mounted" in said), said
        finally:
            run_cli("umount", mnt)


@pytest.mark.parametrize("problem", ["bad-db", "missing-db", "clash"])
def test_a_failing_mount_leaves_the_directory_unmounted_and_empty(
    shards: list[Path], tmp_path: Path, problem: str
) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    garbage = tmp_path / "garbage.lmdb"
    garbage.write_bytes(b"not an lmdb file" * 1000)
    dbs = {"bad-db": [shards[0], garbage], "missing-db": [tmp_path / "nope.lmdb"], "clash": [shards[0], shards[0]]}
    proc = run_cli("mount", *dbs[problem], mnt, check=False)
    one_error_line(proc)
    assert proc.stdout == ""
    assert not is_mounted(mnt) and os.listdir(mnt) == []
    assert daemon_pids(mnt) == []


# -- a user who is not root ------------------------------------------------------------------
@pytest.fixture
def user(machine_lock: None) -> Iterator[str]:
    """A user with no privileges, under the machine lock (see tests/conftest.py)."""
    name = f"lmdbfs{os.getpid() % 100000}"
    subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["userdel", "-f", name], capture_output=True)


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory every user can reach (pytest's own tmp dirs are private to root)."""
    path = Path(tempfile.mkdtemp(prefix="lmdbfs-user-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        if is_mounted(path / "mnt"):
            subprocess.run(["umount", "-l", str(path / "mnt")], capture_output=True)
        shutil.rmtree(path, ignore_errors=True)


def _as_user(user: str) -> tuple[list[str], dict[str, str]]:
    """How `user` runs this checkout's lmdbfs: the venv's interpreter when the user may
    execute it; otherwise (an interpreter under a private home) the system python of
    the same version, given this venv's packages."""
    python = os.path.realpath(sys.executable)
    env = {"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "HOME": "/tmp", "LANG": "C.UTF-8"}
    probe = subprocess.run(["runuser", "-u", user, "--", python, "-c", "import lmdbfs"], capture_output=True)
    if probe.returncode == 0:
        return [sys.executable], env
    system = f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}"
    assert os.path.exists(system), f"{user} can run neither {python} nor {system}: give users a readable venv"
    env["PYTHONPATH"] = f"{ROOT}:{sysconfig.get_paths()['purelib']}"
    return [system], env


def _run_as(user: str, *args: str | os.PathLike) -> subprocess.CompletedProcess:
    python, env = _as_user(user)
    cmd = ["runuser", "-u", user, "--", "env", "-i", *(f"{k}={v}" for k, v in env.items()), *python, "-m", "lmdbfs"]
    return subprocess.run([*cmd, *map(str, args)], capture_output=True, text=True, timeout=120)


def test_non_root_mount_needs_dev_fuse_and_says_so(got10k_tree: Path, shared_dir: Path, user: str) -> None:
    db = shared_dir / "got10k.lmdb"
    run_cli("pack", got10k_tree, db, "--no-progress")
    db.chmod(0o644)
    mnt = shared_dir / "mnt"
    mnt.mkdir()
    shutil.chown(mnt, user)
    original = stat.S_IMODE(os.stat("/dev/fuse").st_mode)
    try:
        os.chmod("/dev/fuse", 0o600)
        line = one_error_line(_run_as(user, "mount", db, mnt))
        assert "/dev/fuse is not readable and writable by user " + user in line
        assert "chmod 0666 /dev/fuse" in line and "usermod -aG fuse" in line
        assert not is_mounted(mnt) and os.listdir(mnt) == []

        os.chmod("/dev/fuse", 0o666)
        proc = _run_as(user, "mount", db, mnt)
        assert proc.returncode == 0 and proc.stdout == proc.stderr == "", proc.stderr
        try:
            listing = subprocess.run(["runuser", "-u", user, "--", "ls", str(mnt / "train")], capture_output=True)
            assert listing.returncode == 0 and b"GOT-10k_Train_000001" in listing.stdout
            owner = subprocess.run(["runuser", "-u", user, "--", "stat", "-c", "%U", str(mnt / "train")],
                                   capture_output=True, text=True)  # fmt: skip
            assert owner.stdout.strip() == user
            with pytest.raises(PermissionError):  # without allow_other, a mount is its user's alone
                os.stat(mnt / "train")
        finally:
            unmounted = _run_as(user, "umount", mnt)
            assert unmounted.returncode == 0, unmounted.stderr
        assert not is_mounted(mnt)

        allowed = any(line.split("#")[0].strip() == "user_allow_other" for line in open("/etc/fuse.conf"))
        proc = _run_as(user, "mount", "-o", "allow_other", db, mnt)
        if allowed:  # this machine lets users share mounts: then it must work
            assert proc.returncode == 0, proc.stderr
            _run_as(user, "umount", mnt)
        else:
            line = one_error_line(proc)
            assert "user_allow_other" in line and "/etc/fuse.conf" in line
        assert not is_mounted(mnt) and os.listdir(mnt) == []
    finally:
        os.chmod("/dev/fuse", original)
