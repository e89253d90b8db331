"""`python -m pipeline.export` (same as `python -m export`)."""

import sys

from .cli import main

sys.exit(main())
