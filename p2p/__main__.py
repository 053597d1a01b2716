"""``python -m p2p``: the same as the ``p2p`` command."""

import sys

from p2p.app.cli import main

sys.exit(main())
