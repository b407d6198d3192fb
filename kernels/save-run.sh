#!/usr/bin/env bash
# Keeps a GPU run's output with the code it measured: copies the small text files of a device
# run (the `run` tool's files_at folder, or any $OUT) to kernels/runs/<date>-<commit>/, where
# every GPU number in kernels/NOTES.md must point. The commit is the one .dist was built from.
#   kernels/save-run.sh <folder with summary.md>
set -euo pipefail
cd "$(dirname "$0")/.."
src=${1:?usage: kernels/save-run.sh <folder with summary.md>}
[[ -f "$src/summary.md" ]] || { echo "$src has no summary.md" >&2; exit 1; }
commit=$(cat .dist/COMMIT 2>/dev/null || git rev-parse --short=7 HEAD)
dest="kernels/runs/$(date -u +%F)-$commit"
mkdir -p "$dest"
# Text only, each under 1 MB (logs of a failing step included; binaries and JSON streams not).
root=$PWD
(cd "$src" && find . -maxdepth 2 -type f \( -name '*.md' -o -name '*.log' -o -name '*.txt' \) -size -1024k \
    -exec cp --parents -t "$root/$dest" {} +)
ls "$dest"
echo "saved to $dest: commit it with the notes that cite it"
