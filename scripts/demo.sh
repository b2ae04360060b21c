#!/usr/bin/env bash
# Set up, then run the main job on a generated GOT-10k-shaped dataset: pack it, inspect
# it, mount it, and read it through the mount with the official GOT-10k toolkit.
#
#   bash scripts/demo.sh                 the DB on local disk
#   bash scripts/demo.sh --remote        the same DB served by nginx on 127.0.0.1: mount the URL
#   bash scripts/demo.sh --remote s3     the same DB in a local S3 server (SeaweedFS): mount s3://
#
# The remote runs start the server themselves, mount through a block cache in demo/cache,
# and stop the server and unmount at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
REMOTE=""
case "${1:-}" in
    "") ;;
    --remote) REMOTE=${2:-http} ;;
    *) echo "usage: bash scripts/demo.sh [--remote [http|s3]]" >&2; exit 2 ;;
esac
case "$REMOTE" in ""|http|s3) ;; *) echo "demo: --remote takes http or s3, not '$REMOTE'" >&2; exit 2 ;; esac
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
set +x
SERVER_PID=""
cleanup() {
    "$LMDBFS" umount demo/mnt 2>/dev/null || true
    if [ -n "$SERVER_PID" ]; then kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; fi
}
trap cleanup EXIT
DB=demo/got10k.lmdb
if [ -n "$REMOTE" ]; then
    # A server of our own on a free 127.0.0.1 port (tests/servers.py, as the tests start them).
    rm -rf demo/www demo/cache demo/server.out
    mkdir -p demo/www demo/cache
    cp demo/got10k.lmdb demo/www/got10k.lmdb
    if [ "$REMOTE" = http ]; then
        $PY -m tests.servers nginx demo/www > demo/server.out &
    else
        $PY -m tests.servers s3 demo/got10k.lmdb got10k.lmdb > demo/server.out &
    fi
    SERVER_PID=$!
    for _ in $(seq 1 600); do
        grep -q '^READY' demo/server.out 2>/dev/null && break
        kill -0 "$SERVER_PID" 2>/dev/null || { echo "demo: the $REMOTE server did not start" >&2; exit 1; }
        sleep 0.1
    done
    grep -q '^READY' demo/server.out || { echo "demo: the $REMOTE server did not start in 60 s" >&2; exit 1; }
    URL=$(sed -n 's/^URL //p' demo/server.out)
    if [ "$REMOTE" = http ]; then DB="$URL/got10k.lmdb"; else DB="$URL"; fi
    while IFS= read -r line; do export "${line#ENV }"; done < <(grep '^ENV ' demo/server.out)
    echo "demo: serving the DB at $DB" >&2
    # info, ls and verify keep their blocks in the default cache, $XDG_CACHE_HOME/lmdbfs;
    # the mount names the same folder, so it reads what verify fetched without a GET.
    export XDG_CACHE_HOME="$PWD/demo/cache"
fi
CACHE=()
if [ -n "$REMOTE" ]; then CACHE=(--cache-dir demo/cache/lmdbfs); fi
set -x
"$LMDBFS" info "$DB"
"$LMDBFS" ls -l "$DB" train/GOT-10k_Train_000001 | head -n 8
"$LMDBFS" verify "$DB" --against demo/GOT-10k
mkdir -p demo/mnt
"$LMDBFS" mount "$DB" demo/mnt "${CACHE[@]}"
set +x
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
