"""The prefill worker (DESIGN.md 2): prompts' KV computed here for decode workers elsewhere."""
