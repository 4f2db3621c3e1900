"""Wire messages and services of Commutator, version 1.

The modules beside this file are generated from ``protos/commutator/v1`` by
``make protos`` and are never edited by hand (nor committed).
"""
