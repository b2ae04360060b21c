#!/usr/bin/env bash
# Install everything lmdbfs needs on a Debian machine: FUSE 3 from apt, then the
# package with its test extras into ./.venv. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# fuse3 and the -dev packages: the FUSE server is a C extension built by `pip install -e .`;
# squashfs-tools, squashfuse, zip and unzip: benchmark baselines and archive tests.
apt_packages=(fuse3 libfuse3-3 squashfs-tools squashfuse zip unzip
    gcc pkg-config libfuse3-dev liblmdb-dev libxxhash-dev nettle-dev liburing-dev)
if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    apt_packages+=(python3 python3-venv)
elif ! python3 -m venv --help >/dev/null 2>&1 || ! python3 -c 'import ensurepip' 2>/dev/null; then
    apt_packages+=(python3-venv)
fi
# The C extension needs Python's headers (Debian's python3 has them in python3-dev).
if ! python3 -c 'import os, sysconfig; raise SystemExit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' 2>/dev/null; then
    apt_packages+=(python3-dev)
fi
# tests/test_install.py installs lmdbfs into a venv of the system's Python as an unprivileged user.
apt_packages+=(python3 python3-venv python3-dev)
# Remote DBs: nginx serves the HTTP tests (started by the tests, never as a service);
# httpdirfs is a benchmark baseline (a FUSE mount of one HTTP file).
apt_packages+=(nginx-light httpdirfs curl)
missing=()
for pkg in "${apt_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]} with apt-get" >&2
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    # Packages with a service (nginx) must not start it: the tests run their own on
    # 127.0.0.1. policy-rc.d says "no" to every service start during this install.
    guard=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        guard=/usr/sbin/policy-rc.d
        printf '#!/bin/sh\nexit 101\n' | as_root tee "$guard" >/dev/null
        as_root chmod 755 "$guard"
    fi
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    if [ -n "$guard" ]; then as_root rm -f "$guard"; fi
fi

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
# The server is optional in setup.py (a machine without libfuse3 still installs lmdbfs);
# here it must build, so a broken server fails now, not in the mount tests.
LMDBFS_REQUIRE_SERVER=1 .venv/bin/python -m pip install -q -e '.[test]'
# The DataLoader tests need PyTorch; 2.13.0 is the CPU build this kind of machine carries.
.venv/bin/python -c 'import torch' 2>/dev/null || .venv/bin/python -m pip install -q 'torch==2.13.0'
# `mount -t fuse.lmdbfs DB MNT` and /etc/fstab lines: mount(8) runs /sbin/mount.fuse.lmdbfs.
if [ "$(id -u)" = 0 ] && [ -d /sbin ]; then
    ln -sfn "$PWD/.venv/bin/mount.lmdbfs" /sbin/mount.fuse.lmdbfs
else
    echo "setup: as root, run: ln -sfn $PWD/.venv/bin/mount.lmdbfs /sbin/mount.fuse.lmdbfs (for mount -t fuse.lmdbfs and fstab)" >&2
fi
echo "setup: done — activate with: source .venv/bin/activate" >&2
