"""The applications built on the engine: the ``p2p`` command (cli), the node's control
socket (control), the background node (daemon), the demo and terminal output helpers.
"""
