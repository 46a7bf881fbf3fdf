"""`python -m nodepass_gevent URL`: the same entry point as the `nodepass` script."""

import sys

from nodepass_gevent.cli import run

sys.exit(run())
