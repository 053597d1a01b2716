"""The pure protocol: wire format, crypto, identities, the CRDT model and the sans-I/O
machines (session, gossip, peering).

Nothing here does I/O: no trio, no sockets, no SQLite (``tests/test_layers.py`` checks
it). Every module takes bytes and values and returns bytes, values and typed errors.
"""
