"""Builds lmdbfs._serve, the FUSE server in C, lmdbfs._readfiles, the packer's reader of
small files, and lmdbfs._blocks, a remote DB's block states; everything else lives in pyproject.toml."""

import glob
import subprocess

from setuptools import Extension, setup

LIBS = ["fuse3", "lmdb", "libxxhash", "nettle", "liburing"]


def pkg_config(flag: str) -> list[str]:
    try:
        out = subprocess.run(["pkg-config", flag, *LIBS], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return []
    return out.split()


cflags = pkg_config("--cflags") or ["-I/usr/include/fuse3"]
libs = pkg_config("--libs") or ["-lfuse3", "-llmdb", "-lxxhash", "-lnettle", "-luring"]

setup(
    ext_modules=[
        Extension(
            "lmdbfs._serve",
            sources=sorted(glob.glob("csrc/*.c")),
            depends=glob.glob("csrc/*.h") + glob.glob("csrc/blocks/*.h"),
            extra_compile_args=[*cflags, "-std=gnu11", "-O2", "-Wall", "-Wextra", "-Wno-missing-field-initializers"],
            extra_link_args=[*libs, "-lpthread"],
        ),
        Extension(
            "lmdbfs._readfiles",
            sources=["csrc/readfiles/readfiles.c"],
            extra_compile_args=["-std=gnu11", "-O2", "-Wall", "-Wextra", "-Wno-missing-field-initializers"],
        ),
        Extension(  # a remote DB's block states (docs/remote.md): libc only, like _readfiles
            "lmdbfs._blocks",
            sources=["csrc/blocks/blocks.c"],
            depends=["csrc/blocks/blockstate.h"],
            extra_compile_args=["-std=gnu11", "-O2", "-Wall", "-Wextra", "-Wno-missing-field-initializers"],
        ),
    ]
)
