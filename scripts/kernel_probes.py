"""Kernel probes on CUDA (one-off measurements the README cites; docs/h200/fp8_quant_vae_plans.json,
whose VAE rows came from a probe since replaced by scripts/vae_bench.py):

- flux_quant: one FLUX double + single block in fp8 at 1024², compiled with Inductor's default reductions,
  `triton.multi_kernel`, or persistent reductions up to 16k columns; time per replay and top kernels;
- plans: whether cuDNN attention / convolution plans built in one thread serve another;
- attention_shapes: per attention shape of SD 1.5 and SDXL (self and cross, CFG batch 2), each SDPA backend's
  first call at that shape (cuDNN builds its plan there) and its time per call in a CUDA graph
  (PROBE_BACKENDS=cudnn,flash picks backends, PROBE_SD_SIZES=512,768 SD's sizes; run it with
  TORCH_CUDNN_SDPA_AVOID_RECOMPILE=1 for torch's power-of-two plan buckets).

    python scripts/kernel_probes.py [plans] [flux_quant] [attention_shapes]      (writes $OUT/exp.json)
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

import torch

sys.path.insert(0, os.getcwd())
OUT = os.environ.get("OUT", "/tmp")
RESULTS: dict = {}


def graph_ms(fn, reps=20):
    """`fn` warmed up on a side stream, captured in a CUDA graph: (milliseconds per replay, the graph)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        g.replay()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / reps, g


def timed_graph(fn, reps=20):
    """`graph_ms`, plus the replay's top kernels."""
    ms, g = graph_ms(fn, reps)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        g.replay()
        torch.cuda.synchronize()
    kernels = sorted(
        ((e.key, e.device_time_total / 1e3, e.count) for e in prof.key_averages() if e.device_time_total > 0),
        key=lambda t: -t[1],
    )[:14]
    return ms, [(k[:100], round(t, 3), c) for k, t, c in kernels]


def flux_quant() -> None:
    from diffusers import FluxTransformer2DModel
    from torch._inductor.choices import InductorChoices
    from torch._inductor.virtualized import V
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from pipeline.engines.fp8 import fuse_fp8_projections, quantize_linears
    from pipeline.engines.fusion import fuse_projections

    torch.manual_seed(0)
    model = (
        FluxTransformer2DModel(
            patch_size=1,
            in_channels=64,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=128,
            num_attention_heads=24,
            joint_attention_dim=4096,
            pooled_projection_dim=768,
            guidance_embeds=True,
            axes_dims_rope=(16, 56, 56),
        )
        .to("cuda", torch.bfloat16)
        .eval()
    )
    for p in model.parameters():
        p.data.normal_(0, 0.02)
    fuse_projections(model)
    quantize_linears(model, device=torch.device("cuda"), quiet=True)
    fuse_fp8_projections(model)
    dev = "cuda"
    n_img, n_txt = 4096, 512
    ids = torch.zeros(n_img, 3, device=dev)
    ids[:, 1] = torch.arange(n_img, device=dev) // 64
    ids[:, 2] = torch.arange(n_img, device=dev) % 64
    inputs = dict(
        hidden_states=torch.randn(1, n_img, 64, device=dev, dtype=torch.bfloat16),
        encoder_hidden_states=torch.randn(1, n_txt, 4096, device=dev, dtype=torch.bfloat16),
        pooled_projections=torch.randn(1, 768, device=dev, dtype=torch.bfloat16),
        timestep=torch.tensor([0.5], device=dev, dtype=torch.bfloat16),
        img_ids=ids,
        txt_ids=torch.zeros(n_txt, 3, device=dev),
        guidance=torch.tensor([3.5], device=dev, dtype=torch.bfloat16),
        return_dict=False,
    )

    class Wide(InductorChoices):
        @staticmethod
        def should_use_persistent_reduction(features, cooperative_reduction):

            if features.get_reduction_hint().name == "INNER":
                return V.graph.sizevars.statically_known_leq(features.reduction_numel, 16384)
            return InductorChoices.should_use_persistent_reduction(features, cooperative_reduction)

    variants = {
        "default": ({}, None),
        "multi_kernel": ({"triton.multi_kernel": 1}, None),
        "persistent_16k": ({}, Wide),
    }
    for name, (options, choices) in variants.items():
        torch._dynamo.reset()
        if choices is not None:
            V.set_choices_handler(choices())
        else:
            V.set_choices_handler(InductorChoices())
        fn = torch.compile(model, fullgraph=True, dynamic=False, options=options or None)
        t0 = time.perf_counter()
        try:
            with torch.inference_mode(), sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                out = fn(**inputs)[0]
                torch.cuda.synchronize()
                compile_s = time.perf_counter() - t0
                ms, kernels = timed_graph(lambda fn=fn: fn(**inputs))
            RESULTS[f"flux_fp8_{name}"] = {
                "ms": round(ms, 3),
                "compile_s": round(compile_s, 1),
                "out_norm": float(out.float().norm()),
                "kernels": kernels,
            }
        except Exception as e:
            RESULTS[f"flux_fp8_{name}"] = {"error": f"{type(e).__name__}: {str(e)[:400]}"}
        print(name, {k: v for k, v in RESULTS[f"flux_fp8_{name}"].items() if k != "kernels"}, flush=True)
    V.set_choices_handler(InductorChoices())


def plans() -> None:
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def sdpa(n):
        q = torch.randn(2, 8, n, 40, device="cuda", dtype=torch.float16)
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            F.scaled_dot_product_attention(q, q, q)

    def conv(h):
        c = (
            torch.nn.Conv2d(320, 320, 3, padding=1)
            .to("cuda", torch.float16)
            .to(memory_format=torch.channels_last)
        )
        x = torch.randn(2, 320, h, h, device="cuda", dtype=torch.float16).contiguous(
            memory_format=torch.channels_last
        )
        with torch.inference_mode():
            c(x)

    def t(f, *a):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        f(*a)
        torch.cuda.synchronize()
        return round((time.perf_counter() - t0) * 1e3, 2)

    r = {}
    r["sdpa_main_first_4096"] = t(sdpa, 4096)
    r["sdpa_main_again_4096"] = t(sdpa, 4096)
    box = {}
    th = threading.Thread(target=lambda: box.update(first=t(sdpa, 9216)))
    th.start()
    th.join()
    r["sdpa_thread_first_9216"] = box["first"]
    r["sdpa_main_after_thread_9216"] = t(sdpa, 9216)
    r["sdpa_main_again_9216"] = t(sdpa, 9216)
    r["sdpa_main_first_2304"] = t(sdpa, 2304)
    r["conv_main_first_64"] = t(conv, 64)
    r["conv_main_again_64"] = t(conv, 64)
    th = threading.Thread(target=lambda: box.update(conv=t(conv, 96)))
    th.start()
    th.join()
    r["conv_thread_first_96"] = box["conv"]
    r["conv_main_after_thread_96"] = t(conv, 96)
    r["conv_main_again_96"] = t(conv, 96)
    RESULTS["plans_ms"] = r
    print(r, flush=True)


def unet_attention_shapes(family: str, size: int) -> list[tuple[str, int, int, int, int]]:
    """(name, query tokens, key tokens, heads, head dim) of a UNet's attention at size² (diffusers' configs)."""
    h = size // 8
    if family == "sd15":  # 8 heads; attention at latent/1, /2, /4 and the mid block's /8
        levels = [(h * h, 8, 40), ((h // 2) ** 2, 8, 80), ((h // 4) ** 2, 8, 160), ((h // 8) ** 2, 8, 160)]
    else:  # SDXL: 64-wide heads at latent/2 and /4
        levels = [((h // 2) ** 2, 10, 64), ((h // 4) ** 2, 20, 64)]
    shapes = []
    for s, heads, d in levels:
        shapes += [(f"self{s}", s, s, heads, d), (f"cross{s}", s, 77, heads, d)]
    return shapes


def attention_shapes() -> None:
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
    }
    chosen = os.environ.get("PROBE_BACKENDS")  # e.g. "cudnn"
    if chosen:
        backends = {k: v for k, v in backends.items() if k in chosen.split(",")}
    sd_sizes = tuple(int(x) for x in os.environ.get("PROBE_SD_SIZES", "512,768").split(","))

    fused = os.environ.get("PROBE_FUSED") == "1"  # self-attention's q, k, v as slices of one projection

    def qkv(sq, sk, heads, d):
        def split(n):  # diffusers' head split: (B, S, H*D) viewed (B, S, H, D), transposed
            x = torch.randn(2, n, heads * d, device="cuda", dtype=torch.float16)
            return x.view(2, n, heads, d).transpose(1, 2)

        if fused and sq == sk:
            x = torch.randn(2, sq, 3 * heads * d, device="cuda", dtype=torch.float16)
            return tuple(t.view(2, sq, heads, d).transpose(1, 2) for t in x.split(heads * d, dim=-1))
        return split(sq), split(sk), split(sk)

    with torch.inference_mode():
        for backend in backends.values():  # libraries' start-up out of the first shape's figure
            q, k, v = qkv(64, 64, 8, 40)
            with sdpa_kernel(backend):
                F.scaled_dot_product_attention(q, k, v)
        torch.cuda.synchronize()
        rows = []
        for family, sizes in (("sd15", sd_sizes), ("sdxl", (1024, 896))):
            for size in sizes:
                for shape, sq, sk, heads, d in unet_attention_shapes(family, size):
                    q, k, v = qkv(sq, sk, heads, d)
                    row = {"family": family, "size": size, "shape": shape, "heads": heads, "head_dim": d}
                    for name, backend in backends.items():
                        with sdpa_kernel(backend):
                            try:
                                torch.cuda.synchronize()
                                t0 = time.perf_counter()
                                F.scaled_dot_product_attention(q, k, v)
                                torch.cuda.synchronize()
                                row[f"{name}_first_ms"] = round((time.perf_counter() - t0) * 1e3, 3)
                                ms, _ = graph_ms(
                                    lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v), 50
                                )
                                row[f"{name}_ms"] = round(ms, 4)
                            except RuntimeError as e:
                                row[f"{name}_error"] = str(e)[:120]
                    rows.append(row)
                    print(row, flush=True)
    RESULTS["attention_shapes"] = rows


if __name__ == "__main__":
    print(torch.__version__, torch.cuda.get_device_name(), flush=True)
    for part in sys.argv[1:] or ["plans", "flux_quant"]:
        try:
            globals()[part]()
        except Exception as e:
            RESULTS[part + "_error"] = f"{type(e).__name__}: {e}"
            print(part, "failed", e, flush=True)
        json.dump(RESULTS, open(os.path.join(OUT, "exp.json"), "w"), indent=1)
