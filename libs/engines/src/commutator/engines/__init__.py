"""Engine adapters: the protocol every engine sits behind, and its implementations."""
