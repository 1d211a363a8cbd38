"""``python -m aiosd`` runs the daemon."""

from __future__ import annotations

import sys

from aiosd.daemon import main

sys.exit(main())
