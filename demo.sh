#!/usr/bin/env bash
# Build cbcr and run backup -> incremental -> restore -> verify on a local repository.
#   ./demo.sh [SOURCE] [WORKDIR]      (default: /usr/lib into /tmp/cbcr-demo)
set -euo pipefail
cd "$(dirname "$0")"
src=${1:-/usr/lib}
work=${2:-/tmp/cbcr-demo}
cargo build --release -p dataplane --bin cbcr
cbcr=./target/release/cbcr
rm -rf "$work" && mkdir -p "$work"
export CBCR_REPO="$work/repo"
echo "== full backup of $src"
$cbcr backup "$src" --json | tail -1
echo "== incremental backup (unchanged files are not read)"
$cbcr backup "$src" --json | tail -1
$cbcr snapshots
echo "== restore to $work/out"
$cbcr restore latest --target "$work/out"
# --no-dereference: compare symlinks as links (a relative link out of $src dangles in the copy).
diff -r --no-dereference "$src" "$work/out$(realpath "$src")" && echo "restored tree is identical"
echo "== verify, reading every blob"
$cbcr verify --read-data
