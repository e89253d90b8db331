"""Attention through NVIDIA's cuDNN frontend (the `nvidia-cudnn-frontend` package) against torch's own SDPA, on CUDA.

torch 2.11's `scaled_dot_product_attention` refuses float8 inputs and builds a cuDNN plan per attention shape
(40-70 ms each, docs/benchmarks.md, "Attention plans, shape by shape"). The cuDNN frontend's Python API offers what torch
does not: fp8 attention (`sdpa_fp8`, per-tensor scales) and graphs with dynamic shapes sharing one kernel
cache. This probe measures whether either is worth building on:

- speed: FLUX.1-dev's joint attention (24 heads of 128, 4608 tokens at 1024², 1536 at 512²), bf16 through
  torch's cuDNN SDPA, bf16 through the frontend's torch op (`torch.ops.cudnn.sdpa_fwd`), fp8 through
  pipeline/engines/fp8_attention.py's op (an `sdpa_fp8` graph), alone and with its quantization; time per
  call in a CUDA graph, TFLOP/s, relative L2 error against float32 attention;
- plans: SD 1.5's attention shapes at 768² after 512² (CFG batch 2; kernel_probes.unet_attention_shapes), first-call
  time per shape through torch
  and through frontend graphs, without and with dynamic shapes + a shared kernel cache;

    python scripts/attention_probe.py [speed] [plans]      (writes $OUT/attention_probe.json)
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import traceback
from functools import partial

import torch
import torch.nn.functional as F
from kernel_probes import (  # scripts/ is on the path when run as python scripts/attention_probe.py
    graph_ms,
    unet_attention_shapes,
)
from torch.nn.attention import SDPBackend, sdpa_kernel

OUT = os.environ.get("OUT", "/tmp")
RESULTS: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}


def rel_l2(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.float() - ref).norm() / ref.norm())


def reference(q, k, v) -> torch.Tensor:
    """float32 attention, head by head (math kernel; no fused-kernel rounding)."""
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    for h in range(q.shape[1]):
        with sdpa_kernel([SDPBackend.MATH]):
            out[:, h : h + 1] = F.scaled_dot_product_attention(
                q[:, h : h + 1].float(), k[:, h : h + 1].float(), v[:, h : h + 1].float()
            )
    return out


def measure(fn, ref: torch.Tensor, flop: float) -> dict:
    """`fn`'s time per call in a CUDA graph, its TFLOP/s and its error; or what failed (a probe goes on)."""
    try:
        out = fn()
        torch.cuda.synchronize()
        ms, _ = graph_ms(fn)
        return {"ms": round(ms, 4), "tflops": round(flop / ms / 1e9, 1), "rel_l2": rel_l2(out, ref)}
    except Exception as exc:
        return failure(exc)


def failure(exc: Exception) -> dict:
    return {"error": f"{type(exc).__name__}: {exc}"[:400], "trace": traceback.format_exc()[-1500:]}


def fp8_runners(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    """(the fp8 op alone on q/k/v quantized ahead, quantization + op as the FLUX processor runs them,
    the graph's build seconds): pipeline/engines/fp8_attention.py's code."""
    from pipeline.engines.fp8_attention import quantize_per_tensor

    op = torch.ops.adaptive_diffusion.sdpa_fp8
    (q8, dq), (k8, dk), (v8, dv) = (quantize_per_tensor(t) for t in (q, k, v))
    t0 = time.perf_counter()
    op(q8, k8, v8, dq, dk, dv, scale, torch.bfloat16)  # builds the cuDNN graph
    torch.cuda.synchronize()
    build_s = round(time.perf_counter() - t0, 3)

    def quantized() -> torch.Tensor:
        (a, da), (b, db), (c, dc) = (quantize_per_tensor(t) for t in (q, k, v))
        return op(a, b, c, da, db, dc, scale, torch.bfloat16)

    return partial(op, q8, k8, v8, dq, dk, dv, scale, torch.bfloat16), quantized, build_s


def speed() -> None:
    import cudnn
    import cudnn.sdpa.fwd.torch_op  # registers torch.ops.cudnn.sdpa_fwd

    RESULTS["cudnn_frontend"] = getattr(cudnn, "__version__", "?")
    RESULTS["cudnn_backend"] = cudnn.backend_version() if hasattr(cudnn, "backend_version") else "?"
    rows = []
    scale = 1 / math.sqrt(128)
    for tokens in (4608, 1536):
        torch.manual_seed(0)
        shape = (1, 24, tokens, 128)
        q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        ref = reference(q, k, v)
        flop = 4 * tokens * tokens * 128 * 24
        row: dict = {"tokens": tokens, "tflop_per_call": flop / 1e12}
        for name, backend in (
            ("torch_cudnn_bf16", SDPBackend.CUDNN_ATTENTION),
            ("torch_flash_bf16", SDPBackend.FLASH_ATTENTION),
        ):
            with sdpa_kernel([backend]):
                row[name] = measure(partial(F.scaled_dot_product_attention, q, k, v), ref, flop)
        row["frontend_bf16"] = measure(
            lambda q=q, k=k, v=v: torch.ops.cudnn.sdpa_fwd(q, k, v, scale, return_lse=False)[0], ref, flop
        )
        try:
            alone, quantized, row["fp8_build_s"] = fp8_runners(q, k, v, scale)
            row["fp8_op"] = measure(alone, ref, flop)
            row["fp8_quantize_and_op"] = measure(quantized, ref, flop)
        except Exception as exc:
            row["fp8_op"] = failure(exc)
        rows.append(row)
    RESULTS["speed"] = rows


def first_call_ms(fn, *args) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn(*args)
    torch.cuda.synchronize()
    return round((time.perf_counter() - t0) * 1e3, 2)


def dynamic_sdpa(cudnn, handle, cache, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Build (with dynamic shapes, kernels from `cache`) and run one fp16 SDPA graph for these tensors."""
    f16, f32 = cudnn.data_type.HALF, cudnn.data_type.FLOAT
    g = cudnn.pygraph(
        handle=handle, io_data_type=f16, intermediate_data_type=f32, compute_data_type=f32,
        kernel_cache=cache, is_dynamic_shape_enabled=True,
    )  # fmt: skip
    tq, tk, tv = (
        g.tensor(name=n, dim=list(t.shape), stride=list(t.stride()), data_type=f16)
        for n, t in zip("qkv", (q, k, v), strict=True)
    )
    scale = 1 / math.sqrt(q.shape[-1])
    o, _ = g.sdpa(name="sdpa", q=tq, k=tk, v=tv, generate_stats=False, attn_scale=scale)
    out = torch.empty_like(q)
    o.set_output(True).set_dim(list(out.shape)).set_stride(list(out.stride())).set_data_type(f16)
    g.validate()
    g.build_operation_graph()
    g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    g.check_support()
    g.build_plans()
    ws = torch.empty(max(g.get_workspace_size(), 1), dtype=torch.uint8, device="cuda")
    g.execute({tq: q, tk: k, tv: v, o: out}, ws, handle=handle)


def plans() -> None:
    import cudnn
    import cudnn.sdpa.fwd.torch_op  # registers torch.ops.cudnn.sdpa_fwd

    def tensors(sq: int, sk: int, heads: int, d: int) -> tuple[torch.Tensor, ...]:
        q = torch.randn(2, heads, sq, d, device="cuda", dtype=torch.float16)  # batch 2: CFG
        kv = torch.randn(2, heads, sk, d, device="cuda", dtype=torch.float16)
        return q, kv, kv.clone()

    sizes = (512, 768)
    shapes = {size: [shape[1:] for shape in unet_attention_shapes("sd15", size)] for size in sizes}
    rows: dict = {"shapes (query tokens, key tokens, heads, head dim)": shapes}
    for size in sizes:
        for shape in shapes[size]:
            q, k, v = tensors(*shape)
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                rows.setdefault("torch_ms", []).append(first_call_ms(F.scaled_dot_product_attention, q, k, v))
            rows.setdefault("frontend_op_ms", []).append(
                first_call_ms(
                    partial(torch.ops.cudnn.sdpa_fwd, return_lse=False), q, k, v, 1 / math.sqrt(shape[3])
                )
            )
    handle = cudnn.create_handle()
    cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream().cuda_stream)
    cache = cudnn.create_kernel_cache()  # one kernel cache shared by graphs of every shape
    try:
        for size in sizes:
            for shape in shapes[size]:
                q, k, v = tensors(*shape)
                rows.setdefault("frontend_dynamic_ms", []).append(
                    first_call_ms(dynamic_sdpa, cudnn, handle, cache, q, k, v)
                )
    except Exception as exc:
        rows["frontend_dynamic"] = failure(exc)
    RESULTS["plans"] = rows


def main() -> None:
    for name in sys.argv[1:] or ["speed", "plans"]:
        try:
            {"speed": speed, "plans": plans}[name]()
        except Exception as exc:
            RESULTS[name + "_error"] = failure(exc)
    with open(os.path.join(OUT, "attention_probe.json"), "w") as f:
        json.dump(RESULTS, f, indent=1, default=str)
    print(json.dumps(RESULTS, indent=1, default=str)[-6000:])


if __name__ == "__main__":
    main()
