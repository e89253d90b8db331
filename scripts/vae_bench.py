"""VAE decode on CUDA: torch's GroupNorm against engines/group_norm.py's, NCHW against channels-last.

    python scripts/vae_bench.py        (writes $OUT/vae_gn.json, or /tmp/vae_gn.json; random weights)

The figures in the README's torch-backend section (docs/h200/vae_group_norm.json) come from this script.
"""

import copy
import json
import os
import time

import torch
from diffusers import AutoencoderKL

from pipeline.architectures import _VAE
from pipeline.engines.group_norm import widen_group_norms


def main() -> None:
    res = {}
    for label, cfg, dtype, lat in (
        (
            "flux_1024_bf16",
            dict(_VAE, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False),
            torch.bfloat16,
            (1, 16, 128, 128),
        ),
        ("sd_512_fp16", dict(_VAE, latent_channels=4), torch.float16, (1, 4, 64, 64)),
        ("sdxl_1024_fp32", dict(_VAE, latent_channels=4), torch.float32, (1, 4, 128, 128)),
    ):
        torch.manual_seed(0)
        base = AutoencoderKL(**cfg).to("cuda", dtype).eval()
        z = torch.randn(*lat, device="cuda", dtype=dtype)
        ref = None
        for variant in ("torch_nchw", "torch_cl", "wide_nchw", "wide_cl"):
            v = copy.deepcopy(base)
            if variant.startswith("wide"):
                widen_group_norms(v)
            if variant.endswith("cl"):
                v = v.to(memory_format=torch.channels_last)
            times = []
            with torch.inference_mode():
                for _ in range(7):
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    out = v.decode(z).sample
                    torch.cuda.synchronize()
                    times.append(time.perf_counter() - t0)
            out = out.float()
            if ref is None:
                ref = out
            ms = sorted(times[2:])[2] * 1e3
            res[f"{label}_{variant}"] = {
                "ms": round(ms, 2),
                "max_diff": float((out - ref).abs().max()),
                "rel_l2": float((out - ref).norm() / ref.norm()),
            }
            print(label, variant, res[f"{label}_{variant}"], flush=True)
            del v
        del base
    json.dump(res, open(os.path.join(os.environ.get("OUT", "/tmp"), "vae_gn.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
