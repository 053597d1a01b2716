"""The trio runtime: the :class:`Node` facade and the subsystems it composes, which turn
the pure machines' outputs into sends, sleeps and store writes.
"""
