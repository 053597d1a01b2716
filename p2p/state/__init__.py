"""A device's state: what it knows (accounts, devices, chats, keys, the message index)
and the rules that change it, persisted through a :class:`p2p.storage.Store`.

Sans-I/O like ``p2p.proto``: no trio and no sockets; the store adapter does the writing.
"""
