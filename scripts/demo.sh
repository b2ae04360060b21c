#!/usr/bin/env bash
# Set up, then run the main job on a generated GOT-10k-shaped dataset: pack it, inspect
# it, mount it, and read it through the mount with the official GOT-10k toolkit.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=.venv/bin/python
LMDBFS=.venv/bin/lmdbfs
SEQS=${DEMO_SEQS:-8}
FRAMES=${DEMO_FRAMES:-40}

mkdir -p demo
"$LMDBFS" umount demo/mnt 2>/dev/null || true  # left over from an earlier run
set -x
$PY scripts/make_fake_got10k.py demo/GOT-10k --seqs "$SEQS" --frames "$FRAMES" --force -q
"$LMDBFS" pack demo/GOT-10k demo/got10k.lmdb --force
"$LMDBFS" info demo/got10k.lmdb
"$LMDBFS" ls -l demo/got10k.lmdb train/GOT-10k_Train_000001 | head -n 8
"$LMDBFS" verify demo/got10k.lmdb --against demo/GOT-10k
mkdir -p demo/mnt
"$LMDBFS" mount demo/got10k.lmdb demo/mnt
set +x
trap '"$LMDBFS" umount demo/mnt' EXIT
$PY - <<'PY'
import numpy as np
from PIL import Image
from got10k.datasets import GOT10k

for subset in ("train", "val", "test"):
    mounted = GOT10k("demo/mnt", subset=subset, return_meta=True)
    source = GOT10k("demo/GOT-10k", subset=subset, return_meta=True)
    frames, boxes, *meta = mounted[0]
    src_frames, src_boxes, *_ = source[0]
    same = [a.replace("demo/mnt", "") for a in frames] == [a.replace("demo/GOT-10k", "") for a in src_frames]
    assert same and np.array_equal(boxes, src_boxes)
    image = Image.open(frames[0])
    extra = f", class {meta[0]['object_class']}" if meta and meta[0] else ""
    print(f"{subset}: {len(mounted)} sequences through the mount; first has {len(frames)} frames "
          f"of {image.size[0]}x{image.size[1]}, first box {boxes[0].tolist()}{extra}")
print("demo: the GOT-10k toolkit reads the mount exactly as it reads the source tree")
PY
