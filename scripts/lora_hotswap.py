"""diffusers' LoRA hot-swap against weights merged in place (ours), measured on one device (issue 14).

    python scripts/lora_hotswap.py [--device cpu|cuda] [--model tiny-flux] [--blocks 1,2] [--tokens 256]
                                   [--rank 16] [--json OUT.json]

swap: one model, two pipelines on the same random weights. diffusers: FluxPipeline with
  `enable_lora_hotswap(target_rank=...)`, LoRA A (rank r/2) loaded, `compile_repeated_blocks(fullgraph=True)`,
  then `load_lora_weights(B, hotswap=True, adapter_name=...)` (B has rank r). Ours: compile=True,
  load A, then load B and a scale change. For each: swap seconds, the call after the swap, a steady call,
  and the graphs dynamo compiled or recompiled meanwhile. Transformer LoRAs only: diffusers cannot
  hot-swap text-encoder adapters.
overhead: a FLUX.1-dev-width transformer with BLOCKS (double,single) blocks, one forward at TOKENS image
  tokens: no LoRA, the LoRA merged (what ours runs), the LoRA as peft layers (what hot-swap runs: the adapter
  stays unmerged, two extra rank-r products per layer and step).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from pipeline import Pipeline
from pipeline.loading import resolve_model
from pipeline.lora import InPlaceWeights, read_factors, resolve_lora, skeleton
from pipeline.random_lora import random_lora

TARGETS = {"transformer": (r".*attn\.(to_q|to_k|to_v|to_out\.0)$", r".*ff\.net\.(0\.proj|2)$")}


def graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"]) + int(sum(counters["recompiles"].values()))


def timed(fn: Any, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def swap(args: argparse.Namespace, files: dict[str, Path]) -> dict[str, Any]:
    from diffusers import FluxPipeline

    device = torch.device(args.device)
    ours = Pipeline.from_pretrained(
        args.model, backend="torch", device=device, dtype=torch.float32, compile=True
    )
    ours.progress = False
    source = ours.source
    parts = {c: source.load_component(c, torch.float32, device) for c in source.configs if c != "scheduler"}
    theirs = FluxPipeline(
        scheduler=source.scheduler,
        tokenizer=source.tokenizer("tokenizer"),
        tokenizer_2=source.tokenizer("tokenizer_2"),
        **parts,
    )
    theirs.set_progress_bar_config(disable=True)
    call = {"prompt": "a fox", "height": 64, "width": 64, "num_inference_steps": 2, "output_type": "np"}

    def run(pipe: Any) -> None:
        pipe(generator=torch.Generator().manual_seed(0), **call)

    out: dict[str, Any] = {}
    theirs.enable_lora_hotswap(target_rank=args.rank)
    theirs.load_lora_weights(str(files["a"]), adapter_name="x")
    theirs.transformer.compile_repeated_blocks(fullgraph=True)
    first = timed(lambda: run(theirs), device)
    g = graphs()
    swap_s = timed(lambda: theirs.load_lora_weights(str(files["b"]), adapter_name="x", hotswap=True), device)
    after = timed(lambda: run(theirs), device)
    steady = statistics.median(timed(lambda: run(theirs), device) for _ in range(args.iterations))
    out["diffusers_hotswap"] = {
        "first_call_s": first,
        "swap_s": swap_s,
        "call_after_swap_s": after,
        "steady_s": steady,
        "new_graphs": graphs() - g,
    }

    ours.load_lora_weights(files["a"], adapter_name="a")
    first = timed(lambda: run(ours), device)
    g = graphs()
    swap_s = timed(lambda: ours.load_lora_weights(files["b"], adapter_name="b"), device)
    after = timed(lambda: run(ours), device)
    scale_s = timed(lambda: ours.set_adapters(["a", "b"], [0.5, 0.8]), device)
    steady = statistics.median(timed(lambda: run(ours), device) for _ in range(args.iterations))
    out["ours_in_place"] = {
        "first_call_s": first,
        "swap_s": swap_s,
        "call_after_swap_s": after,
        "scale_change_s": scale_s,
        "steady_s": steady,
        "new_graphs": graphs() - g,
    }
    return out


def overhead(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    from pipeline.architectures import make_architecture
    from pipeline.loading import read_model

    device = torch.device(args.device)
    arch = make_architecture("flux-dev", folder / "flux-dev-cut")  # FLUX.1-dev's configs, fewer blocks
    config_file = arch / "transformer" / "config.json"
    config = json.loads(config_file.read_text())
    double, single = (int(x) for x in args.blocks.split(","))
    config.update(num_layers=double, num_single_layers=single)
    config_file.write_text(json.dumps(config))
    source = read_model(arch)
    model = source.load_component("transformer", torch.float32, device)
    shapes = {"transformer": model}
    lora = random_lora(shapes, folder / "wide.safetensors", targets=TARGETS, rank=args.rank, std=0.01)
    text = 64
    x = {
        "hidden_states": torch.randn(1, args.tokens, config["in_channels"], device=device),
        "encoder_hidden_states": torch.randn(1, text, config["joint_attention_dim"], device=device),
        "pooled_projections": torch.randn(1, config["pooled_projection_dim"], device=device),
        "timestep": torch.tensor([0.5], device=device),
        "img_ids": torch.zeros(args.tokens, 3, device=device),
        "txt_ids": torch.zeros(text, 3, device=device),
        "guidance": torch.tensor([3.5], device=device),
    }

    @torch.inference_mode()
    def forward() -> None:
        model(**x, return_dict=False)

    def measure() -> tuple[float, float]:
        """(wall, CPU-time) seconds of one forward: CPU time is steadier on a shared machine."""
        wall, cpu = time.perf_counter(), time.process_time()
        forward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - wall, time.process_time() - cpu

    out: dict[str, Any] = {
        "config": {"double_blocks": double, "single_blocks": single, "tokens": args.tokens, "rank": args.rank}
    }
    forward()
    plain = [measure() for _ in range(args.iterations)]
    store = InPlaceWeights({"transformer": model})
    factors = read_factors(resolve_lora(lora), source, store)
    start = time.perf_counter()
    store.write({f.site.key: [(f, f.scaling)] for f in factors})
    out["merge_s"] = time.perf_counter() - start
    store.write({f.site.key: [] for f in factors})
    model.load_lora_adapter(str(lora), prefix="transformer", adapter_name="a")  # diffusers: peft layers
    merged, unmerged = [], []
    for _ in range(args.iterations):  # interleaved, so load changes on the machine hit both alike
        unmerged.append(measure())
        model.fuse_lora(adapter_names=["a"])  # peft merges into the weights: what ours runs
        merged.append(measure())
        model.unfuse_lora()
    for name, runs in (("no_lora", plain), ("merged", merged), ("peft_unmerged", unmerged)):
        out[f"{name}_s"] = statistics.median(w for w, _ in runs)
        out[f"{name}_cpu_s"] = statistics.median(c for _, c in runs)
    out["unmerged_vs_merged_cpu"] = out["peft_unmerged_cpu_s"] / out["merged_cpu_s"]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default="tiny-flux")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--blocks", default="1,2", help="double,single blocks of the FLUX-width transformer")
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--iterations", type=int, default=3)
    p.add_argument("--sections", nargs="+", default=["swap", "overhead"], choices=["swap", "overhead"])
    p.add_argument("--json", type=Path, default=Path("lora_hotswap.json"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    folder = Path(tempfile.mkdtemp(prefix="lora-hotswap-"))
    result: dict[str, Any] = {"device": args.device, "torch": torch.__version__}
    if "swap" in args.sections:
        shapes = {"transformer": skeleton(resolve_model(args.model), "transformer")}
        files = {
            n: random_lora(shapes, folder / f"{n}.safetensors", targets=TARGETS, rank=r, seed=i)
            for i, (n, r) in enumerate((("a", max(args.rank // 2, 1)), ("b", args.rank)))
        }
        result["swap"] = swap(args, files)
    if "overhead" in args.sections:
        result["overhead"] = overhead(args, folder)
    args.json.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
