"""``python -m spillcache``: the same as the ``spillcache`` command."""

import sys

from spillcache.cli import main

sys.exit(main())
