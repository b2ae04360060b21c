"""The fake GOT-10k generator writes the real layout and formats, loadable by the toolkit."""

import hashlib
import importlib
import importlib.util
import io
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "make_fake_got10k.py"

SEQS, FRAMES = 4, 5  # 4 sequences: every default resolution appears once per split
GT_LINE = re.compile(r"^\d+\.\d{4},\d+\.\d{4},\d+\.\d{4},\d+\.\d{4}$")
META_KEYS = [
    "url",
    "begin",
    "end",
    "anno_fps",
    "object_class",
    "motion_class",
    "major_class",
    "root_class",
    "motion_adverb",
    "resolution",
]
LABELLED_FILES = {"groundtruth.txt", "absence.label", "cut_by_image.label", "cover.label", "meta_info.ini"}


def _load_script():
    spec = importlib.util.spec_from_file_location("make_fake_got10k", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


fake = _load_script()


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("got10k")
    summary = fake.make_tree(root, SEQS, FRAMES, workers=1)
    return root, summary


@pytest.fixture(scope="module")
def tiny_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("got10k_tiny")
    summary = fake.make_tree(root, 3, 6, splits=("train", "test"), tiny=True, seed=7, workers=2)
    return root, summary


def _all_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def _jpegs(root: Path) -> list[Path]:
    return sorted(root.rglob("*.jpg"))


def _lines(path: Path) -> list[str]:
    text = path.read_text()
    assert "\r" not in text and text.endswith("\n") and not text.endswith("\n\n")
    return text.splitlines()


def _meta(seq_dir: Path) -> dict[str, str]:
    lines = _lines(seq_dir / "meta_info.ini")
    assert lines[0] == "[METAINFO]"
    return dict(line.split(": ", 1) for line in lines[1:])


def _resolution(meta: dict[str, str]) -> tuple[int, int]:
    m = re.fullmatch(r"\((\d+), (\d+)\)", meta["resolution"])
    assert m, meta["resolution"]
    return int(m[1]), int(m[2])


def _opts(frames=FRAMES, **kw):
    return fake.GenOptions(frames=frames, **kw)


def test_layout_and_names(tree):
    root, _ = tree
    prefixes = {"train": "GOT-10k_Train_", "val": "GOT-10k_Val_", "test": "GOT-10k_Test_"}
    for split, prefix in prefixes.items():
        names = [f"{prefix}{i:06d}" for i in range(1, SEQS + 1)]
        assert _lines(root / split / "list.txt") == names
        assert sorted(p.name for p in (root / split).iterdir()) == sorted(names + ["list.txt"])
        for name in names:
            files = {p.name for p in (root / split / name).iterdir()}
            frames = {f"{i:08d}.jpg" for i in range(1, FRAMES + 1)}
            expected = frames | (LABELLED_FILES if split != "test" else {"groundtruth.txt"})
            assert files == expected


def test_summary_counts_what_is_on_disk(tree):
    root, summary = tree
    files = _all_files(root)
    assert summary.files == len(files) == 3 + 3 * SEQS * FRAMES + SEQS * (5 + 5 + 1)
    assert summary.bytes == sum(p.stat().st_size for p in files)
    assert summary.sequences == 3 * SEQS


def test_text_formats(tree):
    root, _ = tree
    for seq_dir in sorted((root / "train").glob("GOT-10k_*")) + sorted((root / "val").glob("GOT-10k_*")):
        gt = _lines(seq_dir / "groundtruth.txt")
        assert len(gt) == FRAMES and all(GT_LINE.match(line) for line in gt)
        for label, allowed in [("absence", "01"), ("cut_by_image", "01"), ("cover", "012345678")]:
            values = _lines(seq_dir / f"{label}.label")
            assert len(values) == FRAMES and all(v in allowed for v in values)
        meta = _meta(seq_dir)
        assert list(meta) == META_KEYS
        assert meta["url"].startswith("https://youtu.be/") and meta["anno_fps"] == "10Hz"
        assert re.fullmatch(r"\d\d:\d\d:\d\d", meta["begin"]) and meta["end"] > meta["begin"]
    for seq_dir in sorted((root / "test").glob("GOT-10k_*")):
        gt = _lines(seq_dir / "groundtruth.txt")
        assert len(gt) == 1 and GT_LINE.match(gt[0])


def test_boxes_stay_inside_image(tree):
    root, _ = tree
    for seq_dir in sorted((root / "train").glob("GOT-10k_*")):
        width, height = _resolution(_meta(seq_dir))
        boxes = np.loadtxt(seq_dir / "groundtruth.txt", delimiter=",")
        x, y, w, h = boxes.T
        assert (w >= 1).all() and (h >= 1).all() and (x >= 0).all() and (y >= 0).all()
        assert (x + w <= width + 1e-6).all() and (y + h <= height + 1e-6).all()
        assert np.abs(np.diff(boxes, axis=0)).max() < 0.1 * max(width, height)  # smooth motion


def test_frames_are_byte_unique(tree):
    root, _ = tree
    digests = [hashlib.sha256(p.read_bytes()).digest() for p in _jpegs(root)]
    assert len(digests) == 3 * SEQS * FRAMES == len(set(digests))


def test_frames_decode_at_announced_resolution(tree):
    root, _ = tree
    sizes = set()
    for split in ("train", "val", "test"):
        for i in range(1, SEQS + 1):
            seq_dir = root / split / fake.sequence_name(split, i)
            plan = fake.plan_sequence(split, i, _opts())
            if split != "test":
                assert _resolution(_meta(seq_dir)) == (plan.width, plan.height)
            for jpg in sorted(seq_dir.glob("*.jpg")):
                with Image.open(jpg) as im:
                    im.load()
                    assert im.format == "JPEG" and im.mode == "RGB"
                    assert im.size == (plan.width, plan.height)
            sizes.add((plan.width, plan.height))
    assert {(1920, 1080), (1280, 720), (640, 480), (1272, 720)} <= sizes


def test_frames_decode_with_opencv(tree):
    cv2 = importlib.import_module("cv2")
    root, _ = tree
    for jpg in _jpegs(root)[::FRAMES]:
        image = cv2.imread(str(jpg))
        assert image is not None and image.ndim == 3


def test_default_frame_sizes_are_in_range(tree):
    root, _ = tree
    kb = [p.stat().st_size / 1000 for p in _jpegs(root)]
    assert 30 < min(kb) and max(kb) < 450


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_official_toolkit_loads_it(tree, split):
    datasets = importlib.import_module("got10k.datasets")
    root, _ = tree
    dataset = datasets.GOT10k(str(root), subset=split, return_meta=True)
    assert len(dataset) == SEQS
    for i in range(SEQS):
        item = dataset[i]
        img_files, anno = item[0], item[1]
        plan = fake.plan_sequence(split, i + 1, _opts())
        assert len(img_files) == FRAMES
        expected = plan.boxes[:1] if split == "test" else plan.boxes
        assert anno.shape == expected.shape
        np.testing.assert_allclose(anno, expected, rtol=0, atol=1e-6)
        if split == "test":
            assert len(item) == 2  # the toolkit never returns meta for test
        else:
            meta = item[2]
            assert meta["resolution"] == f"({plan.width}, {plan.height})"
            np.testing.assert_array_equal(meta["cover"], plan.cover)
            np.testing.assert_array_equal(meta["absence"], plan.absence)
            np.testing.assert_array_equal(meta["cut_by_image"], plan.cut_by_image)


def test_tiny_mode(tiny_tree):
    root, summary = tiny_tree
    jpegs = _jpegs(root)
    assert len(jpegs) == 2 * 3 * 6
    assert len({p.read_bytes() for p in jpegs}) == len(jpegs)
    for jpg in jpegs:
        assert jpg.stat().st_size < 1500
        with Image.open(jpg) as im:
            im.load()
            assert 8 <= im.width <= 32 and 8 <= im.height <= 32
    meta = _meta(root / "train" / "GOT-10k_Train_000001")
    with Image.open(root / "train" / "GOT-10k_Train_000001" / "00000001.jpg") as im:
        assert _resolution(meta) == im.size
    assert not (root / "val").exists()
    assert summary.files == len(_all_files(root))


def test_tiny_tree_loads_in_toolkit(tiny_tree):
    datasets = importlib.import_module("got10k.datasets")
    root, _ = tiny_tree
    img_files, anno, _meta_ = datasets.GOT10k(str(root), subset="train", return_meta=True)[2]
    assert len(img_files) == 6 and anno.shape == (6, 4)


def test_same_seed_same_bytes_regardless_of_workers(tmp_path):
    a = fake.make_tree(tmp_path / "a", 2, 3, splits=("val",), seed=3, workers=1, min_kb=40, max_kb=60)
    b = fake.make_tree(tmp_path / "b", 2, 3, splits=("val",), seed=3, workers=2, min_kb=40, max_kb=60)
    fake.make_tree(tmp_path / "c", 2, 3, splits=("val",), seed=4, workers=1, min_kb=40, max_kb=60)
    files_a = {p.relative_to(tmp_path / "a"): p.read_bytes() for p in _all_files(tmp_path / "a")}
    files_b = {p.relative_to(tmp_path / "b"): p.read_bytes() for p in _all_files(tmp_path / "b")}
    files_c = {p.relative_to(tmp_path / "c"): p.read_bytes() for p in _all_files(tmp_path / "c")}
    assert files_a == files_b and (a.files, a.bytes) == (b.files, b.bytes)
    assert files_a.keys() == files_c.keys() and files_a != files_c


def test_size_steering(tmp_path):
    fake.make_tree(tmp_path, 1, 2, splits=("train",), min_kb=100, max_kb=100)
    kb = [p.stat().st_size / 1000 for p in _jpegs(tmp_path)]
    assert all(60 < k < 160 for k in kb), kb


def test_com_segment_keeps_jfif_first():
    plan = fake.plan_sequence("train", 3, _opts(frames=2))
    data = next(fake.iter_frames(plan, _opts(frames=2)))
    assert data[:4] == b"\xff\xd8\xff\xe0"  # SOI then APP0/JFIF, COM follows
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        assert b"train/GOT-10k_Train_000003/00000001" in im.info["comment"]


def test_refuses_non_empty_root_unless_forced(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(fake.UsageError):
        fake.make_tree(tmp_path, 1, 2, splits=("test",), tiny=True)
    summary = fake.make_tree(tmp_path, 1, 2, splits=("test",), tiny=True, force=True)
    assert summary.files == 1 + 3 and (tmp_path / "keep.txt").exists()


@pytest.mark.parametrize(
    "args",
    [
        ["--seqs", "0", "--frames", "3"],
        ["--seqs", "x", "--frames", "3"],
        ["--seqs", "1"],
        ["--seqs", "1", "--frames", "1"],
        ["--seqs", "1", "--frames", "3", "--splits", "train,bogus"],
        ["--seqs", "1", "--frames", "3", "--min-kb", "50", "--max-kb", "10"],
        ["--seqs", "1", "--frames", "3", "--workers", "0"],
    ],
)
def test_cli_bad_args_one_line_exit_2(tmp_path, args):
    proc = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "out"), *args], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "error:" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_cli_writes_tree_and_refuses_rerun(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, str(SCRIPT), str(out), "--seqs", "2", "--frames", "3", "--tiny", "--workers", "2", "-q"]
    first = subprocess.run(cmd, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("wrote 43 files") and first.stdout.count("\n") == 1  # 3 + 2*(8+8+4)
    assert len(_all_files(out)) == 43
    again = subprocess.run(cmd, capture_output=True, text=True)
    assert again.returncode == 2 and "not empty" in again.stderr and again.stderr.count("\n") == 1
