#!/usr/bin/env bash
# Download MS-COCO 2014 train and val images and the 2014 caption annotations into data/.
#
# Safe to re-run: finished parts are skipped, a partial download resumes where it
# stopped, and each archive's MD5 is checked before it is unpacked and deleted.
# Needs curl, md5sum and unzip; about 19 GB of archives, 20 GB unpacked.
# Environment: DATA_DIR (default data), COCO_URL (default http://images.cocodataset.org, e.g. a mirror).
set -euo pipefail

DATA_DIR=${DATA_DIR:-data}
COCO_URL=${COCO_URL:-http://images.cocodataset.org}
# name  path on the server  MD5 of the archive (the published COCO 2014 archives)
ARCHIVES="
train2014 zips/train2014.zip ${TRAIN_MD5:-0da8c0bd3d6becc4dcb32757491aca88}
val2014 zips/val2014.zip ${VAL_MD5:-a3d79f5ed8d289b7a7554ce06a5782b3}
annotations annotations/annotations_trainval2014.zip ${ANNOTATIONS_MD5:-0a379cfc70b0e71301e0f377548639bd}
"

mkdir -p "$DATA_DIR"
while read -r name path md5; do
    [ -n "$name" ] || continue
    done_mark="$DATA_DIR/.$name.done"
    archive="$DATA_DIR/$(basename "$path")"
    if [ -e "$done_mark" ]; then
        echo "$name: already downloaded and unpacked, skipping"
        continue
    fi
    if [ ! -e "$archive" ]; then
        echo "$name: downloading $COCO_URL/$path (resumes a partial download)"
        if ! curl -fL --retry 3 -C - -o "$archive.part" "$COCO_URL/$path"; then
            echo "error: could not download $COCO_URL/$path (no network, or the server refused)." >&2
            echo "       What was fetched is kept in $archive.part; run download.sh again to resume." >&2
            exit 1
        fi
        echo "$name: checking the archive's MD5"
        if [ "$(md5sum < "$archive.part" | cut -d' ' -f1)" != "$md5" ]; then
            rm -f "$archive.part"
            echo "error: $archive is corrupt (MD5 is not $md5); deleted it, run download.sh again." >&2
            exit 1
        fi
        mv "$archive.part" "$archive"
    fi
    echo "$name: unpacking $archive"
    unzip -q -o "$archive" -d "$DATA_DIR"
    touch "$done_mark"
    rm "$archive"
done <<< "$ARCHIVES"
echo "COCO 2014 is in $DATA_DIR/"
