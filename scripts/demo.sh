#!/usr/bin/env bash
# The main job on a local sample project: generate images, pack them into blobs, mount the
# project, look at it with ordinary tools, compare every byte, unmount.
set -euo pipefail
PY=${PY:-.venv/bin/python}
BLOBFS="$PY -m blobfs"
DEMO=${DEMO_DIR:-demo}
rm -rf "$DEMO"
mkdir -p "$DEMO/mnt"
echo "== generating 200 sample images"
$PY -m tests.support.sample "$DEMO/images" --count 200
echo "== packing them into a blob project (several blobs of at most 256K)"
$BLOBFS pack "$DEMO/images" "$DEMO/project" --dataset train --blob-size 256K
ls -l "$DEMO/project/blob" "$DEMO/project/train"
echo "== checking the project"
$BLOBFS check "$DEMO/project"
echo "== mounting"
$BLOBFS mount "$DEMO/project" "$DEMO/mnt"
trap '$BLOBFS unmount "$DEMO/mnt" 2>/dev/null || true' EXIT
ls "$DEMO/mnt" "$DEMO/mnt/train"
echo "== find | head"
find "$DEMO/mnt" | sed -n 1,8p  # sed reads all input: no SIGPIPE under pipefail
echo "== md5sum: mount vs originals"
(cd "$DEMO/mnt/train/img" && md5sum img_000000.png img_000199.png)
(cd "$DEMO/images" && md5sum img_000000.png img_000199.png)
diff -r "$DEMO/images" "$DEMO/mnt/train/img" && echo "all 200 images identical"
echo "== one annotation"
cat "$DEMO/mnt/train/ann/img_000000.png.json"; echo
echo "== unmounting"
$BLOBFS unmount "$DEMO/mnt"
trap - EXIT
echo "demo done"
