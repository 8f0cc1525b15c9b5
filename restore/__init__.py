"""The restore pipeline (fastvllm.restore.pipeline)."""
