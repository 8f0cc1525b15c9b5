#!/usr/bin/env bash
# Build fastvllm's patched CRIU (patches/criu/*.patch on a CRIU 4.2.1 source tree) and install it.
# scripts/setup.sh calls it; so can a Dockerfile (build dependencies as for stock CRIU, plus patch):
#
#   scripts/build_criu_mmap.sh SRC_DIR [DEST=/usr/local/libexec/fastvllm/criu] [BUILD_DIR]
#
# The source tree is copied to BUILD_DIR (default: a temporary directory) and left untouched.
# DEST.patches records the hash of the patches and of this script the binary was built from.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SRC=${1:?usage: build_criu_mmap.sh SRC_DIR [DEST] [BUILD_DIR]}
DEST=${2:-/usr/local/libexec/fastvllm/criu}
BUILD=${3:-$(mktemp -d /tmp/criu-mmap.XXXXXX)}
# The kernel-feature cache (criu.kdat) lives in RUNDIR, and CRIU keeps it only on tmpfs (a
# reboot must drop it). Where /run is a disk, stock CRIU probes the kernel on every run: 0.06-0.2 s
# of a restore here (it runs `iptables -L`, mounts, ptraces; README). This
# build looks in a directory on /dev/shm instead, which fastvllm keeps root-owned and private
# (runtime/criu.py KDAT_DIR; the two must match).
KDAT_DIR=/dev/shm/fastvllm-criu-kdat
stamp=$(cat "$ROOT"/patches/criu/*.patch "$ROOT"/scripts/build_criu_mmap.sh | sha256sum | cut -c1-16)
rm -rf "$BUILD" && cp -a "$SRC" "$BUILD"
make -C "$BUILD" clean >/dev/null 2>&1 || true
for p in "$ROOT"/patches/criu/*.patch; do
  patch -s -d "$BUILD" -p1 <"$p" || { echo "patch $(basename "$p") does not apply to $SRC" >&2; exit 1; }
done
make -C "$BUILD" -j"$(nproc)" criu RUNDIR="$KDAT_DIR" >"$BUILD/build.log" 2>&1 \
  || { tail -n 30 "$BUILD/build.log" >&2; echo "patched CRIU build failed (log: $BUILD/build.log)" >&2; exit 1; }
install -D -m 0755 "$BUILD/criu/criu" "$DEST"
echo "$stamp" >"$DEST.patches"
echo "installed $DEST ($("$DEST" --version | head -n1), patches $stamp)"
