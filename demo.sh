#!/usr/bin/env bash
# Build cbcr and run backup -> incremental -> restore -> verify on a local repository, or with
# --quic through a receiver on 127.0.0.1 (development certificates made on the way).
#   ./demo.sh [--quic] [SOURCE] [WORKDIR]      (default: /usr/lib into /tmp/cbcr-demo)
set -euo pipefail
cd "$(dirname "$0")"
quic=false
if [ "${1:-}" = "--quic" ]; then quic=true; shift; fi
src=${1:-/usr/lib}
work=${2:-/tmp/cbcr-demo}
cargo build --release -p dataplane --bin cbcr
cbcr=$PWD/target/release/cbcr
rm -rf "$work" && mkdir -p "$work"
export CBCR_REPO="$work/repo"
# The repository is encrypted; a real one takes --password-file, CBCR_PASSWORD_FILE or
# --key-command (a KMS or vault client) rather than a password in the environment.
export CBCR_PASSWORD=${CBCR_PASSWORD:-demo password}
if $quic; then
  $cbcr cert dev --out "$work/pki"
  $cbcr receiver --listen 127.0.0.1:0 --repo "$work/repo" \
    --cert "$work/pki/receiver.crt" --key "$work/pki/receiver.key" --ca "$work/pki/ca.crt" \
    >"$work/receiver.out" 2>"$work/receiver.log" &
  receiver=$!
  trap 'kill $receiver 2>/dev/null' EXIT
  until grep -q "listening on" "$work/receiver.out" 2>/dev/null; do sleep 0.1; done
  export CBCR_REPO="quic://$(sed -n 's/^listening on //p' "$work/receiver.out")"
  export CBCR_CERT="$work/pki/client.crt" CBCR_KEY="$work/pki/client.key" CBCR_CA="$work/pki/ca.crt"
  echo "== receiver at $CBCR_REPO (log: $work/receiver.log)"
fi
echo "== full backup of $src"
$cbcr backup --init "$src" --json | tail -1
echo "== incremental backup (unchanged files are not read)"
$cbcr backup "$src" --json | tail -1
$cbcr snapshots
echo "== restore to $work/out"
$cbcr restore latest --target "$work/out"
# --no-dereference: compare symlinks as links (a relative link out of $src dangles in the copy).
diff -r --no-dereference "$src" "$work/out$(realpath "$src")" && echo "restored tree is identical"
echo "== verify, reading every blob"
$cbcr verify --read-data
