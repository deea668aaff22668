#!/bin/bash
# Page-file policies on a real pgbench database (docs/PERFORMANCE.md, "Block deltas").
#   bash perf/scripts/page_policies.sh WORK [SCALE]
# Makes gen1 (pgbench -i -s SCALE, stopped) and gen2 (after pgbench -t 10000 -c 2, stopped) in
# WORK, then per policy: full backup of gen1 in WORK/live, gen2's changed pages written into it
# in place (unchanged files keep inode and mtime), incremental, restore, diff, index entries.
# Needs root, Debian's postgresql, and a release build (cargo build --release -p dataplane).
set -euo pipefail
WORK=$1; SCALE=${2:-100}
HERE=$(cd "$(dirname "$0")" && pwd)
B=${CBCR:-$HERE/../../target/release/cbcr}
PG=$(ls -d /usr/lib/postgresql/*/bin | tail -1)
mkdir -p "$WORK"; chown postgres "$WORK"; cd "$WORK"
if [ ! -d gen2 ]; then
  rm -rf data gen1 sock; mkdir sock; chown postgres sock
  as_pg() { su postgres -c "$*"; }
  opts="-o '-k $WORK/sock -p 5497 -c listen_addresses=' -w"
  as_pg "$PG/initdb -D $WORK/data -A trust >/dev/null"
  as_pg "$PG/pg_ctl -D $WORK/data $opts start >/dev/null"
  as_pg "$PG/pgbench -h $WORK/sock -p 5497 -i -q -s $SCALE postgres" 2>&1 | tail -1
  as_pg "$PG/pg_ctl -D $WORK/data -w stop >/dev/null"
  cp -a data gen1
  as_pg "$PG/pg_ctl -D $WORK/data $opts start >/dev/null"
  as_pg "$PG/pgbench -h $WORK/sock -p 5497 -t 10000 -c 2 postgres" 2>&1 | grep tps
  as_pg "$PG/pg_ctl -D $WORK/data -w stop >/dev/null"
  mv data gen2
fi
t() { /usr/bin/time -f "%e" "$@" 2>&1 >/dev/null | tail -1; }
echo "| policy | full s | full bytes | incr s | incr growth | restore s | index entries | restore |"
policy() {
  local name=$1; shift
  local R=$WORK/repo-$name
  rm -rf "$R" live out; cp -a gen1 live; sync
  local f; f=$(t "$B" backup --init --repo "$R" live -q "$@")
  local full; full=$(du -sb "$R" | cut -f1)
  python3 "$HERE/apply_in_place.py" gen2 live; sync
  local i; i=$(t "$B" backup --repo "$R" live -q "$@")
  local all; all=$(du -sb "$R" | cut -f1)
  sync
  local r; r=$(t "$B" restore latest --repo "$R" --target out -q)
  local same=DIFFERENT; diff -r --no-dereference live "out$WORK/live" >/dev/null && same=bit-exact
  echo "| $name | $f | $full | $i | $((all - full)) | $r | $(( $(cat "$R"/index/*.idx | wc -c) / 88 )) | $same |"
  rm -rf out "$R"
}
policy "a 16KiB whole" --page-chunk 16KiB --delta-chain 0
policy "a 64KiB whole" --page-chunk 64KiB --delta-chain 0
policy "b 32KiB deltas" --page-chunk 32KiB
policy "b 64KiB deltas" --page-chunk 64KiB
policy "b 128KiB deltas" --page-chunk 128KiB
