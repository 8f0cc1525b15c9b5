#!/usr/bin/env bash
# How the H100 figures in the README were produced, on the lent GPU machine (no network).
# Earlier calls put the vLLM bundle's parts in /root/parts (../shared/gpu-vllm/build.sh) and
# the loader peers' wheels in .whl/ (see README: "GPU runs"). Usage there, from the repo root:
#   bash scripts/gpu/session.sh setup          # unpack vLLM, install peers + fastvllm
#   bash scripts/gpu/session.sh tests|reload|weights|sweep|e2e|restore|criu-modes|criu-tests|prefetch
# e2e and restore need CRIU there: `bash scripts/gpu/pack_criu.sh` here, carry .criu-dev.
#
# Issue 22 in three or four back-to-back calls (the machine stays warm ~30 s between them), the
# bundle's parts built here with `bash ../shared/gpu-vllm/build.sh .gpu` (.gpu/ is excluded):
#   call 1, carry .gpu/p1:  mkdir -p /root/parts && cp .gpu/p1/* /root/parts/ && bash scripts/gpu/session.sh stage
#   call 2, carry .gpu/p2:  cp .gpu/p2/* /root/parts/ && bash scripts/gpu/session.sh staged
#   call 3, carry .gpu/p3:  cp .gpu/p3/* /root/parts/ && bash scripts/gpu/session.sh issue22
#   call 4:  bash scripts/gpu/session.sh issue22-tests
# (session 23: stage with MAKE_8B=0, call 3 `bash scripts/gpu/session.sh issue22-graphs` instead:
#  the GPU tests with FASTVLLM_GPU_GRAPH_MEMORY=release, then the 3b with release and with keep,
#  one host; then `FASTVLLM_GPU_GRAPH_MEMORY=release bash scripts/gpu/session.sh faults`)
# (session 20: call 3 with SNAPSHOTS=/var/tmp/fv-snaps keeps the snapshots; then
#  `SNAPSHOTS=/var/tmp/fv-snaps bash scripts/gpu/session.sh issue22-ab` reuses the 3b's, then faults)
# (session 26 built `fastvllm agent --hold`: call 3 with
#  VARIANTS=prime,cli,agent,agent-held,c,b,c-held,sweep measures the load out of held pinned memory;
#  tests/test_held_weights.py's GPU test checks it bit for bit)
# (.gpu/p2 also holds the packed CRIU: `tar -cJf .gpu/p2/criu-dev.tar.xz .criu-dev` after pack_criu.sh.)
# `stage` unpacks what it can, installs fastvllm and makes the 3b and 8b models in the background
# (setsid: they outlive the call) while the next parts travel. `issue22` runs both models in one
# bench run (MODELS=3b,8b), most important figures first, the rest dropped when its budget ends
# (BUDGET_S, by default what the call has left less 40 s for the chart and the clean-up).
set -euo pipefail
SITE=/root/site FV=/root/fv PEERS=/root/peers
export PYTHONPATH=$FV:$PEERS:$SITE PYTHONUNBUFFERED=1
export VLLM_USE_FLASHINFER_SAMPLER=0 FASTVLLM_VLLM_PYTHON=python3 HF_HUB_OFFLINE=1
[ -x .criu-dev/criu.sh ] && export FASTVLLM_CRIU=$PWD/.criu-dev/criu.sh
[ -x .criu-dev/bin/vmtouch ] && export PATH=$PWD/.criu-dev/bin:$PATH
# or the packed CRIU staged earlier (issue 22: it travels in .gpu/p2 as criu-dev.tar.xz, the carry
# limit leaving no room for it beside the last part)
[ ! -x .criu-dev/criu.sh ] && [ -x /root/criu-dev/criu.sh ] && export FASTVLLM_CRIU=/root/criu-dev/criu.sh
OUT=${OUT:-/tmp/out}
MODEL3B=/var/tmp/fv-model-3b MODEL8B=/var/tmp/fv-model-8b
# After `stage`'s background unpack: stop if it failed, put vLLM's last part (calls 2 and 3)
# in place, install this checkout's fastvllm.
finish_stage() {
  [ -f /root/site.ok ] || { tail /root/stage-*.log; exit 3; }
  [ -f $SITE/vllm/_C_stable_libtorch.abi3.so ] || cat /root/parts/C.0* | xz -dc -T0 > $SITE/vllm/_C_stable_libtorch.abi3.so
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --upgrade --target $FV .
}
# The newest CRIU restore logs of the kept 3b snapshot (where its time goes, line by line).
keep_criu_logs() {
  local d=${SNAPSHOTS:-}/3b-sleep2/logs
  [ -n "${SNAPSHOTS:-}" ] && [ -d "$d" ] || return 0
  (cd "$d" && ls -t criu-restore-*.log 2>/dev/null | head -4 | xargs -r tar -cJf $OUT/criu-restore-logs.tar.xz) || true
}
case "${1:?probe|faults|issue22-graphs|setup|tests|reload|weights|sweep|e2e|restore|criu-modes|criu-tests|prefetch|stage|staged|issue22|issue22-ab|issue22-final|issue22-tests}" in
  stage)
    python3 -m pip install -q --no-index --no-deps --no-build-isolation --upgrade --target $FV .
    setsid nohup bash -c "set -e; mkdir -p $SITE; tar -xJf /root/parts/rest.tar.xz -C $SITE; \
      xz -dc /root/parts/fa3.so.xz > $SITE/vllm/vllm_flash_attn/_vllm_fa3_C.abi3.so; \
      python3 -m compileall -q -j 0 $SITE >/dev/null 2>&1 || true; touch /root/site.ok" \
      >/root/stage-site.log 2>&1 </dev/null &
    # from /tmp: the checkout's own fastvllm/ folder (the front door only) would shadow the installed one
    (cd /tmp && setsid nohup env PYTHONPATH=$FV python3 -c "from pathlib import Path; \
from fastvllm.runtime.tiny_model import make_tiny; make_tiny(Path('$MODEL3B'), size='3b'); \
Path('/root/model.ok').touch()" >/root/stage-model.log 2>&1 </dev/null &)
    # the 8b (14 GB): random bits from every core, large writes (runtime/tiny_model.py _write_fast)
    # (/root/model8b.fail if it fails: `issue22` then stops waiting for it; MAKE_8B=0 skips it, so
    # that a 3b-only call's timings do not share the host with it)
    rm -f /root/model8b.ok /root/model8b.fail  # a second staging on a warm machine starts afresh
    [ "${MAKE_8B:-1}" = 0 ] && touch /root/model8b.fail  # not made: `issue22` runs the 3b alone
    [ "${MAKE_8B:-1}" = 0 ] || (cd /tmp && setsid nohup env PYTHONPATH=$FV python3 -c "import atexit, time; from pathlib import Path; \
ok, fail = Path('/root/model8b.ok'), Path('/root/model8b.fail'); atexit.register(lambda: ok.exists() or fail.touch()); \
from fastvllm.runtime.tiny_model import make_tiny; t = time.time(); make_tiny(Path('$MODEL8B'), size='8b'); \
print(f'8b made in {time.time() - t:.1f} s'); ok.touch()" \
      >/root/stage-model8b.log 2>&1 </dev/null &)
    sleep 2; nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv; df -h /var/tmp | tail -1
    echo staged part 1 ;;
  staged)
    if [ -f /root/parts/criu-dev.tar.xz ]; then
      mkdir -p /root/criu-dev && tar -xJf /root/parts/criu-dev.tar.xz -C /root/criu-dev --strip-components=1
      /root/criu-dev/criu.sh --version
    fi
    ls -la /root/parts /root/*.ok 2>&1 | tail -12; tail -3 /root/stage-site.log /root/stage-model.log /root/stage-model8b.log
    df -h /var/tmp | tail -1 ;;
  probe)  # what the driver's CUDA restore costs and scales with (scripts/gpu/probe_cuda_restore.py)
    t0=$(date +%s)
    for _ in $(seq 240); do [ -f /root/site.ok ] && [ -f /root/model.ok ] && break; sleep 1; done
    finish_stage
    left=$(( ${CALL_S:-575} - ($(date +%s) - t0) ))
    timeout $left python3 scripts/gpu/probe_cuda_restore.py --model $MODEL3B --out $OUT/probe \
      --vllm-variants "${VARIANTS:-default,eager}" 2>&1 | tee $OUT/probe.log ;;
  faults)  # the failure-injection tests on the GPU (snapshot and restore faults, real vLLM and CRIU)
    # (FAULTS_ARGS: more pytest arguments, e.g. -k to run the cases a cut-off call did not reach)
    # 0.2: a server left by one case (a snapshot killed mid-way) must not starve the next one's
    export FASTVLLM_TEST_VLLM_ARGS="--attention-backend FLASH_ATTN --max-model-len 512 --gpu-memory-utilization 0.2"
    for _ in $(seq 240); do [ -f /root/site.ok ] && break; sleep 1; done
    finish_stage
    (cd /tmp && timeout ${CALL_S:-570} python3 -m pytest -v -p no:cacheprovider --import-mode=importlib \
      "$OLDPWD/tests/test_faults.py" ${FAULTS_ARGS:-} 2>&1 | tee $OUT/gpu-faults.log) ;;
  issue22)  # 3b and 8b: cold start, (b), (c) warm and cold, in-process and as a user waits (bench_gpu_restore.py)
    t0=$(date +%s)
    for _ in $(seq 240); do
      [ -f /root/site.ok ] && [ -f /root/model.ok ] && { [ -f /root/model8b.ok ] || [ -f /root/model8b.fail ]; } && break
      sleep 1
    done
    made=3b=$MODEL3B,8b=$MODEL8B  # a model not made yet is made by the bench itself (in its budget)
    for f in model model8b; do [ -f /root/$f.ok ] || tail -3 /root/stage-$f.log 2>/dev/null || true; done
    models=${MODELS:-3b,8b}; [ -f /root/model8b.fail ] && [ -z "${MODELS:-}" ] && models=3b
    finish_stage
    nvidia-smi > $OUT/nvidia-smi.txt; df -h /var/tmp | tail -1; echo "setup $(( $(date +%s) - t0 )) s"
    left=$(( ${CALL_S:-575} - ($(date +%s) - t0) ))
    (cd /tmp && timeout $left python3 -m fastvllm.scripts.bench_gpu_restore \
      --model "$models" --model-dir "$made" --reps "${REPS:-2}" --budget-s "${BUDGET_S:-$(( left - 40 ))}" \
      ${VARIANTS:+--variants "$VARIANTS"} ${CONDITIONS:+--conditions "$CONDITIONS"} \
      ${SNAPSHOTS:+--snapshots "$SNAPSHOTS"} --out $OUT/gpu-restore 2>&1 | tee $OUT/gpu-restore.log)
    keep_criu_logs ;;
  issue22-ab)  # the 3b snapshot `issue22` kept in $SNAPSHOTS restored again: (c) beside one setting
    # changed at a time, and the loader sweep (no cold start: the snapshot is reused)
    t0=$(date +%s); finish_stage
    rm -rf "${SNAPSHOTS:?}/8b-sleep2"
    left=$(( ${CALL_S:-575} - ($(date +%s) - t0) ))
    (cd /tmp && timeout $left python3 -m fastvllm.scripts.bench_gpu_restore --model 3b --model-dir $MODEL3B \
      --reps "${REPS:-3}" --budget-s $(( left - 40 )) --conditions warm --snapshots "$SNAPSHOTS" \
      --variants "${VARIANTS:-c,c-noprefault,c-v2,agent,sweep}" \
      --out $OUT/gpu-restore 2>&1 | tee $OUT/gpu-restore.log)
    keep_criu_logs; rm -rf "$SNAPSHOTS" ;;
  issue22-final)  # session 20's last call: the GPU tests on the final code, what their snapshot's
    # CRIU restores did (logs, manifest), then the 3b bench in the time left (JSON after each step)
    t0=$(date +%s); finish_stage
    export FASTVLLM_TEST_VLLM_ARGS="--attention-backend FLASH_ATTN --max-model-len 512 --gpu-memory-utilization 0.5"
    (cd /tmp && timeout ${TESTS_S:-200} python3 -m pytest -v -p no:cacheprovider --import-mode=importlib \
      "$OLDPWD/tests/test_gpu_restore_units.py" "$OLDPWD/tests/test_weights.py" "$OLDPWD/tests/test_e2e.py" \
      2>&1 | tee $OUT/gpu-e2e.log) || true
    # (|| true: under pipefail an unmatched glob would end the call here)
    m=$(ls -t /tmp/pytest-of-root/*/*/*/manifest.json /tmp/pytest-of-root/*/*/manifest.json 2>/dev/null | head -1 || true)
    if [ -n "$m" ]; then d=$(dirname "$m"); (cd "$d" && tar -cJf $OUT/e2e-snapshot-logs.tar.xz manifest.json \
      $(cd "$d" && ls -t logs/criu-restore-*.log 2>/dev/null | head -2)) || true; fi
    left=$(( ${CALL_S:-575} - ($(date +%s) - t0) ))
    (cd /tmp && timeout $left python3 -m fastvllm.scripts.bench_gpu_restore --model 3b --model-dir $MODEL3B \
      --reps 2 --budget-s $(( left - 15 )) --conditions warm --variants "${VARIANTS:-c,agent}" \
      ${SNAPSHOTS:+--snapshots "$SNAPSHOTS"} --out $OUT/gpu-restore 2>&1 | tee $OUT/gpu-restore.log) || true
    keep_criu_logs ;;
  issue22-graphs)  # session 22: the CUDA graphs' memory released from sleeping snapshots
    # (weights/graph_memory.py). The GPU tests with it first; then the 3b with it (when they
    # passed) and without it (FASTVLLM_GPU_GRAPH_MEMORY=keep), each its own cold start and
    # snapshot, in the same call: the before and after on one host.
    t0=$(date +%s)
    for _ in $(seq 240); do [ -f /root/site.ok ] && [ -f /root/model.ok ] && break; sleep 1; done
    finish_stage
    nvidia-smi > $OUT/nvidia-smi.txt
    ok=1
    (export FASTVLLM_GPU_GRAPH_MEMORY=release FASTVLLM_TEST_VLLM_ARGS="--attention-backend FLASH_ATTN --max-model-len 512 --gpu-memory-utilization 0.5"
     cd /tmp && timeout ${TESTS_S:-180} python3 -m pytest -v -p no:cacheprovider --import-mode=importlib \
      "$OLDPWD/tests/test_graph_memory.py" "$OLDPWD/tests/test_e2e.py" 2>&1 | tee $OUT/gpu-e2e.log) || ok=0
    m=$(ls -t /tmp/pytest-of-root/*/*/*/manifest.json /tmp/pytest-of-root/*/*/manifest.json 2>/dev/null | head -1 || true)
    [ -n "$m" ] && cp "$m" $OUT/e2e-manifest.json || true
    bench() {  # $1: release|keep, $2: seconds, $3: variants
      (cd /tmp && env FASTVLLM_GPU_GRAPH_MEMORY=$1 timeout $2 python3 -m fastvllm.scripts.bench_gpu_restore \
        --model 3b --model-dir $MODEL3B --reps 2 --budget-s $(( $2 - 25 )) --conditions "${CONDITIONS:-warm}" \
        --variants "$3" --out $OUT/gpu-restore-$1 2>&1 | tee $OUT/gpu-restore-$1.log) || true
    }
    # (KEEP_VARIANTS=none: no keep run, the release run gets the whole call)
    left=$(( ${CALL_S:-580} - ($(date +%s) - t0) ))
    share=$([ "${KEEP_VARIANTS:-}" = none ] && echo 20 || echo 11)
    # (prime: the bounds step drops the page cache, dentries and inodes too, which the first timed
    # restore would otherwise read back: docs/benchmarks/gpu-restore.md, seventh step)
    if [ $ok = 1 ]; then bench release $(( left * share / 20 - 10 )) "${VARIANTS:-prime,cli,agent,c,b}"; fi
    left=$(( ${CALL_S:-580} - ($(date +%s) - t0) ))
    [ "${KEEP_VARIANTS:-}" = none ] || bench keep $(( left - 10 )) "${KEEP_VARIANTS:-prime,cli,c}" ;;
  issue22-tests)  # the units first (the kept pinned pool and the loader on the GPU: seconds), then the e2e
    export FASTVLLM_TEST_VLLM_ARGS="--attention-backend FLASH_ATTN --max-model-len 512 --gpu-memory-utilization 0.5"
    (cd /tmp && timeout ${CALL_S:-570} python3 -m pytest -v -p no:cacheprovider --import-mode=importlib \
      "$OLDPWD/tests/test_gpu_restore_units.py" "$OLDPWD/tests/test_weights.py" "$OLDPWD/tests/test_e2e.py" \
      2>&1 | tee $OUT/gpu-e2e.log) ;;
  setup)
    [ -d $SITE/vllm ] || [ ! -f /root/parts/unpack.sh ] || bash /root/parts/unpack.sh /root/parts $SITE
    if compgen -G ".whl/*.whl" >/dev/null; then
      python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target $PEERS .whl/*.whl
    fi
    python3 -m pip install -q --no-index --no-deps --no-build-isolation --upgrade --target $FV . ;;
  e2e)  # vLLM snapshot/restore on the GPU (CUDA graphs on) and plain process mode
    export FASTVLLM_TEST_VLLM_ARGS="--attention-backend FLASH_ATTN --max-model-len 512 --gpu-memory-utilization 0.5"
    (cd /tmp && python3 -m pytest -v -p no:cacheprovider --import-mode=importlib "$OLDPWD/tests/test_e2e.py" \
      "$OLDPWD/tests/test_process_mode.py" 2>&1 | tee $OUT/gpu-e2e.log) ;;
  restore)
    (cd /tmp && python3 -m fastvllm.scripts.bench_gpu_restore --model "${MODEL:-3b}" --reps "${REPS:-2}" \
      --out $OUT/gpu-restore 2>&1 | tee $OUT/gpu-restore.log) ;;
  criu-modes)  # issue 8: CRIU restore copy / mmap / lazy of a sleeping GPU server, side by side.
    # Needs the patched CRIU carried: here `bash scripts/gpu/pack_criu.sh /usr/local/libexec/fastvllm/criu`.
    (cd /tmp && python3 -m fastvllm.scripts.bench_criu_restore --model "${MODEL:-3b}" --gpu --reps "${REPS:-3}" \
      --out $OUT/criu-restore-gpu 2>&1 | tee $OUT/criu-restore-gpu.log) ;;
  criu-tests)  # issue 8: the restore-mode tests and the spine's e2e (auto = mmap) on the GPU machine
    export FASTVLLM_TEST_VLLM_ARGS="--attention-backend FLASH_ATTN --max-model-len 512 --gpu-memory-utilization 0.5"
    (cd /tmp && python3 -m pytest -v -p no:cacheprovider --import-mode=importlib "$OLDPWD/tests/test_criu_mmap.py" \
      "$OLDPWD/tests/test_e2e_criu_modes.py" "$OLDPWD/tests/test_e2e.py" 2>&1 | tee $OUT/gpu-criu-modes.log) ;;
  prefetch)  # issue 4: prefetch throughput and the overlapped restore of the tiny model on the GPU
    (cd /tmp && python3 -m fastvllm.scripts.bench_prefetch --reps "${REPS:-3}" --port 18931 \
      --vllm-args "--attention-backend FLASH_ATTN --max-model-len 512 --gpu-memory-utilization 0.5" \
      --out $OUT/prefetch 2>&1 | tee $OUT/prefetch.log) ;;
  tests)
    # importlib mode: the repo's own fastvllm/ folder must not shadow the installed package
    (cd /tmp && python3 -m pytest -q -p no:cacheprovider --import-mode=importlib "$OLDPWD/tests/test_weights.py" 2>&1 | tee $OUT/gpu-tests.log) ;;
  reload)
    (cd /tmp && python3 -m fastvllm.scripts.bench_gpu_reload --model "${MODEL:-3b}" --reps "${REPS:-2}" \
      --attention-backend FLASH_ATTN --out $OUT/gpu-reload 2>&1 | tee $OUT/gpu-reload.log) ;;
  weights)
    (cd /tmp && python3 -m fastvllm.scripts.bench_weights --size 3b --device cuda --reps "${REPS:-2}" \
      --out $OUT/weights 2>&1 | tee $OUT/weights.log) ;;
  sweep)
    f=$(ls /var/tmp/fastvllm-gpu-reload-*/model.fvw 2>/dev/null | head -1); f=${f:-/var/tmp/fastvllm-sweep.fvw}
    [ -f $f ] || (cd /tmp && python3 -m fastvllm.cli weights dump "$(python3 -c 'from fastvllm.runtime.tiny_model import make_tiny; print(make_tiny(size="3b"))')" -o $f)
    (cd /tmp && python3 -m fastvllm.scripts.sweep_loader $f --device cuda --out $OUT/sweep.json 2>&1 | tee $OUT/sweep.log) ;;
esac
