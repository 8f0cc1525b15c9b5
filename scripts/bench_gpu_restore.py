"""The GPU restore benchmark's command (its code is `fastvllm.benchmark_gpu`; how the GPU
figures are made: scripts/gpu/session.sh).

    python -m fastvllm.scripts.bench_gpu_restore --model 3b,8b --reps 2
"""

from fastvllm.benchmark_gpu import main

if __name__ == "__main__":
    main()
