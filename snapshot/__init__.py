"""The snapshot pipeline (fastvllm.snapshot.pipeline)."""
