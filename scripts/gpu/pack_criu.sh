#!/usr/bin/env bash
# Pack this machine's CRIU (built by scripts/setup.sh) with the shared libraries it links, for
# the GPU machine, whose image has no CRIU: carry .criu-dev in `run` and point FASTVLLM_CRIU at
# .criu-dev/criu.sh there. (.criu-dev/ is in .git/info/exclude.) vmtouch comes along for
# bench_prefetch.
set -euo pipefail
CRIU=${1:-/usr/local/sbin/criu}
rm -rf .criu-dev && mkdir -p .criu-dev/lib
cp "$CRIU" .criu-dev/criu
for l in $(ldd "$CRIU" | awk '/=>/{print $3}' | grep -v -E 'libc\.so'); do cp -L "$l" .criu-dev/lib/; done
cat > .criu-dev/criu.sh <<'SH'
#!/bin/sh
d=$(dirname "$(readlink -f "$0")")
LD_LIBRARY_PATH="$d/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "$d/criu" "$@"
SH
chmod +x .criu-dev/criu.sh
# vmtouch (Debian's, libc only) for bench_prefetch's peer there: the GPU image has none
if command -v vmtouch >/dev/null; then mkdir -p .criu-dev/bin && cp "$(command -v vmtouch)" .criu-dev/bin/; fi
du -sh .criu-dev
