"""Page-cache residency, warming and eviction of snapshot files (`fastvllm.prefetch`)."""
