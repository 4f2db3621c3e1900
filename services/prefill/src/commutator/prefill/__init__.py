"""Prefill worker: consumes the prefill queue and writes KV into decode workers' blocks."""
