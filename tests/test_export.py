"""ONNX export: every stage of the tiny families matches its torch module in onnxruntime at several shapes;
re-runs skip, --force re-exports, an interrupted export leaves nothing a later run trusts, bad input exits 2."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from pipeline.export import MANIFEST, export_model, export_stage, onnx_output_names, read_manifest
from pipeline.export.cli import main
from pipeline.export.engine_meta import external_data_files
from pipeline.families import Family, family_for
from pipeline.loading import ModelSource, read_model

STAGES = [
    ("flux", "text_encoder"),
    ("flux", "text_encoder_2"),
    ("flux", "transformer"),
    ("flux", "vae_decoder"),
    ("sd", "text_encoder"),
    ("sd", "unet"),
    ("sd", "vae_decoder"),
    ("sdxl", "text_encoder"),
    ("sdxl", "text_encoder_2"),
    ("sdxl", "unet"),
    ("sdxl", "vae_decoder"),
]


@dataclass
class Exported:
    source: ModelSource
    family: Family
    out: Path
    paths: dict[str, Path]


def _export(folder: Path, out: Path) -> Exported:
    source = read_model(folder)
    return Exported(source, family_for(source), out, export_model(source, out))


@pytest.fixture(scope="module")
def exported(
    tiny_flux: Path, tiny_sd: Path, tiny_sdxl: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Exported]:
    """Every stage of the tiny families, exported once for the whole module (fp32)."""
    return {
        "flux": _export(tiny_flux, tmp_path_factory.mktemp("onnx-flux")),
        "sd": _export(tiny_sd, tmp_path_factory.mktemp("onnx-sd")),
        "sdxl": _export(tiny_sdxl, tmp_path_factory.mktemp("onnx-sdxl")),
    }


def _shapes(family: Family) -> list[dict[str, int]]:
    """Two requests unlike the traced one and unlike each other: batch, height, width and text all differ."""
    u = family.granularity * 4
    shapes = []
    for batch, height, width, text in ((1, 2 * u, 3 * u, 7), (3, 4 * u, 2 * u, 33)):
        dims = family.dims(height, width, batch)
        if "text_tokens" in dims:
            dims["text_tokens"] = text
        shapes.append(dims)
    return shapes


def _rel_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-12))


def _assert_matches_torch(ex: Exported, stage: str, onnx_path: Path) -> None:
    """onnxruntime against the torch module, every output, at the two shapes of `_shapes`."""
    spec = ex.family.stages[stage]
    module = ex.source.load_component(spec.component, torch.float32)
    vocab = getattr(getattr(module, "config", None), "vocab_size", 100)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == spec.input_names
    assert [o.name for o in session.get_outputs()] == onnx_output_names(spec)
    for i, dims in enumerate(_shapes(ex.family)):
        inputs = spec.example_inputs(
            dims, torch.float32, generator=torch.Generator().manual_seed(i), int_high=min(vocab, 100)
        )
        with torch.no_grad():
            expected = spec.forward(module, inputs)
        actual = session.run(None, {k: v.numpy() for k, v in inputs.items()})
        for t, got in zip(spec.outputs, actual, strict=True):
            want = expected[t.name].numpy()
            assert got.shape == want.shape == t.concrete(dims)
            assert _rel_error(got, want) <= 1e-4, f"{stage}.{t.name} at {dims}"


@pytest.mark.parametrize(("family_name", "stage"), STAGES, ids=[f"{f}-{s}" for f, s in STAGES])
def test_onnxruntime_matches_torch(exported: dict[str, Exported], family_name: str, stage: str) -> None:
    ex = exported[family_name]
    _assert_matches_torch(ex, stage, ex.paths[stage])


@pytest.mark.parametrize(("family_name", "stage"), STAGES, ids=[f"{f}-{s}" for f, s in STAGES])
def test_graph_and_manifest_follow_the_spec(
    exported: dict[str, Exported], family_name: str, stage: str
) -> None:
    ex = exported[family_name]
    spec = ex.family.stages[stage]
    graph = onnx.load(ex.paths[stage], load_external_data=False).graph

    def dims(value: onnx.ValueInfoProto) -> list[int | str]:
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    assert [dims(v) for v in graph.input] == [list(t.shape) for t in spec.inputs]
    assert [dims(v) for v in graph.output] == [list(t.shape) for t in spec.outputs]
    entry = read_manifest(ex.out)[stage]
    assert entry["file"] == f"{stage}.onnx"
    assert entry["external_data"] is None
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in graph.initializer)
    assert not (ex.out / f"{stage}.onnx.data").exists()
    assert [t["name"] for t in entry["inputs"]] == spec.input_names
    assert [t["shape"] for t in entry["outputs"]] == [list(t.shape) for t in spec.outputs]
    assert entry["source_hash"] == ex.source.content_hash
    assert entry["dtype"] == "fp32"
    assert {"torch", "diffusers", "transformers", "onnx"} <= set(entry["versions"])


def test_weights_over_the_threshold_go_to_external_data(
    exported: dict[str, Exported], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The export's own threshold decides the layout, and the manifest describes exactly what was written."""
    monkeypatch.setattr("pipeline.export.onnx_export.EXTERNAL_DATA_THRESHOLD", 1)
    ex = exported["sd"]
    path = export_stage(ex.source, "vae_decoder", tmp_path)
    entry = read_manifest(tmp_path)["vae_decoder"]
    data = tmp_path / "vae_decoder.onnx.data"
    assert entry["external_data"] == data.name and entry["data_size"] == data.stat().st_size > 0
    assert external_data_files(onnx.load(path, load_external_data=False)) == [data.name]
    written = {p.name for p in tmp_path.iterdir() if not p.name.startswith(".") and p.suffix != ".lock"}
    assert written == {MANIFEST, "vae_decoder.onnx", data.name}
    _assert_matches_torch(ex, "vae_decoder", path)


def test_fp16_export_keeps_an_upcast_vae_in_float32(exported: dict[str, Exported], tmp_path: Path) -> None:
    """The family decides a stage's dtype (SDXL's VAE: float32 under fp16, its config says force_upcast);
    an SD VAE follows the requested dtype."""
    elem = {onnx.TensorProto.FLOAT: "fp32", onnx.TensorProto.FLOAT16: "fp16"}
    for name, want in (("sdxl", "fp32"), ("sd", "fp16")):
        out = tmp_path / name
        path = export_stage(exported[name].source, "vae_decoder", out, dtype=torch.float16)
        graph = onnx.load(path, load_external_data=False).graph
        assert [elem[v.type.tensor_type.elem_type] for v in (*graph.input, *graph.output)] == [want, want]
        entry = read_manifest(out)["vae_decoder"]
        assert entry["dtype"] == want
        assert entry["inputs"][0]["dtype"] == {"fp32": "float32", "fp16": "float16"}[want]


def _snapshot(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def test_rerun_skips_every_stage(exported: dict[str, Exported], caplog: pytest.LogCaptureFixture) -> None:
    ex = exported["flux"]
    manifest = (ex.out / MANIFEST).read_bytes()
    before = _snapshot(ex.out)
    with caplog.at_level(logging.INFO, logger="pipeline.export"):
        paths = export_model(ex.source, ex.out)
    assert paths == ex.paths
    assert (ex.out / MANIFEST).read_bytes() == manifest
    assert _snapshot(ex.out) == before
    skipped = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert len(skipped) == len(ex.family.stages)


def test_force_reexports(exported: dict[str, Exported], tmp_path: Path) -> None:
    ex = exported["flux"]
    out = shutil.copytree(ex.out, tmp_path / "onnx")
    before = _snapshot(out)
    export_stage(ex.source, "text_encoder_2", out, force=True)
    after = _snapshot(out)
    assert after["text_encoder_2.onnx"] != before["text_encoder_2.onnx"]
    assert after["transformer.onnx"] == before["transformer.onnx"]
    assert read_manifest(out)["text_encoder_2"]["sha256"]


def test_interrupted_export_leaves_nothing_trusted(
    exported: dict[str, Exported], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ex = exported["flux"]
    out = shutil.copytree(ex.out, tmp_path / "onnx")
    real_replace = os.replace

    def dies_on_onnx(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        if str(dst).endswith(".onnx"):
            raise OSError("simulated crash while moving the ONNX file into place")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", dies_on_onnx)
    with pytest.raises(OSError, match="simulated crash"):
        export_stage(ex.source, "text_encoder_2", out, force=True)
    monkeypatch.undo()

    stages = read_manifest(out)
    assert "text_encoder_2" not in stages  # the old entry no longer vouches for the stage
    assert set(stages) == set(ex.family.stages) - {"text_encoder_2"}
    assert not [p for p in out.iterdir() if p.name.startswith(".text_encoder_2.")]  # temp files removed
    # the next run exports the stage again instead of trusting what is there
    mtime = (out / "text_encoder_2.onnx").stat().st_mtime_ns
    export_stage(ex.source, "text_encoder_2", out)
    assert (out / "text_encoder_2.onnx").stat().st_mtime_ns != mtime
    assert read_manifest(out)["text_encoder_2"]["sha256"]


def test_cli_exports_and_skips(exported: dict[str, Exported], capsys: pytest.CaptureFixture[str]) -> None:
    ex = exported["sd"]
    assert main([str(ex.source.path), "--out", str(ex.out), "--stages", "unet,vae_decoder"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [f"unet: {ex.paths['unet']}", f"vae_decoder: {ex.paths['vae_decoder']}"]
    assert not list(ex.out.glob("*.lock"))  # the lock that guarded the export is gone with it


def _unsupported_model(folder: Path) -> Path:
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyV22Pipeline"}))
    return folder


@pytest.mark.parametrize(
    "case",
    [
        "unknown-stage",
        "unsupported-family",
        "unwritable-out",
        "missing-model",
        "bad-device",
        "bad-targets",
        "bad-size",
    ],
)
def test_cli_bad_input_is_one_line_exit_2(
    tiny_sd: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    model, out, extra = str(tiny_sd), tmp_path / "out", []
    if case == "unknown-stage":
        extra = ["--stages", "unet,transformer"]
    elif case == "bad-device":
        extra = ["--device", "cuda" if not torch.cuda.is_available() else "tpu:0"]
    elif case == "bad-targets":  # refused before anything is exported, not after
        extra = ["--engines", "--targets", "sm86,sm99"]
    elif case == "bad-size":
        extra = ["--engines", "--min-size", "500x500"]  # not a multiple of 8
    elif case == "unsupported-family":
        model = str(_unsupported_model(tmp_path / "kandinsky"))
    elif case == "unwritable-out":
        (tmp_path / "file").write_text("not a folder")
        out = tmp_path / "file" / "out"
    else:
        model = str(tmp_path / "no" / "such" / "model")
    assert main([model, "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert not (out / MANIFEST).exists()
    assert not out.is_dir() or sorted(p.name for p in out.iterdir()) == []  # no ONNX, no stray lock file


def test_cli_process_exit_code(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "export", str(tmp_path / "missing"), "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: ") and "Traceback" not in result.stderr


class _FusedRmsNorm(torch.nn.Module):
    """Calls the op FLUX's RMSNorm becomes when traced on CUDA (a plain CPU trace never emits it)."""

    def __init__(self, normalized_shape: list[int], weight: bool, eps: float | None) -> None:
        super().__init__()
        self.normalized_shape = normalized_shape
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.rand(normalized_shape) + 0.5) if weight else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = torch.ops.aten._fused_rms_norm(x, self.normalized_shape, self.weight, self.eps)
        return out


@pytest.mark.parametrize(
    ("dtype", "normalized_shape", "weight", "eps"),
    [
        (torch.float32, [16], True, 1e-6),
        (torch.float32, [4, 16], False, None),
        (torch.float16, [16], True, 1e-5),
    ],
)
def test_fused_rms_norm_translation(
    dtype: torch.dtype, normalized_shape: list[int], weight: bool, eps: float | None
) -> None:
    from pipeline.export.translations import custom_translations

    module = _FusedRmsNorm(normalized_shape, weight, eps).to(dtype).eval()
    x = torch.randn(2, 3, 4, 16, dtype=dtype) * 3
    batch = torch.export.Dim("batch", max=64)
    with torch.no_grad():
        program = torch.onnx.export(
            module,
            (x,),
            input_names=["x"],
            dynamic_shapes=({0: batch},),
            opset_version=20,
            dynamo=True,
            custom_translation_table=custom_translations(),
            verbose=False,
        )
    # The op reached the translator intact (not decomposed by torch first), so our function wrote its nodes.
    origins = [node.metadata_props.get("pkg.torch.onnx.fx_node", "") for node in program.model.graph]
    assert any("_fused_rms_norm" in origin for origin in origins)
    session = ort.InferenceSession(
        program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    for n in (2, 5):
        x = torch.randn(n, 3, 4, 16, dtype=dtype) * 3
        with torch.no_grad():
            expected = module(x).float().numpy()
        (actual,) = session.run(None, {"x": x.numpy()})
        assert actual.dtype == x.numpy().dtype
        assert _rel_error(actual.astype(np.float32), expected) <= (1e-5 if dtype == torch.float32 else 2e-3)
