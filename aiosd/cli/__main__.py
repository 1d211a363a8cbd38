"""``python -m aiosd.cli`` runs aiosctl."""

from __future__ import annotations

import sys

from aiosd.cli.main import main

sys.exit(main())
