"""``python -m lvlm_fix.testing.families``: see :mod:`lvlm_fix.testing.families.command`."""

import sys

from .command import main

sys.exit(main())
