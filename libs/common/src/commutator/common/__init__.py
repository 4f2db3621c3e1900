"""Commutator runtime shared by every role."""
