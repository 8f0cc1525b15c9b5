"""The placement simulator's command (its code is `fastvllm.scheduler.simulate`).

python -m fastvllm.scripts.simulate_placement --hosts 1000 --models 10000 --out results/placement
"""

from fastvllm.scheduler.simulate import main

if __name__ == "__main__":
    main()
