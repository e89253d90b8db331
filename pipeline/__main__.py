"""`python -m pipeline "prompt"`. Ctrl-C at any moment, imports included: `interrupted`, exit code 130."""

import sys

try:
    from .cli import main

    code = main()
except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    code = 130
sys.exit(code)
