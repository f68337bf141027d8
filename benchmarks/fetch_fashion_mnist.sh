#!/usr/bin/env bash
# Fetch the real Fashion-MNIST idx files (60k train / 10k test, 28x28, 10 classes)
# from the Debian package `dataset-fashion-mnist`, without root and without
# installing anything: `apt-get download` fetches the .deb into a scratch folder,
# `dpkg -x` unpacks it there, and the four .gz files are copied to the target.
#
# Usage: bash benchmarks/fetch_fashion_mnist.sh [TARGET_DIR]
#   TARGET_DIR defaults to .data/fashion-mnist (git-ignored), relative to the
#   repository root. Idempotent: if the four files are already there and pass
#   `gzip -t`, nothing is fetched. Prints the target folder on stdout (last line).
# Then: make_dataset("fashion_mnist", data_dir=<printed folder>).
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
target="${1:-${repo_root}/.data/fashion-mnist}"
files=(train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz
       t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz)
pkg=dataset-fashion-mnist
src_in_pkg=usr/share/datasets/fashion-mnist

have_all() {
  local f
  for f in "${files[@]}"; do
    [[ -s "$1/$f" ]] && gzip -t "$1/$f" 2>/dev/null || return 1
  done
}

if have_all "$target"; then
  echo "fashion-mnist already present" >&2
  echo "$target"
  exit 0
fi

for tool in apt-get dpkg; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "error: '$tool' not found; this script needs a Debian/Ubuntu host." >&2
    echo "Otherwise put the four files (${files[*]}) in $target yourself." >&2
    exit 1
  fi
done

scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT

# `apt-get download` writes into the current directory and needs no root, but
# it needs package lists; on a bare image those only appear after `apt-get update`,
# which does need root.
if ! (cd "$scratch" && apt-get download "$pkg" >&2); then
  if [[ "$(id -u)" -eq 0 ]]; then
    echo "apt-get download failed; running apt-get update and retrying" >&2
    apt-get update >&2
    (cd "$scratch" && apt-get download "$pkg" >&2)
  else
    echo "error: 'apt-get download $pkg' failed. The package lists may be missing:" >&2
    echo "ask an admin to run 'apt-get update', or 'apt-get install $pkg' (files then" >&2
    echo "land in /usr/share/datasets/fashion-mnist, the default data_dir)." >&2
    exit 1
  fi
fi

debs=("$scratch"/"$pkg"_*.deb)
dpkg -x "${debs[0]}" "$scratch/root"
mkdir -p "$target"
for f in "${files[@]}"; do
  cp "$scratch/root/$src_in_pkg/$f" "$target/$f.tmp"
  mv "$target/$f.tmp" "$target/$f"
done
have_all "$target" || { echo "error: files in $target fail gzip -t" >&2; exit 1; }
echo "$target"
