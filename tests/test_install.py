"""Installing lmdbfs where the user is not root.

Both tests run as a user they create, in a fresh venv of the system's Python, inside a
mount namespace whose /usr is an overlay that whites out every file of the -dev packages
(libfuse3-dev, liblmdb-dev, libxxhash-dev, nettle-dev, liburing-dev): no header, no
unversioned .so, no .pc file of theirs can be seen. Dependencies come from a wheelhouse
downloaded beforehand, so the venv holds exactly what pip installs from the wheel or sdist.

- The binary wheel (scripts/build_wheel.sh) is installed where the five libraries' runtime
  packages are hidden too: the extension must resolve them from the wheel itself. Then
  pack -> mount -> every file read byte-exact (JPEGs decoded with Pillow) -> umount.
- The sdist is installed without the FUSE libraries (and once more without a C compiler):
  every command but `mount` works, and `mount` says in one line what to install.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import pytest

from .conftest import ROOT, daemon_pids

pytestmark = [pytest.mark.slow, pytest.mark.mount]  # builds a wheel, installs it as a user, mounts

DEV_PACKAGES = ["libfuse3-dev", "liblmdb-dev", "libxxhash-dev", "nettle-dev", "liburing-dev"]
RUNTIME_PACKAGES = ["libfuse3-3", "liblmdb0", "libxxhash0", "libnettle8", "liburing2"]
BUNDLED = ["libfuse3", "liblmdb", "libxxhash", "libnettle", "liburing"]
# lmdbfs's own dependencies, as pyproject.toml lists them (names only: the wheelhouse pins
# the versions this venv runs, and pip download brings theirs).
DEPENDENCIES = [
    re.match(r"[A-Za-z0-9_.-]+", req).group(0)
    for req in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
]
SYSTEM_PYTHON = f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}"

HAS = "import importlib.util, sys; print(*(bool(importlib.util.find_spec(m)) for m in sys.argv[1:]))"

# Run as the user in the hidden environment: every file of the tree through the mount,
# byte for byte, every JPEG decoded by Pillow, every directory listed alike.
READ_ALL = """
import os, sys
from PIL import Image
src, mnt = sys.argv[1:3]
files = jpegs = 0
for dirpath, dirnames, filenames in os.walk(src):
    rel = os.path.relpath(dirpath, src)
    assert sorted(os.listdir(os.path.join(mnt, rel))) == sorted(dirnames + filenames), rel
    for name in filenames:
        with open(os.path.join(dirpath, name), "rb") as a, open(os.path.join(mnt, rel, name), "rb") as b:
            assert a.read() == b.read(), f"{rel}/{name} differs"
        files += 1
        if name.endswith(".jpg"):
            with Image.open(os.path.join(mnt, rel, name)) as image:
                image.load()
            jpegs += 1
print(files, jpegs)
"""


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    assert proc.returncode == 0, f"{cmd[:3]}… failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The wheel and the sdist, built once from this checkout by scripts/build_wheel.sh."""
    out = tmp_path_factory.mktemp("dist")
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(out)}
    proc = _run(["bash", str(ROOT / "scripts" / "build_wheel.sh")], env=env, timeout=900)
    wheels = list(out.glob("lmdbfs-*-manylinux_*_x86_64.whl"))
    sdists = list(out.glob("lmdbfs-*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, (os.listdir(out), proc.stdout)
    return {"wheel": wheels[0], "sdist": sdists[0], "show": proc.stdout}


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """lmdbfs's dependencies (the versions this venv runs) and setuptools, as wheels."""
    house = tmp_path_factory.mktemp("wheelhouse")
    pins = [f"{name}=={metadata.version(name)}" for name in DEPENDENCIES]
    _run([sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "--dest", str(house),
          *pins, "setuptools>=68"], timeout=600)  # fmt: skip
    return house


@pytest.fixture(scope="module")
def shared(
    tmp_path_factory: pytest.TempPathFactory, built: dict, wheelhouse: Path, got10k_tree: Path
) -> Iterator[Path]:
    """A directory the test user can read: the wheel, the sdist, the wheelhouse, the tree."""
    path = Path(tempfile.mkdtemp(prefix="lmdbfs-install-", dir="/tmp"))
    try:
        shutil.copytree(wheelhouse, path / "wheelhouse")
        for name in ("wheel", "sdist"):
            shutil.copy(built[name], path)
        shutil.copytree(got10k_tree, path / "tree")
        (path / "read_all.py").write_text(READ_ALL)
        for dirpath, _dirs, files in os.walk(path):
            os.chmod(dirpath, 0o755)
            for name in files:
                os.chmod(os.path.join(dirpath, name), 0o644)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def user(shared: Path, machine_lock: None) -> Iterator[tuple[str, Path]]:
    """A user with no privileges and a work directory of their own (added and removed
    under the machine lock, as parallel tests edit /etc/passwd and /dev/fuse too)."""
    name = f"lmdbfsi{os.getpid() % 100000}"
    subprocess.run(["userdel", "-f", name], capture_output=True)  # left over by a killed run
    _run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", name])
    work = Path(tempfile.mkdtemp(prefix="work-", dir=shared))
    shutil.chown(work, name, name)
    try:
        yield name, work
    finally:
        for mnt in (work / "mnt", work / "mnt2"):
            for pid in daemon_pids(mnt):
                os.kill(pid, signal.SIGKILL)
        subprocess.run(["userdel", "-f", name], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture
def open_dev_fuse(machine_lock: None) -> Iterator[None]:
    """/dev/fuse opened to every user (on these machines it is 0600), restored afterwards."""
    original = stat.S_IMODE(os.stat("/dev/fuse").st_mode)
    os.chmod("/dev/fuse", 0o666)
    try:
        yield
    finally:
        os.chmod("/dev/fuse", original)


def _package_files(packages: list[str]) -> list[str]:
    """The files (not directories) the packages installed under /usr, with merged-/usr
    paths (/lib/x86_64-linux-gnu/…) as the /usr paths they are."""
    listing = subprocess.run(["dpkg", "-L", *packages], capture_output=True, text=True)
    assert listing.returncode == 0, f"{listing.stderr.strip()}: run scripts/setup.sh (it installs {packages})"
    files = set()
    for line in listing.stdout.splitlines():
        if not line.startswith("/") or os.path.isdir(line) or not os.path.lexists(line):
            continue
        path = os.path.join(os.path.realpath(os.path.dirname(line)), os.path.basename(line))
        if path.startswith("/usr/") and not path.startswith("/usr/share/"):
            files.add(path)
    return sorted(files)


def _whiteouts(layer: Path, files: list[str]) -> None:
    """An overlay layer for /usr in which each of ``files`` is deleted (a 0/0 char device)."""
    for path in files:
        target = layer / os.path.relpath(path, "/usr")
        target.parent.mkdir(parents=True, exist_ok=True)
        os.mknod(target, stat.S_IFCHR | 0o600, os.makedev(0, 0))
    for dirpath, _dirs, _files in os.walk(layer):
        os.chmod(dirpath, 0o755)  # overlayfs shows a merged directory with its top layer's mode


def _run_hidden(user: str, work: Path, layer: Path, script: str, **env: str) -> subprocess.CompletedProcess:
    """``script`` (bash) run as ``user`` in a mount namespace where ``layer`` hides files of /usr."""
    variables = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": str(work),
        "LANG": "C.UTF-8",
        "PIP_CONFIG_FILE": os.devnull,  # no site-wide index or find-links: the wheelhouse only
        "PIP_NO_CACHE_DIR": "1",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "PY": SYSTEM_PYTHON,
        "SHARED": str(work.parent),
        **env,
    }
    inner = " ".join(
        [
            f"mount -t overlay overlay -o lowerdir={layer}:/usr /usr &&",
            f"exec runuser -u {user} -- env -i",
            *(f"'{k}={v}'" for k, v in variables.items()),
            'bash -euo pipefail -c "$0"',
        ]
    )
    cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c", inner, f"cd {work}\n{script}"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900)


@pytest.fixture
def hidden_layer(tmp_path: Path) -> Path:
    assert os.path.exists(SYSTEM_PYTHON), f"{SYSTEM_PYTHON} is missing: the test user needs the system's Python"
    layer = tmp_path / "hide"
    layer.mkdir()
    return layer


def test_wheel_installs_and_mounts_as_a_user_without_dev_packages(
    shared: Path, built: dict, user: tuple[str, Path], hidden_layer: Path, open_dev_fuse: None
) -> None:
    name, work = user
    _whiteouts(hidden_layer, _package_files(DEV_PACKAGES + RUNTIME_PACKAGES))
    wheel = shared / built["wheel"].name
    script = f"""
"$PY" -m venv venv
venv/bin/pip install -q --no-index --find-links "$SHARED/wheelhouse" {wheel}
ext=$(venv/bin/python -c 'import lmdbfs._serve as m; print(m.__file__)')
ldd "$ext" > ldd.txt
venv/bin/lmdbfs pack "$SHARED/tree" db.lmdb --no-progress
mkdir mnt
trap 'fusermount3 -u -z mnt 2>/dev/null || true' EXIT
venv/bin/lmdbfs mount db.lmdb mnt
venv/bin/python "$SHARED/read_all.py" "$SHARED/tree" mnt > read.txt
venv/bin/lmdbfs umount mnt
if grep -q " $PWD/mnt " /proc/self/mountinfo; then echo "still mounted"; exit 1; fi
echo done
"""
    proc = _run_hidden(name, work, hidden_layer, script)
    assert proc.returncode == 0 and proc.stdout.endswith("done\n"), proc.stdout + proc.stderr

    ldd = (work / "ldd.txt").read_text()
    assert "not found" not in ldd, ldd
    for lib in BUNDLED:  # each from the wheel's own lmdbfs.libs, none from the system
        lines = [line for line in ldd.splitlines() if line.strip().startswith(lib)]
        assert len(lines) == 1 and "/venv/lib/" in lines[0] and "/lmdbfs.libs/" in lines[0], ldd
    expected = sum(len(files) for _dirpath, _dirs, files in os.walk(shared / "tree"))
    files, jpegs = map(int, (work / "read.txt").read_text().split())
    assert files == expected and jpegs > 0

    # Mount points fusermount3 refuses to a user: one line, before it runs or in its words.
    locked, sticky = work / "locked", work / "sticky"
    locked.mkdir()  # root's
    sticky.mkdir()
    sticky.chmod(0o1777)  # writable, but fusermount3 wants a sticky mount point to be the user's
    for mnt, words in ((locked, "may not write to it"), (sticky, "fusermount3: mountpoint")):
        env = ["env", "-i", "PATH=/usr/bin:/bin", f"HOME={work}", "LANG=C.UTF-8"]
        cmd = ["runuser", "-u", name, "--", *env, str(work / "venv/bin/lmdbfs"), "mount", "db.lmdb", mnt.name]
        proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 8 and proc.stdout == "", proc.stderr
        line = proc.stderr.strip()
        assert "\n" not in line and line.startswith("lmdbfs: error: ") and words in line, line
        assert os.listdir(mnt) == []

    # Without fusermount3 a user cannot mount: one line, and where to read instead.
    _whiteouts(hidden_layer, ["/usr/bin/fusermount3"])
    proc = _run_hidden(name, work, hidden_layer, "mkdir mnt2\nvenv/bin/lmdbfs mount db.lmdb mnt2")
    assert proc.returncode == 8 and proc.stdout == "", proc.stderr
    line = proc.stderr.strip()
    assert "\n" not in line and line.startswith("lmdbfs: error: fusermount3 not found") and "lmdbfs.open" in line

    # A fusermount3 that is not setuid root cannot mount for a user either.
    plain = hidden_layer / "bin" / "fusermount3"
    plain.unlink()
    shutil.copyfile("/usr/bin/fusermount3", plain)
    plain.chmod(0o755)
    proc = _run_hidden(name, work, hidden_layer, "venv/bin/lmdbfs mount db.lmdb mnt2")
    assert proc.returncode == 8 and proc.stdout == "", proc.stderr
    line = proc.stderr.strip()
    assert "\n" not in line and "/usr/bin/fusermount3 is not setuid root" in line and "lmdbfs.open" in line
    assert os.listdir(work / "mnt2") == []


def test_source_install_without_fuse_libraries_works_except_mount(
    shared: Path, built: dict, user: tuple[str, Path], hidden_layer: Path
) -> None:
    name, work = user
    _whiteouts(hidden_layer, _package_files(DEV_PACKAGES))
    sdist = shared / built["sdist"].name
    has = f"venv/bin/python -c '{HAS}' lmdbfs._readfiles lmdbfs._serve"
    script = f"""
"$PY" -m venv venv
venv/bin/pip install -q --no-index --find-links "$SHARED/wheelhouse" {sdist}
{has} > built.txt
L=venv/bin/lmdbfs
$L pack "$SHARED/tree" db.lmdb --no-progress
$L info db.lmdb > info.txt
$L ls db.lmdb train > ls.txt
$L cat db.lmdb train/list.txt > list.txt
$L verify db.lmdb --against "$SHARED/tree"
$L unpack db.lmdb out
diff -r "$SHARED/tree" out
venv/bin/python -c 'import lmdbfs; print(lmdbfs.open("db.lmdb").read_bytes("train/list.txt").decode(), end="")' > open.txt
venv/bin/python -c '
import lmdb, os
env = lmdb.open("stark", map_size=1 << 30)
with env.begin(write=True) as txn:
    txn.put(b"train/list.txt", open(os.path.join(os.environ["SHARED"], "tree/train/list.txt"), "rb").read())
'
$L adopt stark --no-progress
$L cat stark train/list.txt > adopted.txt
mkdir mnt
if $L mount db.lmdb mnt 2> mount.txt; then echo "mount did not refuse"; exit 1; else echo $? > mount_rc.txt; fi
# Without any C compiler the packer reads in Python: the install and the pack still work.
CC=false venv/bin/pip install -q --no-index --find-links "$SHARED/wheelhouse" --no-deps --force-reinstall {sdist}
{has} > built_nocc.txt
$L pack "$SHARED/tree" db2.lmdb --no-progress
$L verify db2.lmdb --against "$SHARED/tree"
echo done
"""
    proc = _run_hidden(name, work, hidden_layer, script)
    assert proc.returncode == 0 and proc.stdout.endswith("done\n"), proc.stdout + proc.stderr

    assert (work / "built.txt").read_text().split() == ["True", "False"]  # the reader built, the server not
    assert (work / "built_nocc.txt").read_text().split() == ["False", "False"]
    listing = (shared / "tree" / "train" / "list.txt").read_text()
    assert (work / "list.txt").read_text() == (work / "open.txt").read_text() == listing
    assert (work / "adopted.txt").read_text() == listing
    assert "GOT-10k_Train_000001" in (work / "ls.txt").read_text()
    assert (work / "info.txt").read_text().strip()
    line = (work / "mount.txt").read_text().strip()
    assert (work / "mount_rc.txt").read_text().strip() == "8"
    assert "\n" not in line and line.startswith("lmdbfs: error: the FUSE server was not built"), line
    for words in ("libfuse3-dev liblmdb-dev libxxhash-dev nettle-dev liburing-dev", "fuse3-devel", "lmdbfs.open"):
        assert words in line, line
    assert os.listdir(work / "mnt") == []
