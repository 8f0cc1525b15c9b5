"""Mechanisms every stage shares: vLLM server control, the CRIU wrapper, the manifest, errors."""
