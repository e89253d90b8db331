"""Export a real-size denoiser to ONNX (random weights built from its config, no download) and measure it.

    python scripts/export_real.py --model sd15                  # SD 1.5 UNet, 860 M parameters, CPU, fp32
    python scripts/export_real.py --model flux-dev              # FLUX.1-dev transformer, 12 B, CUDA, bf16
    python scripts/export_real.py --model flux-dev --dry-run    # build on the meta device, check shapes only
    python scripts/export_real.py --model flux-dev --dtype fp32 --layers 2,2 --check
                                        # real widths, fewer blocks: onnxruntime (CPU) against torch

The architectures come from `pipeline.architectures` (the published configs); the export is the project's
own `export.export_stage`, so this measures exactly what `python -m export` does at that size. Weights of
2 GB or more go to `<stage>.onnx.data`. Prints one JSON line with wall time, peak RSS (and peak CUDA memory),
file sizes and library versions.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import shutil
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any

import torch

from pipeline.export import export_stage
from pipeline.export.onnx_export import StageModule, library_versions, trace_dims
from pipeline.families import family_for
from pipeline.loading import ModelSource, read_model, resolve_model
from pipeline.options import DTYPES, dtype_name

logger = logging.getLogger("export.real")

DEFAULTS = {"sd15": ("fp32", "cpu"), "flux-dev": ("bf16", "cuda")}


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def dry_run(source: ModelSource, stage: str, dtype: torch.dtype) -> dict[str, Any]:
    """Build the stage on the meta device (no memory for weights) and check its outputs against the spec."""
    import diffusers

    family = family_for(source)
    spec = family.stages[stage]
    _, cls = source.component_class(spec.component)
    module_cls = getattr(diffusers, cls)
    with torch.device("meta"):
        module = module_cls.from_config(module_cls.load_config(source.path / spec.component)).to(dtype)
    params = sum(p.numel() for p in module.parameters())
    dims = trace_dims(family)
    inputs = spec.example_inputs(dims, dtype, device="meta")
    with torch.no_grad():
        outputs = StageModule(spec, module.eval())(*(inputs[n] for n in spec.input_names))
    for t, out in zip(spec.outputs, outputs, strict=True):
        if tuple(out.shape) != t.concrete(dims):
            raise RuntimeError(f"{stage}.{t.name}: got {tuple(out.shape)}, spec says {t.concrete(dims)}")
    return {
        "parameters": params,
        "trace_dims": dims,
        "outputs": {t.name: list(o.shape) for t, o in zip(spec.outputs, outputs, strict=True)},
    }


def fewer_layers(source: ModelSource, layers: str, folder: Path) -> ModelSource:
    """A copy of a FLUX model folder whose transformer has "double,single" blocks."""
    double, single = (int(n) for n in layers.split(","))
    copy = folder / f"{source.path.name}-layers-{double}-{single}"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(source.path, copy)
    config_file = copy / "transformer" / "config.json"
    config = json.loads(config_file.read_text())
    config.update(num_layers=double, num_single_layers=single)
    config_file.write_text(json.dumps(config, indent=2))
    return read_model(copy, model_id=f"{source.model_id} ({double}+{single} blocks)")


def check(source: ModelSource, stage: str, onnx_path: Path, device: str) -> dict[str, Any]:
    """onnxruntime (CPU) against the torch module (fp32, on `device`) at the trace dims and at other dims."""
    import numpy as np
    import onnxruntime as ort

    family = family_for(source)
    spec = family.stages[stage]
    module = source.load_component(spec.component, torch.float32, device)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    errors = {}
    for i, dims in enumerate((trace_dims(family), family.dims(512, 768, 1))):
        inputs = spec.example_inputs(dims, torch.float32, device, generator=torch.Generator().manual_seed(i))
        with torch.no_grad():
            want = spec.forward(module, inputs)[spec.output_names[0]].float().cpu().numpy()
        (got,) = session.run(spec.output_names[:1], {k: v.cpu().numpy() for k, v in inputs.items()})
        key = ",".join(f"{k}={v}" for k, v in dims.items() if k in spec.dim_names)
        errors[key] = float(np.abs(got - want).max() / np.abs(want).max())
    return {"check_rel_error": errors}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=sorted(DEFAULTS), default="sd15")
    parser.add_argument("--out", type=Path, default=None, help="default /tmp/export-real/<model>-<dtype>")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default=None, help="default fp32 (sd15), bf16 (flux)"
    )
    parser.add_argument("--device", default=None, help="default cpu (sd15), cuda (flux-dev)")
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/export-real"))
    parser.add_argument("--force", action="store_true")
    parser.add_argument("--dry-run", action="store_true", help="meta device: check the path, write nothing")
    parser.add_argument("--layers", default=None, help="FLUX only: DOUBLE,SINGLE blocks instead of 19,38")
    parser.add_argument("--check", action="store_true", help="fp32 only: compare onnxruntime with torch")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("export", "pipeline"):
        logging.getLogger(name).setLevel(logging.INFO)

    dtype_arg, device_arg = DEFAULTS[args.model]
    dtype = DTYPES[args.dtype or dtype_arg]
    device = args.device or device_arg
    if args.check and dtype != torch.float32:
        parser.error("--check needs --dtype fp32 (onnxruntime on CPU)")
    if args.layers and args.model != "flux-dev":
        parser.error("--layers is for flux-dev (double and single transformer blocks)")
    source = resolve_model(args.model, cache_dir=args.cache_dir)
    if args.layers:
        source = fewer_layers(source, args.layers, args.cache_dir)
    stage = family_for(source).denoiser
    report: dict[str, Any] = {
        "model": source.model_id,
        "stage": stage,
        "dtype": dtype_name(dtype),
        "device": device,
        "date": date.today().isoformat(),
        "python": platform.python_version(),
        "versions": library_versions(),
    }
    start = time.perf_counter()
    if args.dry_run:
        report.update(dry_run(source, stage, dtype), device="meta", mode="dry-run")
    else:
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            report["gpu"] = torch.cuda.get_device_name()
        out = args.out or Path("/tmp/export-real") / f"{args.model}-{report['dtype']}"
        path = export_stage(source, stage, out, dtype=dtype, device=device, force=args.force)
        data = path.with_name(path.name + ".data")
        report["onnx"] = str(path)
        report["onnx_bytes"] = path.stat().st_size
        report["data_bytes"] = data.stat().st_size if data.exists() else 0
        if device.startswith("cuda"):
            report["peak_cuda_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
    report["wall_s"] = round(time.perf_counter() - start, 1)
    if args.check and not args.dry_run:
        report.update(check(source, stage, path, device))
    report["peak_rss_gb"] = round(peak_rss_gb(), 2)
    report["cpus"] = len(os.sched_getaffinity(0))
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
