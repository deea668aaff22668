#!/usr/bin/env bash
# cbcr next to restic and borg on the same input, in one run: full backup, unchanged
# incremental, restore. Wall seconds and repository bytes. Installs restic/borg if missing.
#   bash bench/peers.sh FILE_OR_DIR [CORES]
set -euo pipefail
src=$(realpath "$1")
cores=${2:-$(nproc)}
work=$(mktemp -d /var/tmp/cbcr-peers.XXXXXX)
trap 'rm -rf "$work"' EXIT
cd "$(dirname "$0")/.."
if ! command -v restic >/dev/null || ! command -v borg >/dev/null; then
  apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y restic borgbackup
fi
cargo build --release -q -p dataplane --bin cbcr
cbcr=$PWD/target/release/cbcr
export RESTIC_PASSWORD=bench BORG_PASSPHRASE=bench BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK=yes
secs() { local t=$(date +%s.%N); "$@" >/dev/null 2>&1; echo "$(date +%s.%N) - $t" | bc; }
size() { du -sb "$1" | cut -f1; }
bytes=$(du -sb --apparent-size "$src" | cut -f1)
printf '%-8s %10s %10s %10s %10s %14s\n' tool full_s full_MB/s incr_s restore_s repo_bytes
row() { printf '%-8s %10.2f %10.0f %10.2f %10.2f %14d\n' "$1" "$2" "$(echo "$bytes / $2 / 1000000" | bc -l)" "$3" "$4" "$5"; }

sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
cat "$src" >/dev/null 2>&1 || tar cf - "$src" 2>/dev/null | cat >/dev/null
full=$(secs "$cbcr" backup --repo "$work/cbcr" "$src" --cores "$cores" --no-progress)
incr=$(secs "$cbcr" backup --repo "$work/cbcr" "$src" --cores "$cores" --no-progress)
rest=$(secs "$cbcr" restore latest --repo "$work/cbcr" --target "$work/out" --cores "$cores")
row cbcr "$full" "$incr" "$rest" "$(size "$work/cbcr")"; rm -rf "$work/out"

restic init --repo "$work/restic" >/dev/null
full=$(secs restic backup --repo "$work/restic" "$src")
incr=$(secs restic backup --repo "$work/restic" "$src")
rest=$(secs restic restore latest --repo "$work/restic" --target "$work/out")
row restic "$full" "$incr" "$rest" "$(size "$work/restic")"; rm -rf "$work/out"

borg init -e none "$work/borg" >/dev/null
full=$(secs borg create "$work/borg::a" "$src")
incr=$(secs borg create "$work/borg::b" "$src")
mkdir "$work/out"
rest=$(cd "$work/out" && secs borg extract "$work/borg::b")
row borg "$full" "$incr" "$rest" "$(size "$work/borg")"
