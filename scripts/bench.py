#!/usr/bin/env python3
"""Side-by-side benchmark: raw tree vs lmdbfs vs SquashFS vs tar+ratarmount vs seed LMDB.

Users choose between keeping the raw tree, ``tar`` + ratarmount, a SquashFS
image + squashfuse, or an LMDB their loaders read directly.  This script
measures all of them in one run on one machine so the ratios are comparable:

1. generate (or reuse) a fake GOT-10k tree (``--size smoke|medium|full``);
2. pack it with ``lmdbfs pack``, the seed-style converter
   (``scripts/seed_convert.py``), ``tar cf`` + ratarmount's index, and
   ``mksquashfs -noI -noD -noF -noX``; caches dropped before each; wall time,
   peak RSS and output size;
3. mount lmdbfs, ratarmount and squashfuse and read every file in a seeded
   random order with 1/2/4 reader processes: first epoch (backing file in page
   cache, fresh mount), steady epoch, cold cache; ``os.walk`` + ``stat``,
   mount time and daemon RSS; every mount's bytes checked against the source;
4. write ``bench-<size>.png`` and ``benchmarks.md`` (raw results embedded, so
   sizes run separately accumulate) to ``--out-dir`` (default ``docs/``), a
   JSON copy to ``--workdir``, and print the ratios against the targets.

It is not a unit test.  ``--size smoke`` (a few dozen files) exists so that a
test can check the harness does not crash.

The code is in the package ``scripts/benchkit/`` (one module per part: processes,
trees, systems, readers, phases, report, chart, cli; see its ``__init__``); this
file only puts ``scripts/`` on ``sys.path`` and runs ``benchkit.cli.main``.
"""

from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if sys.path[:1] != [_HERE]:  # loaded by path rather than run; and ahead of any other "benchkit"
    sys.path.insert(0, _HERE)

from benchkit.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
