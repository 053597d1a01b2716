"""Transport adapters: in-memory (tests), TCP (LAN), relay websocket (later)."""
