"""Set-up and benchmark scripts; the benchmarks are also reachable as `fastvllm bench`."""
