"""ONNX translations for aten ops that some torch versions' exporters cannot translate.

`torch.onnx.export(dynamo=True)` keeps an op out of its decomposition pass when a translation for it is
registered, then calls that translation with the op's arguments (tensors as graph values, the rest as Python
values). Each function here writes the op out of primitive ONNX ops that every opset the exporter supports
(18 on) defines the same way.

- `aten._fused_rms_norm`: what `torch.nn.functional.rms_norm` (FLUX's RMSNorm) becomes when traced on CUDA.
  torch 2.11's exporter has neither a translation nor a decomposition for it, so exporting the FLUX
  transformer on a GPU stopped there; newer versions decompose it into the same arithmetic.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from onnxscript import ir
from onnxscript import opset18 as op

# torch's default when eps is None and the computation is in float32
_FLOAT32_EPS = float(torch.finfo(torch.float32).eps)


def fused_rms_norm(
    input: Any, normalized_shape: Sequence[int], weight: Any = None, eps: float | None = None
) -> tuple[Any, Any]:
    """aten._fused_rms_norm -> (output, rstd), computed in float32 as torch's kernel and decomposition do.

    rstd = 1 / sqrt(mean(x², over the last len(normalized_shape) dims) + eps); output = x · rstd · weight,
    cast back to the input's dtype; rstd stays float32.
    """
    axes = op.Constant(value_ints=[-1 - i for i in range(len(normalized_shape))])
    x = op.Cast(input, to=ir.DataType.FLOAT)
    mean_square = op.ReduceMean(op.Mul(x, x), axes, keepdims=1)
    epsilon = op.Constant(value_float=_FLOAT32_EPS if eps is None else float(eps))
    rstd = op.Reciprocal(op.Sqrt(op.Add(mean_square, epsilon)))
    out = op.Mul(x, rstd)
    if weight is not None:
        out = op.Mul(out, op.Cast(weight, to=ir.DataType.FLOAT))
    return op.CastLike(out, input), rstd


def custom_translations() -> dict[torch._ops.OpOverload, Callable[..., Any]]:
    """The table to pass as `torch.onnx.export(custom_translation_table=...)`."""
    return {torch.ops.aten._fused_rms_norm.default: fused_rms_norm}
