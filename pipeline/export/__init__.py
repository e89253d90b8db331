"""ONNX export of each pipeline stage (`python -m export MODEL --out DIR`), read by the engine builders."""

from ..options import DTYPES
from .manifest import MANIFEST, read_manifest
from .onnx_export import (
    DEFAULT_OPSET,
    StageModule,
    export_model,
    export_stage,
    onnx_output_names,
    trace_dims,
)

__all__ = [
    "DEFAULT_OPSET",
    "DTYPES",
    "MANIFEST",
    "StageModule",
    "export_model",
    "export_stage",
    "onnx_output_names",
    "read_manifest",
    "trace_dims",
]
