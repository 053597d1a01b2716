"""Media attachments: encrypted, content-addressed files synced beside the chat log.

``descriptor`` (pure: the format and chunk crypto), ``fetch`` (pure: which chunk to ask
whom), ``store`` (the device's blob store, SQLite), ``service`` (trio: the node's media
lane). docs/media.md has the design. Nothing is imported here, so the pure modules stay
importable without trio or sqlite.
"""
