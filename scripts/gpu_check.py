"""Check and measure the torch backend on a CUDA GPU against diffusers' own pipelines, in one process each.

    python scripts/gpu_check.py flux --cache DIR --out DIR      # FLUX-dev: diffusers eager vs ours, checks
    python scripts/gpu_check.py warm --cache DIR --out DIR      # second process: start from the saved cache
    python scripts/gpu_check.py fp8 --cache DIR --out DIR       # fp8 denoiser vs bf16
    python scripts/gpu_check.py sd --cache DIR --out DIR        # SD 1.5 UNet: diffusers eager vs ours

Real-size architectures with random weights (no download); text encoders excluded from every figure (both
sides get the same prompt embeddings). Each mode writes <mode>.json under --out and prints a table last.
Exit status 1 when a compiled / graphed / fp8 output differs from the eager path beyond tolerance.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any

import torch

from pipeline.engines import torch_engine
from pipeline.pipeline import Pipeline

logger = logging.getLogger("gpu_check")
PROMPT = "a photo of a red fox in the snow"
TOLERANCE = {"graphs": 0.05, "fp8": 0.25}  # relative L2 error of final latents vs the reference


def _sync() -> None:
    torch.cuda.synchronize()


def env() -> dict[str, Any]:
    import diffusers
    import triton

    return {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "diffusers": diffusers.__version__,
        "cuda": torch.version.cuda,
        "date": str(date.today()),
    }


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


def gib(n: int) -> float:
    return round(n / 2**30, 2)


def attention_choice(results: dict[str, Any]) -> str | None:
    """Time flash vs cuDNN attention at FLUX 1024x1024's shape; return the faster if it matches."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (torch.randn(1, 24, 4608, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    out, times = {}, {}
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
        try:
            with sdpa_kernel(backend):
                f = torch.nn.functional.scaled_dot_product_attention
                out[name] = f(q, k, v)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(50):
                    f(q, k, v)
                end.record()
                _sync()
                times[name] = start.elapsed_time(end) / 50
        except RuntimeError as e:
            logger.warning("attention %s unavailable: %s", name, e)
    flop = 4 * 4608 * 4608 * 128 * 24
    results["attention_ms"] = {k: round(v, 3) for k, v in times.items()}
    results["attention_tflops"] = {k: round(flop / (v * 1e-3) / 1e12, 1) for k, v in times.items()}
    if "cudnn" in times and "flash" in times:
        results["attention_cudnn_rel_err"] = rel(out["cudnn"], out["flash"])
        if times["cudnn"] < times["flash"] and results["attention_cudnn_rel_err"] < 1e-2:
            return "cudnn"
    return None


_PARTIAL: tuple[Path, dict[str, Any]] | None = None  # results so far, rewritten after every image


def checkpoint() -> None:
    if _PARTIAL is not None:
        path, r = _PARTIAL
        path.write_text(json.dumps(r, indent=1, default=str))


def timed(fn: Any) -> tuple[Any, float]:
    _sync()
    start = time.perf_counter()
    out = fn()
    _sync()
    return out, time.perf_counter() - start


def ours(
    pipe: Pipeline, size: int, steps: int, guidance: float, output_type: str = "np"
) -> tuple[Any, float]:
    out = pipe(
        PROMPT,
        height=size,
        width=size,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=torch.Generator().manual_seed(0),
        output_type=output_type,
    )
    t = out.timings
    checkpoint()
    return out.images, t["denoise"] + t.get("vae_decoder", 0.0)  # text encoders excluded


def denoiser_regions(pipe: Pipeline) -> Any:
    return pipe.backend.regions[pipe.family.stages[pipe.family.denoiser].component]


def load(model: str, cache: Path, **options: Any) -> tuple[Pipeline, float]:
    start = time.perf_counter()
    pipe = Pipeline.from_pretrained(model, backend="torch", device="cuda", cache_dir=cache, **options)
    pipe.progress = False
    return pipe, time.perf_counter() - start


# ---- FLUX ---------------------------------------------------------------------------------------------------


def flux_diffusers(pipe: Pipeline) -> Any:
    from diffusers import FluxPipeline

    m, src = pipe.backend.modules, pipe.source
    return FluxPipeline(
        scheduler=src.scheduler,
        vae=m["vae"],
        text_encoder=m["text_encoder"],
        tokenizer=src.tokenizer("tokenizer"),
        text_encoder_2=m["text_encoder_2"],
        tokenizer_2=src.tokenizer("tokenizer_2"),
        transformer=m["transformer"],
    )


def run_flux(args: argparse.Namespace, r: dict[str, Any]) -> bool:
    choice = attention_choice(r)
    r["attention"] = choice or "flash (torch default)"
    pipe, r["load_s"] = load("flux-dev", args.cache, dtype="bf16")
    ok = True
    # diffusers eager on the same modules, default attention, text encoders excluded (prompt_embeds)
    dp = flux_diffusers(pipe)
    dp.set_progress_bar_config(disable=True)
    with torch.inference_mode():
        embeds, pooled, _ = dp.encode_prompt(PROMPT, PROMPT, max_sequence_length=512)
    with pipe.backend.uncompiled():
        for size in (1024, 512):
            times = []
            torch.cuda.reset_peak_memory_stats()
            for _ in range(3):

                def call(size: int = size) -> Any:
                    return dp(
                        prompt_embeds=embeds,
                        pooled_prompt_embeds=pooled,
                        height=size,
                        width=size,
                        num_inference_steps=28,
                        guidance_scale=3.5,
                        output_type="np",
                        generator=torch.Generator().manual_seed(0),
                    )

                times.append(timed(call)[1])
            r[f"diffusers_eager_{size}_s"] = times
            r[f"diffusers_eager_{size}_peak_gib"] = gib(torch.cuda.max_memory_allocated())
        ref512, r["ours_eager_512_s"] = ours(pipe, 512, 28, 3.5, "latent")
    torch_engine.ATTENTION = choice
    torch_engine._choose_attention(torch.device("cuda"))

    regions = denoiser_regions(pipe)
    # 1024: first call (cold compile), generic steady, then specialized steady
    from pipeline.engines.base import Specialization

    regions.specialization = Specialization.NONE
    _, r["ours_1024_first_s"] = ours(pipe, 1024, 28, 3.5)
    r["generic_compile_s"] = regions.stats.generic_compile_s
    r["ours_1024_generic_s"] = [ours(pipe, 1024, 28, 3.5)[1] for _ in range(3)]
    regions.specialization = Specialization.LAZY
    r["ours_1024_during_bg_compile_s"] = ours(pipe, 1024, 28, 3.5)[1]
    pipe.backend.wait_for_specialization()
    r["ours_1024_swap_s"] = ours(pipe, 1024, 28, 3.5)[1]
    torch.cuda.reset_peak_memory_stats()
    r["ours_1024_special_s"] = [ours(pipe, 1024, 28, 3.5)[1] for _ in range(3)]
    r["ours_1024_peak_gib"] = gib(torch.cuda.max_memory_allocated())
    # 512: a resolution not seen before; lazy serves it at once with the generic kernels
    _, r["ours_512_first_s"] = ours(pipe, 512, 28, 3.5)
    r["ours_512_generic_s"] = ours(pipe, 512, 28, 3.5)[1]  # starts the background specialization
    pipe.backend.wait_for_specialization()
    r["ours_512_swap_s"] = ours(pipe, 512, 28, 3.5)[1]
    r["ours_512_special_s"] = [ours(pipe, 512, 28, 3.5)[1] for _ in range(3)]
    r["special_compile_s"] = list(regions.stats.special_compile_s.values())
    r["captures_s"] = pipe.backend.stats.captures
    # correctness: compiled + graphed vs the eager reference (same seed), bf16
    lat512, _ = ours(pipe, 512, 28, 3.5, "latent")
    r["graphs_vs_eager_rel_err_512"] = rel(lat512, ref512)
    ok &= r["graphs_vs_eager_rel_err_512"] < TOLERANCE["graphs"]
    torch.save(ref512.cpu(), args.cache / "flux_ref512.pt")
    # eager specialization: what blocking once costs at a third resolution
    regions.specialization = Specialization.EAGER
    _, r["ours_768_first_eager_spec_s"] = ours(pipe, 768, 28, 3.5)
    r["ours_768_special_s"] = [ours(pipe, 768, 28, 3.5)[1] for _ in range(2)]
    regions.specialization = Specialization.LAZY
    start = time.perf_counter()
    pipe.close()
    r["cache_save_s"] = time.perf_counter() - start
    path = pipe.backend.model_cache.runtime_cache_path
    r["cache_file_mb"] = round(path.stat().st_size / 1e6, 1) if path.exists() else 0
    r["served"] = {str(k): v for k, v in regions.stats.served.items()}
    return ok


def run_warm(args: argparse.Namespace, r: dict[str, Any]) -> bool:
    torch_engine.ATTENTION = args.attention
    pipe, r["load_s"] = load("flux-dev", args.cache, dtype="bf16")
    r["cache_artifacts"] = pipe.backend.stats.cache_artifacts
    r["cache_load_s"] = pipe.backend.stats.cache_load_s
    _, r["ours_1024_first_s"] = ours(pipe, 1024, 28, 3.5)
    r["ours_1024_s"] = [ours(pipe, 1024, 28, 3.5)[1] for _ in range(2)]
    _, r["ours_512_first_s"] = ours(pipe, 512, 28, 3.5)
    r["ours_512_s"] = [ours(pipe, 512, 28, 3.5)[1] for _ in range(2)]
    r["generic_compile_s"] = denoiser_regions(pipe).stats.generic_compile_s
    from torch._dynamo.utils import counters

    r["inductor_counters"] = {k: v for k, v in counters["inductor"].items() if "cache" in k}
    return True


def run_fp8(args: argparse.Namespace, r: dict[str, Any]) -> bool:
    torch_engine.ATTENTION = args.attention
    pipe, r["load_s"] = load("flux-dev", args.cache, precision="fp8")
    _, r["ours_fp8_1024_first_s"] = ours(pipe, 1024, 28, 3.5)
    r["ours_fp8_1024_s"] = [ours(pipe, 1024, 28, 3.5)[1] for _ in range(2)]
    pipe.backend.wait_for_specialization()
    r["ours_fp8_1024_special_s"] = [ours(pipe, 1024, 28, 3.5)[1] for _ in range(3)]
    _, r["ours_fp8_512_first_s"] = ours(pipe, 512, 28, 3.5)
    lat, _ = ours(pipe, 512, 28, 3.5, "latent")
    r["ours_fp8_512_s"] = ours(pipe, 512, 28, 3.5)[1]
    ref = args.cache / "flux_ref512.pt"
    if ref.exists():
        r["fp8_vs_bf16_eager_rel_err_512"] = rel(lat, torch.load(ref).to(lat.device))
        return r["fp8_vs_bf16_eager_rel_err_512"] < TOLERANCE["fp8"]
    return True


# ---- SD 1.5 ---------------------------------------------------------------------------------------------------


def run_sd(args: argparse.Namespace, r: dict[str, Any]) -> bool:
    from diffusers import StableDiffusionPipeline

    torch_engine.ATTENTION = None
    pipe, r["load_s"] = load("sd15", args.cache, dtype="fp16")
    m, src = pipe.backend.modules, pipe.source
    dp = StableDiffusionPipeline(
        vae=m["vae"],
        text_encoder=m["text_encoder"],
        tokenizer=src.tokenizer("tokenizer"),
        unet=m["unet"],
        scheduler=src.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    dp.set_progress_bar_config(disable=True)
    with torch.inference_mode():
        pos, neg = dp.encode_prompt(PROMPT, "cuda", 1, True, "")
    with pipe.backend.uncompiled():
        times = []
        torch.cuda.reset_peak_memory_stats()
        for _ in range(3):
            times.append(
                timed(
                    lambda: dp(
                        prompt_embeds=pos,
                        negative_prompt_embeds=neg,
                        height=512,
                        width=512,
                        num_inference_steps=50,
                        guidance_scale=7.5,
                        output_type="np",
                        generator=torch.Generator().manual_seed(0),
                    )
                )[1]
            )
        r["diffusers_eager_512_s"] = times
        r["diffusers_eager_peak_gib"] = gib(torch.cuda.max_memory_allocated())
        ref, r["ours_eager_512_s"] = ours(pipe, 512, 50, 7.5, "latent")
    _, r["ours_512_first_s"] = ours(pipe, 512, 50, 7.5)
    r["ours_512_generic_s"] = [ours(pipe, 512, 50, 7.5)[1] for _ in range(2)]
    pipe.backend.wait_for_specialization()
    torch.cuda.reset_peak_memory_stats()
    r["ours_512_special_s"] = [ours(pipe, 512, 50, 7.5)[1] for _ in range(3)]
    r["ours_peak_gib"] = gib(torch.cuda.max_memory_allocated())
    lat, _ = ours(pipe, 512, 50, 7.5, "latent")
    r["graphs_vs_eager_rel_err_512"] = rel(lat, ref)
    r["generic_compile_s"] = denoiser_regions(pipe).stats.generic_compile_s
    r["special_compile_s"] = list(denoiser_regions(pipe).stats.special_compile_s.values())
    _, r["ours_768_first_s"] = ours(pipe, 768, 50, 7.5)
    r["ours_768_s"] = ours(pipe, 768, 50, 7.5)[1]
    pipe.close()
    return r["graphs_vs_eager_rel_err_512"] < TOLERANCE["graphs"]


def table(r: dict[str, Any]) -> str:
    lines = []
    for k, v in r.items():
        if isinstance(v, float):
            v = round(v, 3)
        elif isinstance(v, list):
            v = [round(x, 3) if isinstance(x, float) else x for x in v]
        lines.append(f"{k:36s} {v}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("mode", choices=("flux", "warm", "fp8", "sd"))
    parser.add_argument("--cache", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--attention", choices=("cudnn",), default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args.cache.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    r: dict[str, Any] = {"mode": args.mode, **env()}
    global _PARTIAL
    _PARTIAL = (args.out / f"{args.mode}.json", r)
    ok = False
    try:
        ok = {"flux": run_flux, "warm": run_warm, "fp8": run_fp8, "sd": run_sd}[args.mode](args, r)
    except Exception as e:
        logger.exception("mode %s failed", args.mode)
        r["error"] = repr(e)
    finally:
        r["ok"] = ok
        (args.out / f"{args.mode}.json").write_text(json.dumps(r, indent=1, default=str))
        print(table(r))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
