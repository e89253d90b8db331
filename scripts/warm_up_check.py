"""What a warm-up buys the first request at a size, measured in one process (`Pipeline.warm_up`).

    python scripts/warm_up_check.py --model sd15 --size 512x512 --warm 768x768 --other 640x640 --json OUT.json

Loads the pipeline with its defaults, serves --size until its background compiles (if any) have landed,
warms up --warm, then times two calls each of: --warm with the default steps (its graph exists), --warm with
--steps-other steps (a new graph, the size's plans built), and --other, a size never met (everything new).
The first/second ratio of each is what a user's first request at that size pays.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from pipeline import Pipeline
from pipeline.options import parse_size

logger = logging.getLogger("warm_up_check")
PROMPT = "a photo of an astronaut riding a horse on mars"


def timed(pipe: Pipeline, size: tuple[int, int], steps: int | None) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    pipe(PROMPT, width=size[0], height=size[1], num_inference_steps=steps, seed=0, output_type="np")
    torch.cuda.synchronize()
    return round(time.perf_counter() - start, 3)


def pair(pipe: Pipeline, size: tuple[int, int], steps: int | None) -> dict[str, Any]:
    first, second = timed(pipe, size, steps), timed(pipe, size, steps)
    return {
        "size": list(size),
        "steps": steps,
        "first_s": first,
        "second_s": second,
        "ratio": round(first / second, 3),
    }


def _option(text: str) -> tuple[str, Any]:
    key, _, value = text.partition("=")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="sd15")
    p.add_argument("--size", type=parse_size, default=(512, 512), help="WIDTHxHEIGHT served first")
    p.add_argument("--warm", type=parse_size, default=(768, 768), help="WIDTHxHEIGHT warmed up")
    p.add_argument("--other", type=parse_size, default=(640, 640), help="WIDTHxHEIGHT never met before")
    p.add_argument("--steps-other", type=int, default=30)
    p.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a backend option (repeatable; JSON values, else strings): attention=cudnn, compile_resnets=off",
    )
    p.add_argument("--json", type=Path, required=True)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if not torch.cuda.is_available():
        raise SystemExit("warm_up_check.py measures CUDA set-up: it needs a GPU")
    options = dict(_option(text) for text in args.option)
    pipe = Pipeline.from_pretrained(args.model, device="cuda", **options)
    pipe.progress = False
    report: dict[str, Any] = {
        "model": args.model, "options": options, "backend": pipe.backend.describe(), "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__, "python": platform.python_version(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }  # fmt: skip
    report["first_call_s"] = timed(pipe, args.size, None)
    wait = getattr(pipe.backend, "wait_background", None)
    if wait is not None:
        start = time.perf_counter()
        wait(600)
        report["background_s"] = round(time.perf_counter() - start, 1)
    report["at_size"] = pair(pipe, args.size, None)  # the first of these swaps the landed regions in
    report["warm_up_s"] = pipe.warm_up([args.warm])
    report["warmed_default_steps"] = pair(pipe, args.warm, None)
    report["warmed_other_steps"] = pair(pipe, args.warm, args.steps_other)
    report["never_met"] = pair(pipe, args.other, None)
    pipe.close()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    for name in ("at_size", "warmed_default_steps", "warmed_other_steps", "never_met"):
        r = report[name]
        print(f"{name:<22} {r['size'][0]}x{r['size'][1]} steps {r['steps'] or 'default'}: "
              f"first {r['first_s']:.3f} s, then {r['second_s']:.3f} s ({r['ratio']:.2f}x)")  # fmt: skip
    print(f"warm-up {report['warm_up_s']}, first call {report['first_call_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
