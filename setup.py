"""Builds lmdbfs's C extensions; everything else lives in pyproject.toml.

`pip install .` succeeds on any machine with Python:
- lmdbfs._readfiles, the packer's reader of small files, needs only a C compiler; without
  one the packer reads files in Python.
- lmdbfs._serve, the FUSE server, also needs libfuse3, LMDB, xxHash, Nettle and liburing
  (headers and libraries). Without them the install goes on without it and `lmdbfs mount`
  says which packages bring it; every other command and `lmdbfs.open()` work in Python.
- lmdbfs._blocks, a remote DB's block states (docs/remote.md), needs only a C compiler.
LMDBFS_REQUIRE_SERVER=1 makes a missing server an error (the wheel build and
scripts/setup.sh set it, so a wheel without the server never ships).
"""

import glob
import os
import subprocess
import sys

from setuptools import Extension, setup

# pkg-config names; the server uses fuse_loop_cfg_* (libfuse 3.12) and io_uring_submit_and_wait_timeout.
SERVER_NEEDS = ["fuse3 >= 3.12", "lmdb", "libxxhash", "nettle", "liburing >= 2.2"]
# An old header must fail the build, not leave an undefined symbol for import time.
CFLAGS = [
    "-std=gnu11",
    "-O2",
    "-Wall",
    "-Wextra",
    "-Wno-missing-field-initializers",
    "-Werror=implicit-function-declaration",
]
REQUIRE_SERVER = os.environ.get("LMDBFS_REQUIRE_SERVER", "") not in ("", "0")


def pkg_config(*args: str) -> list[str] | None:
    """pkg-config's answer split into words; None when it fails or is missing."""
    try:
        out = subprocess.run(["pkg-config", *args], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.split()


def server_build() -> tuple[list[str], list[str], bool] | None:
    """(compile flags, link flags, optional) for the FUSE server, or None to leave it out.

    pkg-config finds every library: build it, and a failure is an error (as without this
    logic). No pkg-config at all: try the usual flags, and leave the server out if that
    fails. pkg-config lacks a library, or finds one too old: leave it out, saying which.
    LMDBFS_REQUIRE_SERVER=1 turns both ways of leaving it out into errors."""
    cflags, libs = pkg_config("--cflags", *SERVER_NEEDS), pkg_config("--libs", *SERVER_NEEDS)
    if cflags is not None and libs is not None:
        return cflags, libs, False
    if pkg_config("--version") is None:
        return ["-I/usr/include/fuse3"], ["-lfuse3", "-llmdb", "-lxxhash", "-lnettle", "-luring"], not REQUIRE_SERVER
    missing = ", ".join(need for need in SERVER_NEEDS if pkg_config("--exists", need) is None)
    if REQUIRE_SERVER:
        sys.exit(f"lmdbfs: cannot build the FUSE server: pkg-config finds no {missing}")
    print(f"lmdbfs: building without the FUSE server: pkg-config finds no {missing}", file=sys.stderr)
    return None


# One list of extensions; an optional one whose build fails is left out (setuptools warns).
EXTENSIONS = [
    Extension(
        "lmdbfs._readfiles",
        sources=["csrc/readfiles/readfiles.c"],
        extra_compile_args=CFLAGS,
        optional=True,
    ),
    Extension(  # a remote DB's block states (docs/remote.md): libc only, like _readfiles
        "lmdbfs._blocks",
        sources=["csrc/blocks/blocks.c"],
        depends=["csrc/blocks/blockstate.h"],
        extra_compile_args=CFLAGS,
        optional=True,
    ),
]
server = server_build()
if server is not None:
    server_cflags, server_libs, optional = server
    EXTENSIONS.append(
        Extension(
            "lmdbfs._serve",
            sources=sorted(glob.glob("csrc/*.c")),
            depends=glob.glob("csrc/*.h") + glob.glob("csrc/blocks/*.h"),
            extra_compile_args=[*server_cflags, *CFLAGS],
            extra_link_args=[*server_libs, "-lpthread"],
            optional=optional,
        )
    )

setup(ext_modules=EXTENSIONS)
