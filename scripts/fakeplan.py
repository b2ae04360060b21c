"""The plan of a fake GOT-10k tree for scripts/make_fake_got10k.py: the splits, the
sequences' names, sizes and resolutions, and every annotation file (groundtruth.txt, the
labels, meta_info.ini) of a sequence, all a function of (split, index, options). The
frames' pixels are made by make_fake_got10k.py from these plans; this module draws no
image.

No dependency on the lmdbfs package.
"""

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

SPLITS = ("train", "val", "test")
SPLIT_PREFIX = {"train": "GOT-10k_Train_", "val": "GOT-10k_Val_", "test": "GOT-10k_Test_"}
LABELLED_SPLITS = frozenset({"train", "val"})

# Real GOT-10k frame sizes; sequence i uses RESOLUTIONS[(i - 1) % 4], so any
# split with >= 4 sequences has all of them and sequence 1 is always 1080p.
RESOLUTIONS = ((1920, 1080), (1280, 720), (640, 480), (1272, 720))
FULL_HD_PIXELS = 1920 * 1080
TINY_SIDES = (8, 16, 24, 32)
THUMB_SIDES = (56, 64, 72)
BASES_PER_SEQUENCE = 4  # distinct encoded images per sequence ("scene cuts")
ANNO_FPS = 10

# (quality, noise amplitude) settings in roughly increasing JPEG size; a
# binary search over this ladder hits a per-sequence frame size target.
SIZE_LADDER = tuple(
    [(q, 0) for q in (10, 20, 30, 40, 50, 60, 70, 80, 90)]
    + [(90, a) for a in (2, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128)]
    + [(95, 128)]
)

CLASSES = (  # (object_class, major_class, root_class)
    ("ichneumon", "viverrine", "animal"),
    ("zebra", "equine", "animal"),
    ("goldfinch", "finch", "animal"),
    ("sea turtle", "turtle", "animal"),
    ("sedan", "car", "motor vehicle"),
    ("motorcycle", "motor vehicle", "motor vehicle"),
    ("sailboat", "boat", "vessel"),
    ("hot-air balloon", "balloon", "aircraft"),
)
MOTIONS = ("walking", "running", "swimming", "flying", "jumping", "gliding", "rolling", "sailing")
ADVERBS = ("slowly", "quickly", "normally")
URL_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


class UsageError(ValueError):
    """Bad arguments or an unusable ROOT: the CLI reports it in one line, exit 2."""


@dataclass(frozen=True)
class GenOptions:
    """Everything besides (split, index) that a sequence's content depends on."""

    frames: int
    tiny: bool = False
    seed: int = 0
    thumbs: bool = False  # 56-72 px frames of ~1.6-2.2 KB (thumbnails, crops): the 2 KB edge
    min_kb: float = 35.0
    max_kb: float = 400.0


@dataclass(frozen=True)
class SeqPlan:
    """The cheap, image-free description of one sequence (tests compare against it)."""

    split: str
    index: int
    name: str
    width: int
    height: int
    boxes: np.ndarray  # (frames, 4) float64 x,y,w,h, already rounded to 4 decimals
    cover: np.ndarray  # (frames,) int, 0-8
    absence: np.ndarray  # (frames,) int, 0/1
    cut_by_image: np.ndarray  # (frames,) int, 0/1
    meta: dict[str, str]
    target_bytes: int


@dataclass(frozen=True)
class Summary:
    """What make_tree wrote: all files (frames, labels, list.txt) and their bytes."""

    files: int
    bytes: int
    seconds: float
    sequences: int

    def line(self, root: str | os.PathLike[str]) -> str:
        """One-line human summary with rates."""
        secs = max(self.seconds, 1e-9)
        return (
            f"wrote {self.files} files, {self.bytes / 1e6:.1f} MB ({self.bytes} bytes), "
            f"{self.sequences} sequences in {self.seconds:.1f} s "
            f"({self.files / secs:.0f} files/s, {self.bytes / 1e6 / secs:.1f} MB/s) -> {root}"
        )


# --------------------------------------------------------------------------- plan


def sequence_name(split: str, index: int) -> str:
    """GOT-10k folder name, e.g. GOT-10k_Train_000001 (indices start at 1)."""
    return f"{SPLIT_PREFIX[split]}{index:06d}"


def seq_rng(opts: GenOptions, split: str, index: int, stream: int) -> np.random.Generator:
    """Independent generator per (seed, split, sequence, purpose): worker-count independent."""
    return np.random.default_rng([opts.seed, SPLITS.index(split), index, stream])


def _resolution(rng: np.random.Generator, index: int, tiny: bool, thumbs: bool = False) -> tuple[int, int]:
    if thumbs:
        return int(rng.choice(THUMB_SIDES)), int(rng.choice(THUMB_SIDES))
    if tiny:
        return int(rng.choice(TINY_SIDES)), int(rng.choice(TINY_SIDES))
    return RESOLUTIONS[(index - 1) % len(RESOLUTIONS)]


def _wave(rng: np.random.Generator, t: np.ndarray, lo_period: float, hi_period: float) -> np.ndarray:
    """A slow sine in [-1, 1] with random period and phase: smooth motion."""
    period = rng.uniform(lo_period, hi_period)
    return np.sin(2 * np.pi * t / period + rng.uniform(0, 2 * np.pi))


def _make_boxes(rng: np.random.Generator, frames: int, width: int, height: int) -> np.ndarray:
    """A smoothly moving and breathing box that always stays inside the image."""
    t = np.arange(frames, dtype=np.float64)
    scale = 1.0 + 0.15 * _wave(rng, t, 60, 200)
    w = np.round(np.clip(width * rng.uniform(0.1, 0.4) * scale, 1.0, width), 4)
    h = np.round(np.clip(height * rng.uniform(0.1, 0.4) * scale, 1.0, height), 4)
    cx = width * (0.5 + rng.uniform(0.1, 0.35) * _wave(rng, t, 80, 300))
    cy = height * (0.5 + rng.uniform(0.1, 0.35) * _wave(rng, t, 80, 300))
    x = np.clip(np.round(cx - w / 2, 4), 0.0, width - w)
    y = np.clip(np.round(cy - h / 2, 4), 0.0, height - h)
    return np.stack([x, y, w, h], axis=1)


def _make_cover(rng: np.random.Generator, frames: int) -> np.ndarray:
    """Visible ratio 0-8: fully visible except a few smooth occlusion episodes."""
    cover = np.full(frames, 8, dtype=np.int64)
    for _ in range(rng.poisson(frames / 100.0)):
        length = int(rng.integers(5, 31))
        start = int(rng.integers(0, frames))
        depth = int(rng.integers(1, 9))
        ramp = 1.0 - np.abs(np.linspace(-1.0, 1.0, length))  # 0 -> 1 -> 0
        dip = np.round(8 - depth * ramp).astype(np.int64)[: frames - start]
        cover[start : start + len(dip)] = np.minimum(cover[start : start + len(dip)], dip)
    return cover


def _cut_by_image(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """1 where the box touches the image border (it was clipped there)."""
    x, y, w, h = boxes.T
    touch = (x <= 0.5) | (y <= 0.5) | (x + w >= width - 0.5) | (y + h >= height - 0.5)
    return touch.astype(np.int64)


def _clock(seconds: int) -> str:
    return f"{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _make_meta(rng: np.random.Generator, frames: int, width: int, height: int) -> dict[str, str]:
    """meta_info.ini fields in the order and style of the real files."""
    url_id = "".join(URL_ALPHABET[i] for i in rng.integers(0, len(URL_ALPHABET), 11))
    begin = int(rng.integers(0, 1800))
    obj, major, root = CLASSES[int(rng.integers(len(CLASSES)))]
    return {
        "url": f"https://youtu.be/{url_id}",
        "begin": _clock(begin),
        "end": _clock(begin + math.ceil(frames / ANNO_FPS)),
        "anno_fps": f"{ANNO_FPS}Hz",
        "object_class": obj,
        "motion_class": MOTIONS[int(rng.integers(len(MOTIONS)))],
        "major_class": major,
        "root_class": root,
        "motion_adverb": ADVERBS[int(rng.integers(len(ADVERBS)))],
        "resolution": f"({width}, {height})",
    }


def _target_bytes(rng: np.random.Generator, opts: GenOptions, width: int, height: int) -> int:
    """Frame size goal: larger frames get more of the [min_kb, max_kb] range."""
    share = min(1.0, width * height / FULL_HD_PIXELS) * rng.uniform(0.6, 1.0)
    return int(1000 * (opts.min_kb + (opts.max_kb - opts.min_kb) * share))


def plan_sequence(split: str, index: int, opts: GenOptions) -> SeqPlan:
    """Deterministic layout, boxes, labels and meta of one sequence (no pixels)."""
    rng = seq_rng(opts, split, index, stream=0)
    width, height = _resolution(rng, index, opts.tiny, opts.thumbs)
    boxes = _make_boxes(rng, opts.frames, width, height)
    cover = _make_cover(rng, opts.frames)
    return SeqPlan(
        split=split,
        index=index,
        name=sequence_name(split, index),
        width=width,
        height=height,
        boxes=boxes,
        cover=cover,
        absence=(cover == 0).astype(np.int64),
        cut_by_image=_cut_by_image(boxes, width, height),
        meta=_make_meta(rng, opts.frames, width, height),
        target_bytes=_target_bytes(rng, opts, width, height),
    )


# --------------------------------------------------------------------------- text files


def text_lines(rows: Sequence[str]) -> bytes:
    """'\\n'-terminated lines, like the real files (np.loadtxt reads them as-is)."""
    return "".join(f"{row}\n" for row in rows).encode("ascii")


def groundtruth_text(boxes: np.ndarray) -> bytes:
    """x,y,w,h with 4 decimals, e.g. 347.0000,443.0000,429.0000,272.0000."""
    return text_lines([",".join(f"{v:.4f}" for v in box) for box in boxes])


def text_files(plan: SeqPlan) -> list[tuple[str, bytes]]:
    """Annotation files of a sequence; the test split only has the first box."""
    if plan.split not in LABELLED_SPLITS:
        return [("groundtruth.txt", groundtruth_text(plan.boxes[:1]))]
    meta = text_lines(["[METAINFO]"] + [f"{k}: {v}" for k, v in plan.meta.items()])
    return [
        ("groundtruth.txt", groundtruth_text(plan.boxes)),
        ("absence.label", text_lines([str(v) for v in plan.absence])),
        ("cut_by_image.label", text_lines([str(v) for v in plan.cut_by_image])),
        ("cover.label", text_lines([str(v) for v in plan.cover])),
        ("meta_info.ini", meta),
    ]
