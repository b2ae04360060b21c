"""Builds lmdbfs's C extensions; everything else lives in pyproject.toml.

Every extension is optional, so `pip install .` succeeds on any machine with Python:
- lmdbfs._readfiles, the packer's reader of small files, needs only a C compiler; without
  one the packer reads files in Python.
- lmdbfs._serve, the FUSE server, also needs libfuse3, LMDB, xxHash, Nettle and liburing
  (headers and libraries). Without them the install goes on without it and `lmdbfs mount`
  says which packages bring it; every other command and `lmdbfs.open()` work in Python.
LMDBFS_REQUIRE_SERVER=1 makes a missing or failing server build an error (the wheel
build and scripts/setup.sh set it, so a broken server never ships or goes unnoticed).
"""

import glob
import os
import subprocess
import sys

from setuptools import Extension, setup

SERVER_LIBS = ["fuse3", "lmdb", "libxxhash", "nettle", "liburing"]  # pkg-config names
CFLAGS = ["-std=gnu11", "-O2", "-Wall", "-Wextra", "-Wno-missing-field-initializers"]
REQUIRE_SERVER = os.environ.get("LMDBFS_REQUIRE_SERVER", "") not in ("", "0")


def pkg_config(*args: str) -> list[str] | None:
    """pkg-config's answer split into words; None when it is missing or lacks a library."""
    try:
        out = subprocess.run(["pkg-config", *args], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.split()


def server_flags() -> tuple[list[str], list[str]]:
    """Compile and link flags for the FUSE server: pkg-config's, or the usual defaults for a
    system without pkg-config or .pc files (the compiler then says whether they suffice)."""
    cflags, libs = pkg_config("--cflags", *SERVER_LIBS), pkg_config("--libs", *SERVER_LIBS)
    if cflags is None or libs is None:
        missing = [name for name in SERVER_LIBS if pkg_config("--exists", name) is None]
        print(f"lmdbfs: pkg-config does not find {', '.join(missing) or 'pkg-config itself'}", file=sys.stderr)
        return ["-I/usr/include/fuse3"], ["-lfuse3", "-llmdb", "-lxxhash", "-lnettle", "-luring"]
    return cflags, libs


server_cflags, server_libs = server_flags()

# One list: an extension whose build fails is left out (setuptools warns) unless it is required.
EXTENSIONS = [
    Extension(
        "lmdbfs._readfiles",
        sources=["csrc/readfiles/readfiles.c"],
        extra_compile_args=CFLAGS,
        optional=True,
    ),
    Extension(
        "lmdbfs._serve",
        sources=sorted(glob.glob("csrc/*.c")),
        depends=glob.glob("csrc/*.h") + glob.glob("csrc/blocks/*.h"),
        extra_compile_args=[*server_cflags, *CFLAGS],
        extra_link_args=[*server_libs, "-lpthread"],
        optional=not REQUIRE_SERVER,
    ),
]

setup(ext_modules=EXTENSIONS)
