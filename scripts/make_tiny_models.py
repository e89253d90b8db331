"""Write the built-in random-weight FLUX and SD models (diffusers format, offline) into OUT/tiny-flux, OUT/tiny-sd.

python scripts/make_tiny_models.py OUT
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from pipeline.tiny import make_tiny_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder to write tiny-flux/ and tiny-sd/ into")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in ("tiny-flux", "tiny-sd"):
        folder = make_tiny_model(name, args.out / name)
        logging.info("wrote %s", folder)


if __name__ == "__main__":
    main()
