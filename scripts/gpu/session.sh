#!/usr/bin/env bash
# How the H100 figures in the README were produced, on the lent GPU machine (no network).
# Earlier calls put the vLLM bundle's parts in /root/parts (../shared/gpu-vllm/build.sh) and
# the loader peers' wheels in .whl/ (see README: "GPU runs"). Usage there, from the repo root:
#   bash scripts/gpu/session.sh setup          # unpack vLLM, install peers + fastvllm
#   bash scripts/gpu/session.sh tests|reload|weights|sweep|e2e|restore|criu-modes|criu-tests|prefetch
# e2e and restore need CRIU there: `bash scripts/gpu/pack_criu.sh` here, carry .criu-dev.
set -euo pipefail
SITE=/root/site FV=/root/fv PEERS=/root/peers
export PYTHONPATH=$FV:$PEERS:$SITE PYTHONUNBUFFERED=1
export VLLM_USE_FLASHINFER_SAMPLER=0 FASTVLLM_VLLM_PYTHON=python3 HF_HUB_OFFLINE=1
[ -x .criu-dev/criu.sh ] && export FASTVLLM_CRIU=$PWD/.criu-dev/criu.sh
[ -x .criu-dev/bin/vmtouch ] && export PATH=$PWD/.criu-dev/bin:$PATH
OUT=${OUT:-/tmp/out}
case "${1:?setup|tests|reload|weights|sweep|e2e|restore|criu-modes|criu-tests|prefetch}" in
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
