"""Decode (or aggregated) worker: serves Generate over gRPC in front of an engine."""
