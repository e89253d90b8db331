"""LoRA on the torch backend: images equal diffusers' with the same adapters and scales (float32, CPU, tiny
models, <= 2e-3 on output_type="np"), for LoRA files in diffusers/PEFT and kohya/A1111 format; weights are
updated in place (the module tree and parameters stay the ones compiled code holds); bad input is a LoraError.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from lora_files import FAMILIES, make_loras
from safetensors.torch import load_file, save_file

from pipeline import LoraError, Pipeline
from pipeline.lora import Restore, parse_lora_spec

TOLERANCE = 2e-3


@pytest.fixture(scope="module", params=list(FAMILIES))
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    family = request.param
    folder = request.getfixturevalue(FAMILIES[family][0])
    return {
        "family": family,
        "folder": folder,
        "loras": make_loras(folder, tmp_path_factory.mktemp("lora"), family),
    }


def ours(folder: Path, tmp_path: Path, dtype: torch.dtype = torch.float32, **options) -> Pipeline:
    pipe = Pipeline.from_pretrained(
        folder, backend="torch", device="cpu", dtype=dtype, cache_dir=tmp_path, **options
    )
    pipe.progress = False
    return pipe


def theirs(case: dict):
    cls = FAMILIES[case["family"]][1]
    extra = (
        {"safety_checker": None, "requires_safety_checker": False} if cls is StableDiffusionPipeline else {}
    )
    pipe = cls.from_pretrained(case["folder"], torch_dtype=torch.float32, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def image(pipe, case: dict) -> np.ndarray:
    kwargs = {
        "height": 32,
        "width": 48,
        "num_inference_steps": 2,
        "output_type": "np",
        **FAMILIES[case["family"]][3],
    }
    return pipe("a red fox", generator=torch.Generator().manual_seed(7), **kwargs).images


def test_kohya_files_are_named_as_kohya_names_them(case: dict) -> None:
    keys = load_file(case["loras"]["kohya"]).keys()
    unet = {k.split(".")[0] for k in keys if k.startswith("lora_unet_")}
    assert unet and all(f"{k}.lora_down.weight" in keys and f"{k}.alpha" in keys for k in unet)
    te = "lora_te1_" if case["family"] == "flux" else "lora_te_"
    assert any(k.startswith(f"{te}text_model_encoder_layers_0_self_attn_q_proj.") for k in keys)
    if case["family"] == "flux":  # one LoRA over the fused BFL projection, split by diffusers' converter
        assert "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight" in keys


def test_images_equal_diffusers_with_the_same_adapters(case: dict, tmp_path: Path) -> None:
    pipe, ref = ours(case["folder"], tmp_path), theirs(case)
    plain = image(pipe, case)
    peft, kohya = case["loras"]["peft"], case["loras"]["kohya"]

    # one adapter (diffusers/PEFT format, with text encoder layers)
    assert pipe.load_lora_weights(peft, adapter_name="peft") == "peft"
    ref.load_lora_weights(str(peft), adapter_name="peft")
    one = image(pipe, case)
    assert np.abs(one - image(ref, case)).max() <= TOLERANCE
    assert np.abs(one - plain).max() > 0.05  # the LoRA really changes the image

    # a second adapter (kohya format) becomes the only active one, as in diffusers
    pipe.load_lora_weights(kohya, adapter_name="kohya")
    ref.load_lora_weights(str(kohya), adapter_name="kohya")
    assert pipe.get_active_adapters() == ref.get_active_adapters() == ["kohya"]
    assert np.abs(image(pipe, case) - image(ref, case)).max() <= TOLERANCE

    # two adapters mixed
    pipe.set_adapters(["peft", "kohya"], adapter_weights=[0.7, 0.4])
    ref.set_adapters(["peft", "kohya"], adapter_weights=[0.7, 0.4])
    mixed = image(pipe, case)
    assert np.abs(mixed - image(ref, case)).max() <= TOLERANCE

    # a scale change
    pipe.set_adapters(["peft", "kohya"], adapter_weights=[0.2, 1.3])
    ref.set_adapters(["peft", "kohya"], adapter_weights=[0.2, 1.3])
    rescaled = image(pipe, case)
    assert np.abs(rescaled - image(ref, case)).max() <= TOLERANCE
    assert np.abs(rescaled - mixed).max() > 0.01

    # unload: the model's own image again
    pipe.unload_lora_weights()
    ref.unload_lora_weights()
    assert pipe.get_active_adapters() == []
    assert np.array_equal(image(pipe, case), plain)
    assert np.abs(image(ref, case) - plain).max() <= TOLERANCE


def test_fused_qkv_projections_take_their_rows(case: dict, tmp_path: Path) -> None:
    """The torch backend fuses q/k/v (to_qkv, to_added_qkv, to_kv) and drops the separate layers: a to_q
    LoRA goes to to_qkv's first rows."""
    pipe, ref = ours(case["folder"], tmp_path), theirs(case)
    denoiser = pipe.backend.modules[FAMILIES[case["family"]][2]]
    fused = [m for m in denoiser.modules() if getattr(m, "fused_projections", False)]
    assert fused and not any(hasattr(m, "to_k") for m in fused)
    for name in ("peft", "kohya"):
        pipe.load_lora_weights(case["loras"][name], adapter_name=name)
        ref.load_lora_weights(str(case["loras"][name]), adapter_name=name)
    pipe.set_adapters(["peft", "kohya"], [0.8, 0.6])
    ref.set_adapters(["peft", "kohya"], [0.8, 0.6])
    assert np.abs(image(pipe, case) - image(ref, case)).max() <= TOLERANCE


def _tree(module: torch.nn.Module) -> list[tuple]:
    return [(n, type(m).__name__) for n, m in module.named_modules()]


def _params(module: torch.nn.Module) -> list[tuple]:
    return [(n, id(p), p.data_ptr(), tuple(p.shape), p.dtype) for n, p in module.named_parameters()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_weights_change_in_place_and_come_back(case: dict, tmp_path: Path, dtype: torch.dtype) -> None:
    """Same modules, same parameter tensors and storage while adapters switch; W0 exactly after unload with
    Restore.COPY; with Restore.SUBTRACT within one rounding (of the dtype, at the weight's magnitudes)."""
    denoiser = FAMILIES[case["family"]][2]
    for restore in Restore:
        pipe = ours(case["folder"], tmp_path, dtype)
        pipe.lora.restore = restore
        modules = pipe.backend.modules
        before = {c: (_tree(m), _params(m)) for c, m in modules.items()}
        w0 = {c: {n: p.clone() for n, p in m.named_parameters()} for c, m in modules.items()}
        pipe.load_lora_weights(case["loras"]["peft"], adapter_name="a")
        if restore is Restore.COPY:  # switches and mixes, then back
            pipe.load_lora_weights(case["loras"]["kohya"], adapter_name="b")
            pipe.set_adapters(["a", "b"], [0.5, 1.0])
        w1 = {c: {n: p.clone() for n, p in m.named_parameters()} for c, m in modules.items()}
        assert any(not torch.equal(w1[denoiser][n], w0[denoiser][n]) for n in w0[denoiser])
        pipe.unload_lora_weights()
        for component, module in modules.items():
            assert (_tree(module), _params(module)) == before[component]
            for name, p in module.named_parameters():
                a, b = w0[component][name].float(), w1[component][name].float()
                if restore is Restore.COPY:
                    assert torch.equal(p, w0[component][name]), name
                else:
                    step = torch.finfo(dtype).eps * torch.maximum(a.abs(), b.abs())
                    assert ((p.float() - a).abs() <= step).all(), name
        assert pipe.lora.store.kept_bytes == 0  # nothing kept once no adapter is loaded


def test_bad_input_is_a_lora_error(case: dict, tmp_path: Path) -> None:
    pipe = ours(case["folder"], tmp_path)
    peft = case["loras"]["peft"]
    with pytest.raises(LoraError, match="does not exist"):
        pipe.load_lora_weights(tmp_path / "missing.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoraError, match=r"no \.safetensors"):
        pipe.load_lora_weights(tmp_path / "empty")
    pickled = tmp_path / "lora.bin"
    pickled.write_bytes(b"x")
    with pytest.raises(LoraError, match=r"only \.safetensors"):
        pipe.load_lora_weights(pickled)
    with pytest.raises(LoraError, match="local hub cache"):
        pipe.load_lora_weights("adaptive-diffusion-tests/no-such-lora", local_files_only=True)
    pipe.load_lora_weights(peft, adapter_name="a")
    with pytest.raises(LoraError, match="already loaded"):
        pipe.load_lora_weights(peft, adapter_name="a")
    for weight in (float("nan"), -0.5, float("inf"), "abc"):
        with pytest.raises(LoraError, match="number >= 0"):
            pipe.set_adapters("a", weight)
    with pytest.raises(LoraError, match="no adapter 'b'"):
        pipe.set_adapters(["a", "b"])
    with pytest.raises(LoraError, match="2 adapter weights for 1"):
        pipe.set_adapters("a", [1.0, 2.0])


def test_a_lora_for_another_architecture_is_refused(tiny_flux: Path, tiny_sd: Path, tmp_path: Path) -> None:
    flux_lora = make_loras(tiny_flux, tmp_path, "flux")["peft"]
    sd_loras = make_loras(tiny_sd, tmp_path, "sd")
    with pytest.raises(LoraError, match="another architecture"):
        ours(tiny_sd, tmp_path).load_lora_weights(flux_lora)
    for lora in sd_loras.values():
        with pytest.raises(LoraError, match=r"another architecture|not a LoRA diffusers can read"):
            ours(tiny_flux, tmp_path).load_lora_weights(lora)
    # the right family, but made for a wider model: one layer's factors do not fit its weight
    state = load_file(sd_loras["kohya"])
    key = next(k for k in state if k.endswith("attn1_to_q.lora_down.weight"))
    state[key] = torch.zeros(state[key].shape[0], state[key].shape[1] * 2)
    wider = tmp_path / "wider.safetensors"
    save_file(state, str(wider))
    with pytest.raises(LoraError, match=r"does not fit .* another architecture"):
        ours(tiny_sd, tmp_path).load_lora_weights(wider)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("style.safetensors", ("style.safetensors", 1.0)),
        ("style.safetensors:0.8", ("style.safetensors", 0.8)),
        ("org/style:1.5", ("org/style", 1.5)),
        ("loras/style", ("loras/style", 1.0)),
    ],
)
def test_lora_spec(text: str, expected: tuple) -> None:
    assert parse_lora_spec(text) == expected


@pytest.mark.parametrize("text", ["x.safetensors:abc", "x.safetensors:-1", "x.safetensors:nan", ":0.5"])
def test_bad_lora_spec(text: str) -> None:
    with pytest.raises(LoraError):
        parse_lora_spec(text)


def test_describe_names_file_hash_and_scale(case: dict, tmp_path: Path) -> None:
    import hashlib

    pipe = ours(case["folder"], tmp_path)
    pipe.load_lora_weights(case["loras"]["kohya"], adapter_name="k")
    pipe.set_adapters("k", 0.25)
    digest = hashlib.sha256(case["loras"]["kohya"].read_bytes()).hexdigest()
    assert json.loads(json.dumps(pipe.lora.describe())) == [
        {"name": "k", "file": case["loras"]["kohya"].name, "sha256": digest[:10], "scale": 0.25}
    ]


@pytest.mark.slow  # compiling tiny-flux on a CPU: ~45 s of CPU time
def test_switching_on_a_compiled_backend_compiles_nothing(tiny_flux: Path, tmp_path: Path) -> None:
    """compile=True: LoRA load, mix and scale changes give the eager pipeline's images, and no graph is
    compiled or recompiled for them."""
    from torch._dynamo.utils import counters

    case = {"family": "flux", "folder": tiny_flux, "loras": make_loras(tiny_flux, tmp_path, "flux")}
    compiled = ours(tiny_flux, tmp_path / "compiled", compile=True, specialization="none")
    eager = ours(tiny_flux, tmp_path / "eager")
    plain = image(compiled, case)  # compiles here

    def compiles() -> tuple:
        return counters["stats"]["unique_graphs"], sum(counters["recompiles"].values())

    before = compiles()
    assert before[0] > 0
    for pipe in (compiled, eager):
        pipe.load_lora_weights(case["loras"]["peft"], adapter_name="a")
        pipe.load_lora_weights(case["loras"]["kohya"], adapter_name="b")
    for weights in ([1.0, 0.0], [0.3, 0.9]):
        for pipe in (compiled, eager):
            pipe.set_adapters(["a", "b"], weights)
        switched = image(compiled, case)
        assert np.abs(switched - image(eager, case)).max() <= TOLERANCE
        assert np.abs(switched - plain).max() > 0.05
    compiled.unload_lora_weights()
    assert np.abs(image(compiled, case) - plain).max() <= 1e-6
    assert compiles() == before
