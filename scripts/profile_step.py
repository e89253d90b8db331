"""Where the time of a whole call goes, measured (issue 11: "a target you miss is reported with what limits
it, from a profile").

    python scripts/profile_step.py --model flux-dev --size 1024x1024 --steps 28 --json OUT.json
    python scripts/profile_step.py --model flux-dev --size 1024x1024 --steps 28 --precision fp8 --json OUT.json
    python scripts/profile_step.py --model sd15 --size 512x512 --steps 50 --dtype fp16 --json OUT.json

Loads the pipeline as a user does (compile + CUDA graphs, the defaults), counts the FLOPs of one call with
`torch.utils.flop_counter` while it runs uncompiled (one denoising step and two: the difference is one step),
warms up, then runs one whole call under `torch.profiler` (CUPTI traces the kernels inside CUDA-graph replays).
Reports the GPU time per kernel category (GEMM, attention, convolution, fused Triton kernels, copies, other),
the GPU's idle time inside the call, the achieved TFLOP/s of the GEMMs and the attention against the GPU's
dense peak, and the top kernels. `--fp8-attention` also tries scaled_dot_product_attention on float8 inputs
and reports whether this torch runs it, how fast and how far from bf16.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from pipeline import Pipeline
from pipeline.options import DTYPES, parse_size

logger = logging.getLogger("profile_step")

# Kernel name -> category, first match wins (cuBLAS/cuBLASLt, CUTLASS, cuDNN, FlashAttention, Triton names).
# Inductor's Triton kernels are named after the ops they fuse ("triton_red_fused__scaled_mm_abs_amax..." is
# the fp8 activation quantization feeding a cuBLAS _scaled_mm, not a GEMM): they are matched first.
CATEGORIES = (
    ("gemm", re.compile(r"^triton_tem")),  # Inductor's GEMM templates (max-autotune)
    ("triton fused", re.compile(r"^triton_")),
    ("layout", re.compile(r"nchwToNhwc|nhwcToNchw", re.I)),  # cuDNN converting NCHW tensors for its kernels
    ("attention", re.compile(r"flash|fmha|attention|sdpa|_attn", re.I)),
    ("convolution", re.compile(r"conv|fprop|dgrad|wgrad|implicit_gemm|winograd", re.I)),
    ("gemm", re.compile(r"gemm|nvjet|xmma|cutlass|cublas|matmul|_mm_|scaled_mm|splitk", re.I)),
    ("copy / memset", re.compile(r"memcpy|memset|copy|fill", re.I)),
)
# Dense peaks (TFLOP/s) of the GPUs this runs on; sparsity excluded.
PEAK_TFLOPS = {
    "H100": {"bf16": 989.0, "fp16": 989.0, "fp8": 1979.0},
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp8": 1979.0},
}
GEMM_OPS = ("mm", "addmm", "bmm", "baddbmm", "_scaled_mm", "matmul")
ATTENTION_OPS = ("_scaled_dot_product", "sdpa")


def category(kernel: str) -> str:
    for name, pattern in CATEGORIES:
        if pattern.search(kernel):
            return name
    return "other"


def flops_by_kind(counts: dict[str, dict[Any, int]]) -> dict[str, int]:
    """FlopCounterMode's global counts folded into gemm / attention / convolution."""
    kinds: dict[str, int] = defaultdict(int)
    for op, flops in counts.get("Global", {}).items():
        name = getattr(op, "__name__", str(op)).split(".")[-1]  # aten.addmm -> addmm
        if any(name.startswith(a) or a in name for a in ATTENTION_OPS):
            kinds["attention"] += flops
        elif "convolution" in name:
            kinds["convolution"] += flops
        elif name in GEMM_OPS or name.endswith("mm"):
            kinds["gemm"] += flops
        else:
            kinds["other"] += flops
    return dict(kinds)


def count_flops(pipe: Pipeline, call: Any, steps: int) -> dict[str, Any]:
    """FLOPs of one call with `steps` steps, counted on the uncompiled modules: per step and outside the loop."""
    from torch.utils.flop_counter import FlopCounterMode

    per_steps = {}
    with pipe.backend.uncompiled():
        for n in (1, 2):
            counter = FlopCounterMode(display=False)
            with counter:
                call(n)
            per_steps[n] = flops_by_kind(counter.get_flop_counts())
    kinds = set(per_steps[1]) | set(per_steps[2])
    step = {k: per_steps[2].get(k, 0) - per_steps[1].get(k, 0) for k in kinds}
    outside = {k: per_steps[1].get(k, 0) - step[k] for k in kinds}
    total = {k: outside[k] + steps * step[k] for k in kinds}
    return {"per_step": step, "outside_loop": outside, "call": total}


def profile_call(call: Any, *args: Any) -> tuple[float, list[dict[str, Any]], list[dict[str, Any]]]:
    """One call under torch.profiler: wall seconds, every GPU kernel's name, count and total time, and the
    host's busiest operators (self CPU time: what a call spends outside the GPU, a first call's set-up)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        torch.cuda.synchronize()
        start = time.perf_counter()
        call(None, *args)
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    from torch.autograd import DeviceType

    kernels, host = [], []
    for avg in prof.key_averages():  # GPU-side events: kernels, copies, memsets; CPU-side: operators
        device_us = getattr(avg, "self_device_time_total", 0) or 0
        if getattr(avg, "device_type", None) == DeviceType.CUDA and device_us > 0:
            kernels.append({"name": avg.key, "count": avg.count, "seconds": device_us / 1e6})
        elif getattr(avg, "device_type", None) == DeviceType.CPU and avg.self_cpu_time_total > 0:
            host.append({"name": avg.key[:160], "count": avg.count, "seconds": avg.self_cpu_time_total / 1e6})
    kernels.sort(key=lambda k: -k["seconds"])
    host.sort(key=lambda k: -k["seconds"])
    return wall, kernels, [{**h, "seconds": round(h["seconds"], 4)} for h in host[:25]]


def time_call(call: Any, *args: Any) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    call(None, *args)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def parse_option(text: str) -> tuple[str, Any]:
    """KEY=VALUE of a backend option: true/false are booleans, the rest strings."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, {"true": True, "false": False}.get(value.lower(), value)


def summarize(
    wall: float, kernels: list[dict[str, Any]], flops: dict[str, Any], peak: dict[str, float], dtype: str
) -> dict[str, Any]:
    by_cat: dict[str, float] = defaultdict(float)
    for k in kernels:
        by_cat[category(k["name"])] += k["seconds"]
    busy = sum(by_cat.values())
    out: dict[str, Any] = {
        "wall_s": round(wall, 4),
        "gpu_busy_s": round(busy, 4),
        "gpu_idle_s": round(max(0.0, wall - busy), 4),
        "categories": {
            c: {"seconds": round(s, 4), "share_of_wall": round(s / wall, 3)}
            for c, s in sorted(by_cat.items(), key=lambda kv: -kv[1])
        },
    }
    for kind, peak_key in (("gemm", dtype), ("attention", "bf16" if dtype == "fp8" else dtype)):
        seconds = by_cat.get(kind, 0.0)
        f = flops["call"].get(kind, 0)
        if seconds and f:
            tflops = f / seconds / 1e12
            out["categories"][kind] |= {
                "tflop": round(f / 1e12, 1),
                "achieved_tflops": round(tflops, 1),
                "of_peak": round(tflops / peak[peak_key], 3) if peak_key in peak else None,
            }
    out["top_kernels"] = [
        {**k, "seconds": round(k["seconds"], 4), "category": category(k["name"]), "name": k["name"][:160]}
        for k in kernels[:25]
    ]
    return out


def fp8_attention_check(device: torch.device, tokens: int, heads: int, head_dim: int) -> dict[str, Any]:
    """Does this torch run SDPA on float8 inputs? If so: its time against bf16's and its error."""
    import torch.nn.functional as F

    gen = torch.Generator(device).manual_seed(0)
    q, k, v = (torch.randn(1, heads, tokens, head_dim, device=device, dtype=torch.bfloat16, generator=gen)
               for _ in range(3))  # fmt: skip

    def timed(fn: Any) -> float:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(10):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - start) / 10

    reference = F.scaled_dot_product_attention(q, k, v)
    result: dict[str, Any] = {"shape": [1, heads, tokens, head_dim], "bf16_ms": 1e3 * timed(
        lambda: F.scaled_dot_product_attention(q, k, v))}  # fmt: skip
    q8, k8, v8 = (t.to(torch.float8_e4m3fn) for t in (q, k, v))
    try:
        out = F.scaled_dot_product_attention(q8, k8, v8)
    except Exception as e:
        result["fp8"] = f"refused: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
        return result
    result["fp8_ms"] = 1e3 * timed(lambda: F.scaled_dot_product_attention(q8, k8, v8))
    err = (out.float() - reference.float()).norm() / reference.float().norm()
    result["fp8_rel_l2"] = float(err)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="flux-dev")
    parser.add_argument("--size", default="1024x1024", help="WIDTHxHEIGHT")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None)
    parser.add_argument("--precision", choices=("fp8",), default=None)
    parser.add_argument("--warmup", type=int, default=2, help="calls before the profiled one")
    parser.add_argument("--fp8-attention", action="store_true")
    parser.add_argument(
        "--option",
        type=parse_option,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a backend option (channels_last=true, compile_resnets=true, ...)",
    )
    parser.add_argument(
        "--new-size",
        default=None,
        metavar="WIDTHxHEIGHT",
        help="also profile the first call at this size (after the steady one)",
    )
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if not torch.cuda.is_available():
        raise SystemExit("profile_step.py profiles CUDA kernels: it needs a GPU")
    device = torch.device("cuda")
    width, height = parse_size(args.size)

    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    options: dict[str, Any] = {"precision": args.precision} if args.precision else {}
    options |= dict(args.option)
    pipe = Pipeline.from_pretrained(
        args.model, device="cuda", dtype=DTYPES[args.dtype] if args.dtype else None,
        cache_dir=args.cache_dir, **options,
    )  # fmt: skip
    load_s = time.perf_counter() - start
    load_peak = torch.cuda.max_memory_allocated() / 2**30
    pipe.progress = False
    steps = args.steps or pipe.family.default_steps

    def call(n: int | None, size: tuple[int, int] = (width, height)) -> Any:
        return pipe("a photo of an astronaut riding a horse on mars", height=size[1], width=size[0],
                    num_inference_steps=n or steps, generator=torch.Generator().manual_seed(0),
                    output_type="np")  # fmt: skip

    flops = count_flops(pipe, call, steps)
    first = None
    for i in range(args.warmup):
        torch.cuda.synchronize()
        t = time.perf_counter()
        call(None)
        torch.cuda.synchronize()
        first = first if first is not None else time.perf_counter() - t
        logger.info("warm-up %d: %.3f s", i + 1, time.perf_counter() - t)
    wall, kernels, host = profile_call(call)
    gpu = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in gpu), {})
    dtype_key = "fp8" if args.precision else {torch.float16: "fp16"}.get(pipe.dtype, "bf16")
    report = {
        "model": args.model, "size": [width, height], "steps": steps, "dtype": str(pipe.dtype),
        "precision": args.precision, "backend": pipe.backend.describe(), "gpu": gpu,
        "torch": torch.__version__, "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "load_s": round(load_s, 1), "load_peak_gib": round(load_peak, 2),
        "serving_peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "first_call_s": round(first, 3) if first is not None else None,
        "flops": flops, "peak_tflops": peak,
        "options": options, "profiled_call": summarize(wall, kernels, flops, peak, dtype_key) | {"host": host},
    }  # fmt: skip
    if args.new_size:  # a new size's first call: what it does besides the steady work (captures, set-up)
        size = parse_size(args.new_size)
        wall, kernels, host = profile_call(call, size)
        new = summarize(wall, kernels, flops, peak, dtype_key)
        steady = [time_call(call, size) for _ in range(2)]
        report["new_size"] = {"size": list(size), "first_call": new | {"host": host}, "steady_s": min(steady)}
        logger.info("new size %dx%d: first %.3f s, steady %.3f s", *size, wall, min(steady))
    if args.fp8_attention:
        report["fp8_attention"] = fp8_attention_check(device, tokens=(width // 16) * (height // 16) + 512,
                                                      heads=24, head_dim=128)  # fmt: skip
    pipe.close()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    p = report["profiled_call"]
    print(f"{args.model} {width}x{height} {steps} steps {dtype_key}: wall {p['wall_s']:.3f} s, GPU busy "
          f"{p['gpu_busy_s']:.3f} s, idle {p['gpu_idle_s']:.3f} s")  # fmt: skip
    for name, c in p["categories"].items():
        extra = f"  {c['achieved_tflops']} TFLOP/s ({c['of_peak']} of peak)" if "achieved_tflops" in c else ""
        print(f"  {name:<14}{c['seconds']:>8.3f} s {c['share_of_wall']:>6.1%}{extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
