"""What every worker role (decode, prefill) runs around an engine: the engine chosen by name,
the Worker gRPC service, the KV-event and load publishers, model resolution and the model card."""
