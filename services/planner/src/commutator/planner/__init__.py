"""Planner: observes the pools and scales prefill and decode workers to latency targets."""
