"""`python -m pipeline "prompt"`. Ctrl-C at any moment, imports included: `interrupted`, exit code 130."""

from __future__ import annotations

import os
import signal
import sys
import threading
from types import FrameType


def _on_sigint(signum: int, frame: FrameType | None) -> None:
    """Ctrl-C as KeyboardInterrupt, but never inside an import: one raised there leaves half-initialised
    modules behind (numpy, torch), which later imports report as other errors (diffusers wraps them in a
    RuntimeError) or which a library's bare `except:` swallows. Inside an import, the signal is sent again
    50 ms later, until it lands outside one."""
    f = frame
    while f is not None:
        if f.f_code.co_filename.startswith("<frozen importlib"):
            threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGINT)).start()
            return
        f = f.f_back
    raise KeyboardInterrupt


if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not when the caller ignores SIGINT
    signal.signal(signal.SIGINT, _on_sigint)
try:
    from .cli import main

    code = main()
except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    code = 130
sys.exit(code)
