"""`python -m export MODEL --out DIR`: the export command line, kept at the top level for convenience.

The code lives in `pipeline.export`; this package only forwards to it (one direction: export -> pipeline).
"""

import sys

from pipeline.export.cli import main

sys.exit(main())
