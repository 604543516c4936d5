"""``python -m spillcache``: the same as the ``spillcache`` command."""

import sys

from .cli import main

sys.exit(main())
