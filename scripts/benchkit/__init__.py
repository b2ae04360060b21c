"""The modules of ``scripts/bench.py``, which puts ``scripts/`` on ``sys.path`` and runs ``cli.main``.

scripts/ is not a package, so these import each other relatively, each only from
modules above it in this list (no cycles):

config    constants: paths, systems, phases, tree sizes, targets; the "bench" logger
docblocks the marked sections of benchmarks.md that one script writes and the others keep
cpubudget a simulated node's CPU quota (a cgroup its daemon and readers join)
proc      child processes and measurement: drop_caches, run_measured, run, RSS of a process tree
trees     the fake GOT-10k tree, walk+stat, mount-point helpers, Ctx (what a run shares)
systems   System and a subclass per way of storing the tree: pack, mount, unmount
readers   reader processes (forked) and one read epoch; the bytes check
phases    the run's phases: packs, walks and epochs per system, the cold rounds
machine   what the numbers were measured on
report    ratios against the targets, the markdown of docs/benchmarks.md
chart     docs/bench-<size>.png
union     --union-dbs: one mount of 1 DB against one of N shard DBs
cli       the command line and main()
"""
