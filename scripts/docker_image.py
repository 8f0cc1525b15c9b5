"""Build the CPU test image offline (its code is `fastvllm.docker_image`).

python -m fastvllm.scripts.docker_image            # base + image, prints the timings
"""

from fastvllm.docker_image import main

if __name__ == "__main__":
    main()
