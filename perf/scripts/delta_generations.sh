#!/bin/bash
# Growth per generation of the synthetic database under a page policy (docs/PERFORMANCE.md).
#   bash perf/scripts/delta_generations.sh WORK NAME [cbcr backup options...]
set -euo pipefail
WORK=$1; NAME=$2; shift 2
HERE=$(cd "$(dirname "$0")" && pwd)
B=${CBCR:-$HERE/../../target/release/cbcr}
R=$WORK/repo-$NAME; rm -rf "$R" "$WORK/out"; mkdir -p "$WORK"
prev=0; line="| $NAME"
for g in 1 2 3 4 5; do
  "$B" backup --init --repo "$R" "synth://pg?size=2GiB&seed=7&gen=$g" -q "$@"
  now=$(du -sb "$R" | cut -f1)
  line="$line | $(( (now - prev) / 1000000 ))"
  prev=$now
done
sync
r=$(/usr/bin/time -f "%e" "$B" restore latest --repo "$R" --target "$WORK/out" -q 2>&1 | tail -1)
echo "$line | $r |"
rm -rf "$R" "$WORK/out"
