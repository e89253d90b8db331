"""The rtx memory plan: a pure function of the engines' metadata and a free-memory number, checked without a GPU.

The figures are FLUX.1-dev-like (a 23.8 GB bf16 transformer, a 9.5 GB T5); the refusal is tested with small
stated budgets.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pipeline.cache import cache_info
from pipeline.engines.memory import GB, RESERVE_BYTES, MemoryPlan, Residency
from pipeline.errors import InsufficientMemoryError


def _meta(
    precision: str, weights: float, activations: float, streams: bool = True, largest: float = 0.1
) -> dict:
    return {
        "precision": precision,
        "weight_bytes": int(weights * GB),
        "activation_bytes": int(activations * GB),
        "weight_streaming": streams,
        "largest_weight_bytes": int(largest * GB),
    }


def flux_plan(precision: str = "bf16", streams: bool = True, activations: float = 2.0) -> MemoryPlan:
    transformer = 23.8 if precision == "bf16" else 11.9
    return MemoryPlan.from_metadata(
        {
            "text_encoder": _meta("bf16", 0.25, 0.05, streams),
            "text_encoder_2": _meta("bf16", 9.5, 0.3, streams),
            "transformer": _meta(precision, transformer, activations, streams),
            "vae_decoder": _meta("bf16", 0.2, 1.5, streams),
        },
        denoiser="transformer",
        model="flux-dev",
    )


def test_a_plan_that_fits_keeps_everything_on_the_gpu() -> None:
    plan = flux_plan("fp8")
    placement = plan.check(free_bytes=int(40 * GB))
    assert placement.fits and not placement.streams
    assert placement.peak_bytes == pytest.approx((0.25 + 9.5 + 11.9 + 0.2 + 2.0) * GB + RESERVE_BYTES, abs=10)
    assert plan.groups == (("text_encoder", "text_encoder_2"), ("transformer",), ("vae_decoder",))


def test_one_activation_buffer_for_all_stages() -> None:
    assert flux_plan(activations=2.0).activation_bytes == int(2.0 * GB)  # the largest, not the sum


def test_a_small_budget_streams_the_denoisers_weights() -> None:
    placement = flux_plan("fp8").check(free_bytes=int(24 * GB), vram_budget=int(20 * GB))
    assert placement.fits and placement.streams
    assert 0 < placement.denoiser_budget < int(11.9 * GB)
    assert placement.peak_bytes <= int(20 * GB)


def test_a_plan_that_cannot_fit_is_refused_in_one_line_naming_the_fix() -> None:
    plan = flux_plan("bf16", streams=False)
    with pytest.raises(InsufficientMemoryError) as err:
        plan.check(free_bytes=int(24 * GB), vram_budget=int(16 * GB))
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("flux-dev needs at least 36.8 GB of GPU memory with these engines")
    assert "a --vram-budget of 16.0 GB" in message
    assert message.endswith(
        "build fp8 engines (python -m pipeline --build-engines --precision fp8) and use --low-vram (each stage's weights on the GPU only for its turn)"
    )


@pytest.mark.parametrize(
    ("plan", "budget", "fix"),
    [
        (flux_plan("bf16", streams=False), 30, ": build fp8 engines (python -m pipeline --build-engines --precision fp8)$"),
        (flux_plan("fp8", streams=False), 20, ": use --low-vram"),
        (flux_plan("fp8", streams=False), 14, ": rebuild the engines with weight streaming"),
        (flux_plan("fp8", streams=False), 13, ": rebuild the engines with weight streaming .* and use --low-vram"),
        (flux_plan("fp8", activations=9.0), 12, ": rebuild the engines with a smaller --max-size"),
    ],
)  # fmt: skip
def test_the_fix_is_the_first_change_that_fits(plan: MemoryPlan, budget: float, fix: str) -> None:
    with pytest.raises(InsufficientMemoryError, match=fix.replace("(", r"\(").replace(")", r"\)")):
        plan.check(free_bytes=int(40 * GB), vram_budget=int(budget * GB))


def test_low_vram_holds_one_stage_group_at_a_time() -> None:
    plan = flux_plan("fp8", streams=False)
    resident = plan.peak_bytes(Residency.RESIDENT)
    low = plan.peak_bytes(Residency.LOW_VRAM)
    assert resident - low == pytest.approx(
        (0.25 + 9.5 + 0.2) * GB, abs=10
    )  # only the transformer's 11.9 GB at the peak
    assert plan.check(free_bytes=int(15 * GB), residency=Residency.LOW_VRAM).fits


def test_a_budget_larger_than_free_memory_is_refused() -> None:
    with pytest.raises(
        InsufficientMemoryError, match=r"--vram-budget 30\.0 GB is more than the GPU has \(12\.0 GB free\)"
    ):
        flux_plan("fp8").check(free_bytes=int(12 * GB), vram_budget=int(30 * GB))


def test_plan_per_card_size() -> None:
    lines = flux_plan("fp8").lines()
    assert lines[1].startswith("text_encoder_2: bf16, weights 9.50 GB (streamable)")
    assert lines[-3] == "16 GB card: fits, --low-vram, peak 14.9 GB"  # rather than streaming 9 GB a step
    assert lines[-1] == "32 GB card: fits, all resident, peak 24.9 GB"


def test_refusal_from_real_engine_metadata(tiny_fp8: dict) -> None:
    engine = tiny_fp8["sd"]["engine"]
    meta = json.loads(engine.with_suffix(".json").read_text())
    plan = MemoryPlan.from_metadata({"unet": meta}, denoiser="unet", model="tiny-sd")
    assert plan.check(free_bytes=int(8 * GB)).fits
    with pytest.raises(InsufficientMemoryError, match=r"tiny-sd needs at least 1\.0 GB"):
        plan.check(free_bytes=int(0.5 * GB))  # a stated 0.5 GB GPU


def test_cache_info_shows_the_plan(tiny_fp8: dict, tmp_path: Path) -> None:
    engine = tiny_fp8["sd"]["engine"]
    folder = tmp_path / "tiny-sd-0123456789abcdef" / "engines" / "rtx-gpu" / "fp32-fp8"
    folder.mkdir(parents=True)
    for suffix in (".engine", ".json"):
        shutil.copy(engine.with_suffix(suffix), folder / f"unet{suffix}")
    report = cache_info(tmp_path, shipped_dir=tmp_path / "none", platform_keys=["rtx-gpu"])
    assert "engines [rtx-gpu/fp32-fp8]: 1 engine(s)" in report
    assert "memory plan:" in report and "unet: fp8, weights" in report and "16 GB card: fits" in report
