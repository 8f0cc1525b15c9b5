"""The weight-loader benchmark's command (its code is `fastvllm.weights.bench`; the CLI's
`fastvllm weights bench` runs the same).

    python -m fastvllm.scripts.bench_weights --size tiny --reps 2
"""

import sys

from fastvllm.weights.bench import main

if __name__ == "__main__":
    sys.exit(main())
