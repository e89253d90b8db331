"""`python -m pipeline "prompt"`."""

import sys

from .cli import main

sys.exit(main())
