#!/usr/bin/env bash
# Download and unpack Pascal VOC 2007 (trainval + test) into DEST/VOCdevkit/VOC2007.
# Needs internet; nothing in spp_detect downloads data at run time.
set -euo pipefail
dest="${1:-data}"
mkdir -p "$dest"
cd "$dest"
base="http://host.robots.ox.ac.uk/pascal/VOC/voc2007"
for f in VOCtrainval_06-Nov-2007.tar VOCtest_06-Nov-2007.tar; do
  if [ ! -f "$f" ]; then
    curl -fL --retry 3 -o "$f.part" "$base/$f" && mv "$f.part" "$f"
  fi
  tar -xf "$f"
done
test -f VOCdevkit/VOC2007/ImageSets/Main/test.txt
echo "VOC2007 ready: $(pwd)/VOCdevkit (use --voc-root $(pwd)/VOCdevkit --year 2007)"
