"""KV-aware router: the radix index over KV events, cost-based selection, the router service."""
