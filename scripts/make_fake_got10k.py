#!/usr/bin/env python3
"""Write a fake, GOT-10k-shaped directory tree for tests and benchmarks.

The real GOT-10k dataset is large and licensed, so tests and benchmarks need a
stand-in with the same layout, file formats and size profile, that the official
``got10k`` toolkit loads unchanged:

    ROOT/{train,val,test}/list.txt
    ROOT/train/GOT-10k_Train_000001/00000001.jpg ...
                                   groundtruth.txt       x,y,w,h per frame
                                   absence.label         0/1 per frame
                                   cut_by_image.label    0/1 per frame
                                   cover.label           0-8 per frame
                                   meta_info.ini         [METAINFO] key: value
    ROOT/val/GOT-10k_Val_000001/...                      same as train
    ROOT/test/GOT-10k_Test_000001/00000001.jpg ...
                                  groundtruth.txt        first frame only

Every frame is a real JPEG, and every file is byte-unique (each frame carries
its own JPEG COM segment), so deduplicating storage cannot cheat a benchmark.
Output depends only on the arguments (and the libjpeg build), not on
``--workers``.

Usage:
    python scripts/make_fake_got10k.py ROOT --seqs N --frames F
        [--splits train,val,test] [--tiny] [--seed S] [--workers W]
        [--min-kb A --max-kb B] [--force] [--quiet]

N sequences are written into EACH split. Frame sizes aim at a per-sequence
goal in [min_kb, max_kb] that grows with the resolution (defaults give
~75 KB at 640x480 up to ~340 KB at 1920x1080, ~170 KB on average); --tiny
writes 8-32 px frames of a few hundred bytes instead.

The module has no dependency on the lmdbfs package; import it by path and call
:func:`make_tree`.
"""

import argparse
import functools
import io
import logging
import multiprocessing as mp
import multiprocessing.queues
import os
import queue
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Self

import numpy as np
from PIL import Image
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # its sibling, fakeplan.py
from fakeplan import (  # noqa: E402
    BASES_PER_SEQUENCE,
    LABELLED_SPLITS,
    SIZE_LADDER,
    SPLITS,
    GenOptions,
    SeqPlan,
    Summary,
    UsageError,
    plan_sequence,
    seq_rng,
    sequence_name,
    text_files,
    text_lines,
)

__all__ = [
    "SPLITS",
    "GenOptions",
    "SeqPlan",
    "Summary",
    "UsageError",
    "make_tree",
    "plan_sequence",
    "sequence_name",
    "write_sequence",
    "main",
]

log = logging.getLogger("make_fake_got10k")


# --------------------------------------------------------------------------- images


def _encode(pixels: np.ndarray, quality: int, optimize: bool = False) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=quality, optimize=optimize)
    return buf.getvalue()


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Smooth colour field: compresses well, so noise alone steers the size."""
    coarse = rng.integers(0, 256, (3, 4, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC))


def _compose(background: np.ndarray, noise: np.ndarray, amplitude: int) -> np.ndarray:
    """Background plus noise scaled by amplitude/128: more noise, bigger JPEG."""
    if amplitude == 0:
        return background
    mixed = background.astype(np.int16) + (noise * amplitude >> 7)
    return np.clip(mixed, 0, 255).astype(np.uint8)


def _draw_target(pixels: np.ndarray, box: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """Paint the tracked box so the frames show something at the annotation."""
    x, y, w, h = (int(v) for v in box)
    out = pixels.copy()
    out[y : y + max(h, 1), x : x + max(w, 1)] = colour
    return out


def _pick_setting(background: np.ndarray, noise: np.ndarray, target: int) -> tuple[int, int]:
    """Binary-search SIZE_LADDER for the (quality, amplitude) closest to target bytes."""

    @functools.cache
    def size(i: int) -> int:
        quality, amplitude = SIZE_LADDER[i]
        return len(_encode(_compose(background, noise, amplitude), quality))

    lo, hi = 0, len(SIZE_LADDER) - 1
    while lo < hi:  # first rung with size >= target
        mid = (lo + hi) // 2
        if size(mid) >= target:
            hi = mid
        else:
            lo = mid + 1
    if lo > 0 and abs(size(lo - 1) - target) < abs(size(lo) - target):
        lo -= 1
    return SIZE_LADDER[lo]


def _base_frame_of(frame: int, frames: int, bases: int) -> int:
    """Base image shown by 0-based `frame`: contiguous chunks, like scene cuts."""
    return frame * bases // frames


def _base_jpegs(plan: SeqPlan, opts: GenOptions) -> list[bytes]:
    """A few distinct encoded images per sequence; frames reuse them cheaply."""
    rng = seq_rng(opts, plan.split, plan.index, stream=1)
    frames = len(plan.boxes)
    count = min(frames, BASES_PER_SEQUENCE)
    shape = (plan.height, plan.width, 3)
    noise = rng.integers(-128, 128, shape, dtype=np.int16)
    if opts.thumbs:
        quality, amplitude, optimize = 85, 24, True
    elif opts.tiny:
        quality, amplitude, optimize = 75, 24, True  # optimize: ~400 B instead of ~700 B
    else:
        quality, amplitude = _pick_setting(_background(rng, plan.width, plan.height), noise, plan.target_bytes)
        optimize = False
    bases = []
    for k in range(count):
        first = -(-k * frames // count)  # first frame shown with base k
        pixels = _compose(_background(rng, plan.width, plan.height), np.roll(noise, 997 * k, axis=1), amplitude)
        pixels = _draw_target(pixels, plan.boxes[first], rng.integers(0, 256, 3, dtype=np.uint8))
        bases.append(_encode(pixels, quality, optimize))
    return bases


def _split_after_app0(jpeg: bytes) -> tuple[bytes, bytes]:
    """Split after SOI+APP0 (JFIF wants APP0 first), where a COM segment may go."""
    if jpeg[:4] != b"\xff\xd8\xff\xe0":
        raise ValueError("encoder did not produce a JFIF stream")
    cut = 4 + int.from_bytes(jpeg[4:6], "big")
    return jpeg[:cut], jpeg[cut:]


def _com_segment(text: str) -> bytes:
    payload = text.encode("ascii")
    return b"\xff\xfe" + (len(payload) + 2).to_bytes(2, "big") + payload


def iter_frames(plan: SeqPlan, opts: GenOptions) -> Iterator[bytes]:
    """JPEG bytes of frames 1..F; the COM segment makes each one byte-unique."""
    bases = [_split_after_app0(b) for b in _base_jpegs(plan, opts)]
    frames = len(plan.boxes)
    for f in range(frames):
        head, tail = bases[_base_frame_of(f, frames, len(bases))]
        tag = f"fake GOT-10k seed={opts.seed} {plan.split}/{plan.name}/{f + 1:08d}"
        yield head + _com_segment(tag) + tail


# --------------------------------------------------------------------------- writing


def _write_at(dir_fd: int, name: str, data: bytes) -> int:
    """Create/overwrite one file relative to an open directory (saves path lookups)."""
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644, dir_fd=dir_fd)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)
    return len(data)


def write_sequence(root: Path, plan: SeqPlan, opts: GenOptions) -> tuple[int, int]:
    """Write one sequence folder; returns (files, bytes)."""
    seq_dir = root / plan.split / plan.name
    seq_dir.mkdir(parents=True, exist_ok=True)
    dir_fd = os.open(seq_dir, os.O_RDONLY | os.O_DIRECTORY)
    files = nbytes = 0
    try:
        for name, data in text_files(plan):
            nbytes += _write_at(dir_fd, name, data)
            files += 1
        for f, data in enumerate(iter_frames(plan, opts), start=1):
            nbytes += _write_at(dir_fd, f"{f:08d}.jpg", data)
            files += 1
    finally:
        os.close(dir_fd)
    return files, nbytes


def _files_per_sequence(split: str, frames: int) -> int:
    return frames + (5 if split in LABELLED_SPLITS else 1)


def _write_sequence_job(root: Path, opts: GenOptions, split: str, index: int) -> tuple[int, int]:
    return write_sequence(root, plan_sequence(split, index, opts), opts)


def _worker(
    root: Path, opts: GenOptions, tasks: multiprocessing.queues.Queue, results: multiprocessing.queues.Queue
) -> None:
    """Forked worker: pull (split, index) jobs until None, report (files, bytes)."""
    try:
        while (job := tasks.get()) is not None:
            results.put(("ok", *_write_sequence_job(root, opts, *job)))
    except BaseException as exc:  # report anything, including Ctrl-C, to the parent
        results.put(("error", f"{type(exc).__name__}: {exc}", 0))


class _NullBar:
    """Stands in for tqdm when no progress bar is wanted."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def update(self, n: int) -> None:
        return None


def _run_serial(root: Path, opts: GenOptions, jobs: list[tuple[str, int]], bar: tqdm | _NullBar) -> tuple[int, int]:
    files = nbytes = 0
    for job in jobs:
        f, b = _write_sequence_job(root, opts, *job)
        files, nbytes = files + f, nbytes + b
        bar.update(f)
    return files, nbytes


def _run_forked(
    root: Path, opts: GenOptions, jobs: list[tuple[str, int]], workers: int, bar_factory: Callable[[], tqdm | _NullBar]
) -> tuple[int, int]:
    """Fork workers fed from a queue (dynamic balancing, nothing but job tuples pickled).

    Forked Process targets are not pickled, so this also works when the module
    was loaded by path and is not importable by name.
    """
    ctx = mp.get_context("fork")
    tasks, results = ctx.Queue(), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(root, opts, tasks, results), daemon=True) for _ in range(workers)]
    for p in procs:  # fork before any queue feeder or tqdm thread exists
        p.start()
    for job in [*jobs, *[None] * workers]:
        tasks.put(job)
    files = nbytes = done = 0
    try:
        with bar_factory() as bar:  # created after fork: no tqdm thread in the children
            while done < len(jobs):
                try:
                    kind, a, b = results.get(timeout=0.5)
                except queue.Empty:
                    if any(p.exitcode not in (None, 0) for p in procs):
                        raise RuntimeError("a worker process died") from None
                    continue
                if kind == "error":
                    raise RuntimeError(f"worker failed: {a}")
                files, nbytes, done = files + a, nbytes + b, done + 1
                bar.update(a)
    finally:
        for p in procs:
            if done < len(jobs) and p.is_alive():
                p.terminate()
            p.join()
    return files, nbytes


# --------------------------------------------------------------------------- tree


def _validate(
    seqs: int, frames: int, splits: Sequence[str], workers: int, min_kb: float, max_kb: float, seed: int
) -> None:
    if seqs < 1:
        raise UsageError(f"--seqs must be >= 1, got {seqs}")
    if frames < 1:
        raise UsageError(f"--frames must be >= 1, got {frames}")
    if not splits:
        raise UsageError("no split given")
    unknown = [s for s in splits if s not in SPLITS]
    if unknown or len(set(splits)) != len(splits):
        raise UsageError(f"--splits must be distinct names from {','.join(SPLITS)}, got {','.join(splits)}")
    if frames < 2 and LABELLED_SPLITS & set(splits):
        raise UsageError("--frames must be >= 2 for train/val (the got10k toolkit cannot load 1-frame sequences)")
    if workers < 1:
        raise UsageError(f"--workers must be >= 1, got {workers}")
    if not 0 < min_kb <= max_kb:
        raise UsageError(f"need 0 < --min-kb <= --max-kb, got {min_kb} and {max_kb}")
    if seed < 0:
        raise UsageError(f"--seed must be >= 0, got {seed}")


def _prepare_root(root: Path, splits: Sequence[str], force: bool) -> None:
    """Refuse a non-empty ROOT unless forced; forced, drop the splits being rewritten."""
    if root.exists() and not root.is_dir():
        raise UsageError(f"ROOT exists and is not a directory: {root}")
    if root.is_dir() and any(root.iterdir()):
        if not force:
            raise UsageError(f"ROOT is not empty (use --force to write into it): {root}")
        for split in splits:
            if (root / split).is_dir() and not (root / split).is_symlink():
                log.info("--force: removing %s", root / split)
                shutil.rmtree(root / split)
    for split in splits:
        (root / split).mkdir(parents=True, exist_ok=True)


def _write_lists(root: Path, splits: Sequence[str], seqs: int) -> tuple[int, int]:
    nbytes = 0
    for split in splits:
        data = text_lines([sequence_name(split, i) for i in range(1, seqs + 1)])
        (root / split / "list.txt").write_bytes(data)
        nbytes += len(data)
    return len(splits), nbytes


def _progress_bar(total: int, done: int, enabled: bool) -> tqdm | _NullBar:
    """tqdm on stderr counting files, or a no-op for library use."""
    if not enabled:
        return _NullBar()
    return tqdm(total=total, initial=done, unit="file", unit_scale=True, file=sys.stderr, smoothing=0.1)


def make_tree(
    root: str | os.PathLike[str],
    seqs: int,
    frames: int,
    splits: Sequence[str] = SPLITS,
    tiny: bool = False,
    seed: int = 0,
    workers: int = 1,
    *,
    min_kb: float = 35.0,
    max_kb: float = 400.0,
    thumbs: bool = False,
    force: bool = False,
    progress: bool = False,
) -> Summary:
    """Write `seqs` sequences of `frames` frames into each split under root.

    Raises UsageError for bad arguments or a non-empty root (unless force, which
    deletes the chosen split folders first). workers > 1 forks processes (falls
    back to 1 where fork is unavailable); the output is the same either way.
    """
    splits = tuple(splits)
    _validate(seqs, frames, splits, workers, min_kb, max_kb, seed)
    root = Path(root)
    opts = GenOptions(frames=frames, tiny=tiny, seed=seed, min_kb=min_kb, max_kb=max_kb, thumbs=thumbs)
    jobs = [(split, i) for split in splits for i in range(1, seqs + 1)]
    total = len(splits) + sum(_files_per_sequence(s, frames) for s, _ in jobs)
    workers = min(workers, len(jobs))
    if workers > 1 and "fork" not in mp.get_all_start_methods():
        log.warning("fork is unavailable here; using 1 worker")
        workers = 1

    start = time.perf_counter()
    _prepare_root(root, splits, force)
    log.info(
        "writing %d files: %d sequences x %d frames per split %s, tiny=%s, seed=%d, %d worker(s) -> %s",
        total,
        seqs,
        frames,
        ",".join(splits),
        tiny,
        seed,
        workers,
        root,
    )
    files, nbytes = _write_lists(root, splits, seqs)
    bars = functools.partial(_progress_bar, total, files, progress)
    if workers == 1:
        with bars() as bar:
            f, b = _run_serial(root, opts, jobs, bar)
    else:
        f, b = _run_forked(root, opts, jobs, workers, bars)
    return Summary(files=files + f, bytes=nbytes + b, seconds=time.perf_counter() - start, sequences=len(jobs))


# --------------------------------------------------------------------------- CLI


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors in one line (no usage dump) with exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def _parse_splits(text: str) -> tuple[str, ...]:
    return tuple(s.strip() for s in text.split(",") if s.strip())


def _build_parser() -> _Parser:
    p = _Parser(prog="make_fake_got10k.py", description="Write a fake GOT-10k tree (real JPEGs, toolkit-loadable).")
    p.add_argument("root", metavar="ROOT", help="output directory (created; must be empty unless --force)")
    p.add_argument("--seqs", type=int, required=True, help="sequences per split")
    p.add_argument("--frames", type=int, required=True, help="frames per sequence")
    p.add_argument("--splits", type=_parse_splits, default=SPLITS, help="comma list of train,val,test (default all)")
    p.add_argument("--tiny", action="store_true", help="8-32 px frames of a few hundred bytes, for file-count scale")
    p.add_argument("--thumbs", action="store_true", help="56-72 px frames of ~1.6-2.2 KB: a tree of tiny files")
    p.add_argument("--seed", type=int, default=0, help="output is a function of the seed (default 0)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (default: CPU count)")
    p.add_argument("--min-kb", type=float, default=35.0, help="frame size goal, low end, 1000-byte KB (default 35)")
    p.add_argument("--max-kb", type=float, default=400.0, help="frame size goal, high end (default 400)")
    p.add_argument(
        "--force", action="store_true", help="allow a non-empty ROOT; deletes the chosen split folders first"
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or info logging")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit code."""
    args = _build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(name)s: %(levelname)s: %(message)s",
        stream=sys.stderr,
    )
    prog = "make_fake_got10k.py"
    try:
        summary = make_tree(
            args.root,
            args.seqs,
            args.frames,
            args.splits,
            tiny=args.tiny,
            thumbs=args.thumbs,
            seed=args.seed,
            workers=args.workers,
            min_kb=args.min_kb,
            max_kb=args.max_kb,
            force=args.force,
            progress=not args.quiet,
        )
    except UsageError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; {args.root} is incomplete", file=sys.stderr)
        return 130
    except (OSError, RuntimeError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    print(summary.line(args.root))
    return 0


if __name__ == "__main__":
    sys.exit(main())
