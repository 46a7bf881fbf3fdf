"""`python -m nodepass_gevent.ops.servicectl`: the same as nodepass-service."""

import sys

from nodepass_gevent.ops.servicectl.cli import main

sys.exit(main())
