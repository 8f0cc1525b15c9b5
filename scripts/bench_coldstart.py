"""What a user waits for a server: vLLM's cold start against `fastvllm restore` (and the
resident agent, and a container), each timed to the first completion a separate client gets.
The benchmark itself is `fastvllm.benchmark` (what `fastvllm bench` runs); this is its
command-line wrapper.

    python -m fastvllm.scripts.bench_coldstart --reps 5 --out results/coldstart/DATE-user-wait
    fastvllm bench --reps 5 --out results/coldstart/DATE-user-wait      # the same
"""

from __future__ import annotations

from fastvllm.benchmark import main

if __name__ == "__main__":
    raise SystemExit(main())
