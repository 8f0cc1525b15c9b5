"""Flat weight files, the loader, and the vLLM worker extension (fastvllm.weights)."""
