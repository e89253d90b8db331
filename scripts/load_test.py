"""Load figures for `python -m pipeline.serve`: N concurrent clients, M requests each, then stop.

Against a running server:

    python scripts/load_test.py --url http://127.0.0.1:8000 --clients 8 --requests 4 --size 1024x1024

Or starting its own server, once per --max-batch value, to compare batching against none (same cache folder,
so the second server starts from the first one's compile cache):

    python scripts/load_test.py --model flux-dev --size 1024x1024 --clients 8 --requests 3 \\
        --max-batch 1 4 --out load.json -- --device cuda --backend torch

(arguments after `--` go to the server). Each client sends its requests one after another on its own
connection (a closed loop); all clients start together. Before measuring, a warm-up sends k concurrent requests
for every batch size k up to the server's limit, until each size has been seen, so compilation and CUDA graph
capture happen outside the measured window. Prints a table (images/s, p50/p99 latency, mean batch) and writes
the JSON. Standard library only on the client side.
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import json
import math
import os
import platform
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any

from pipeline.serve.launch import get_json, running_server


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


class Client:
    """One keep-alive connection; `generate` returns (status, seconds, body or None)."""

    def __init__(self, url: str, timeout: float) -> None:
        parts = urllib.parse.urlsplit(url)
        self.conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)

    def generate(self, body: dict[str, Any]) -> tuple[int, float, dict[str, Any] | None]:
        payload = json.dumps(body).encode()
        start = time.perf_counter()
        self.conn.request("POST", "/v1/images/generations", payload, {"Content-Type": "application/json"})
        response = self.conn.getresponse()
        raw = response.read()
        seconds = time.perf_counter() - start
        return response.status, seconds, json.loads(raw) if response.status == 200 else None

    def close(self) -> None:
        self.conn.close()


def request_body(size: str, steps: int | None, tag: str, seed: int) -> dict[str, Any]:
    body: dict[str, Any] = {"prompt": f"a red fox in the snow, {tag}", "size": size, "seed": seed}
    body["response_format"] = "b64_json"  # no files written: the PNG is encoded either way
    if steps is not None:
        body["steps"] = steps
    return body


def concurrently(url: str, bodies: list[list[dict[str, Any]]], timeout: float) -> list[list[tuple]]:
    """One thread per list of bodies, all starting together; each sends its bodies one after another."""
    results: list[list[tuple]] = [[] for _ in bodies]
    barrier = threading.Barrier(len(bodies))

    def run(i: int) -> None:
        client = Client(url, timeout)
        try:
            barrier.wait()
            for body in bodies[i]:
                try:
                    results[i].append(client.generate(body))
                except (OSError, http.client.HTTPException) as e:
                    results[i].append((0, 0.0, {"error": str(e)}))
                    client.close()
                    client = Client(url, timeout)
        finally:
            client.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def warm_up(url: str, size: str, steps: int | None, max_batch: int, timeout: float) -> dict[str, Any]:
    """Make every batch size 1..max_batch happen once (compile, graph capture) before measuring."""
    start = time.perf_counter()
    seen: set[int] = set()
    for k in range(1, max_batch + 1):
        for attempt in range(4):
            if k in seen:
                break
            bodies = [[request_body(size, steps, f"warm-up {k}.{attempt}.{i}", i)] for i in range(k)]
            for status, _, body in (r for rs in concurrently(url, bodies, timeout) for r in rs):
                if status != 200:
                    raise RuntimeError(f"warm-up request failed with HTTP {status}: {body}")
                seen.add(body["batch"]["images"])
    return {"seconds": round(time.perf_counter() - start, 2), "batch_sizes_seen": sorted(seen)}


def measure(
    url: str, clients: int, requests: int, size: str, steps: int | None, timeout: float
) -> dict[str, Any]:
    before = get_json(f"{url}/health")
    bodies = [
        [request_body(size, steps, f"client {c} request {r}", 1000 * c + r) for r in range(requests)]
        for c in range(clients)
    ]
    start = time.perf_counter()
    results = concurrently(url, bodies, timeout)
    wall = time.perf_counter() - start
    after = get_json(f"{url}/health")
    flat = [r for rs in results for r in rs]
    ok = [(seconds, body) for status, seconds, body in flat if status == 200]
    latencies = [seconds for seconds, _ in ok]
    images = sum(len(body["data"]) for _, body in ok)
    batches = after["batches"] - before["batches"]
    return {
        "clients": clients,
        "requests_per_client": requests,
        "ok": len(ok),
        "errors": {str(s): sum(1 for r in flat if r[0] == s) for s in {r[0] for r in flat if r[0] != 200}},
        "images": images,
        "wall_s": round(wall, 3),
        "images_per_s": round(images / wall, 4),
        "latency_p50_s": round(percentile(latencies, 50), 3) if latencies else None,
        "latency_p99_s": round(percentile(latencies, 99), 3) if latencies else None,
        "latency_mean_s": round(sum(latencies) / len(latencies), 3) if latencies else None,
        "pipeline_calls": batches,
        "mean_batch": round((after["images"] - before["images"]) / batches, 2) if batches else None,
    }


def run_against(url: str, args: argparse.Namespace) -> dict[str, Any]:
    health = get_json(f"{url}/health")
    card = get_json(f"{url}/v1/models")["data"][0]
    size = args.size or card["default_size"]
    warm = warm_up(url, size, args.steps, health["max_batch"], args.timeout) if args.warmup else None
    figures = measure(url, args.clients, args.requests, size, args.steps, args.timeout)
    return {
        "max_batch": health["max_batch"],
        "size": size,
        "steps": args.steps or card["default_steps"],
        "model": card["id"],
        "backend": card["backend"],
        "device": card.get("device"),
        "warm_up": warm,
        **figures,
    }


def local_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("torch", "diffusers", "transformers", "fastapi", "uvicorn"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def print_table(runs: list[dict[str, Any]]) -> None:
    head = f"{'max_batch':>9} {'clients':>7} {'images':>6} {'wall_s':>8} {'images/s':>9} {'p50_s':>7} {'p99_s':>7} {'batch':>5}"
    print(head)
    for r in runs:
        print(
            f"{r['max_batch']:>9} {r['clients']:>7} {r['images']:>6} {r['wall_s']:>8.2f} {r['images_per_s']:>9.3f} "
            f"{r['latency_p50_s'] or 0:>7.2f} {r['latency_p99_s'] or 0:>7.2f} {r['mean_batch'] or 0:>5.2f}"
        )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    server_extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    target = ap.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="a running server")
    target.add_argument("--model", help="start a server for this model (once per --max-batch)")
    ap.add_argument(
        "--max-batch", type=int, nargs="+", default=[1, 4], help="with --model: values to compare"
    )
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--requests", type=int, default=5, help="per client")
    ap.add_argument("--size", help="WIDTHxHEIGHT (default: the model's)")
    ap.add_argument("--steps", type=int, help="default: the model's")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per request, client side")
    ap.add_argument("--no-warmup", dest="warmup", action="store_false")
    ap.add_argument("--cache-dir", help="with --model: the servers' cache (default: a temporary folder)")
    ap.add_argument("--out", help="write the JSON here")
    args = ap.parse_args(argv)

    result: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "client": {
            "machine": f"{platform.system()} {platform.machine()}",
            "cpus": os.cpu_count(),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        },
    }
    if args.url:
        result["runs"] = [run_against(args.url.rstrip("/"), args)]
    else:
        result["versions"] = local_versions()
        runs = []
        with tempfile.TemporaryDirectory() as tmp:
            cache = args.cache_dir or str(Path(tmp) / "cache")
            for max_batch in args.max_batch:
                server_args = ["--model", args.model, "--cache-dir", cache, "--max-batch", str(max_batch)]
                server_args += ["--max-queue", str(max(args.clients, 1) * 2), "--timeout", str(args.timeout)]
                server_args += server_extra
                log = Path(tmp) / f"server-{max_batch}.log"
                started = time.perf_counter()
                with running_server(server_args, log_path=log, ready_timeout=900) as server:
                    ready = time.perf_counter() - started
                    run = run_against(server.url, args)
                run["server_ready_s"] = round(ready, 1)
                run["server_args"] = server_args
                runs.append(run)
                print_table([run])
        result["runs"] = runs
        base = next((r["images_per_s"] for r in runs if r["max_batch"] == 1), None)
        for r in runs:
            if base and r["max_batch"] != 1:
                r["speedup_vs_max_batch_1"] = round(r["images_per_s"] / base, 3)
    result["client"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    print_table(result["runs"])
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    failed = any(r["ok"] < r["clients"] * r["requests_per_client"] for r in result["runs"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
