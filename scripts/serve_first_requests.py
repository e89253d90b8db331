"""The first requests of a newly started server: does it answer at full speed once /health says ok?

Starts `python -m pipeline.serve` (twice with --restart: the second start finds the first one's compile cache),
waits until /health answers 200 (the worker's warm-up done) and, after a restart, until the sizes the first start
served are warmed too (unless --no-wait), then sends requests one after another and records each one's latency:

    python scripts/serve_first_requests.py --model sd15 --sizes 512x512 512x512 512x512 768x768 768x768 \\
        --out first.json -- --device cuda --backend torch

(arguments after `--` go to the server). Standard library only on the client side.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from load_test import Client, request_body

from pipeline.serve.launch import running_server


def one_server(args: argparse.Namespace, server_args: list[str], log: Path) -> dict[str, Any]:
    start = time.perf_counter()
    with running_server(server_args, log_path=log, ready_timeout=args.timeout) as server:
        ready_s = time.perf_counter() - start
        health = server.health()
        while health.get("warming_recent") and not args.no_wait:  # sizes served before a restart, warmed
            time.sleep(0.05)  # while idle (pipeline/serve/sizes.py)
            health = server.health()
        recent_s = time.perf_counter() - start - ready_s
        client = Client(server.url, args.timeout)
        calls = []
        try:
            for i, size in enumerate(args.sizes):
                status, seconds, _ = client.generate(request_body(size, args.steps, f"request {i}", i))
                calls.append({"size": size, "status": status, "seconds": round(seconds, 3)})
                print(f"  {size:>10}  HTTP {status}  {seconds:7.3f} s", flush=True)
        finally:
            client.close()
    return {
        "ready_s": round(ready_s, 2),
        "recent_warm_up_s": round(recent_s, 2),
        "warm_up_s": health.get("warm_up_s"),
        "requests": calls,
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ours, rest = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--sizes", nargs="+", default=["512x512"] * 3, help="one request per entry, in order")
    ap.add_argument("--steps", type=int)
    ap.add_argument(
        "--restart", action="store_true", help="a second server start, with the first one's cache"
    )
    ap.add_argument(
        "--no-wait", action="store_true", help="send at once, not after the sizes served before are warmed"
    )
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(ours)
    with tempfile.TemporaryDirectory() as tmp:
        cache = ["--cache-dir", tmp] if "--cache-dir" not in rest else []
        server_args = ["--model", args.model, *cache, *rest]
        starts = []
        for n in range(2 if args.restart else 1):
            print(f"server start {n + 1}: {' '.join(server_args)}", flush=True)
            starts.append(one_server(args, server_args, Path(tmp) / f"server{n}.log"))
            print(f"  ready after {starts[-1]['ready_s']} s, warm-up {starts[-1]['warm_up_s']}", flush=True)
    result = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "model": args.model,
        "server_args": rest,
        "starts": starts,
    }
    Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
