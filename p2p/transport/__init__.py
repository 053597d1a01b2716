"""Transport adapters: in-memory (tests), TCP (LAN), the relay client and the routed
transport that picks between them."""
