"""Passes over an exported ONNX graph (onnx_ir) before it is written: the spec's dim names on the outputs, a
graph optimization that stays linear in graph size, and contiguous initializers written lazily."""

from __future__ import annotations

import logging
from typing import Any

import onnx_ir as ir

from ..families import StageSpec

logger = logging.getLogger(__name__)


def rename_output_dims(program: Any, spec: StageSpec) -> None:
    """Give the graph outputs the spec's dim names (the exporter writes expressions like 8*latent_height)."""
    for value, t in zip(program.model.graph.outputs, spec.outputs, strict=True):
        if value.shape is None:
            continue
        dims = [ir.SymbolicDim(d) if isinstance(d, str) else d for d in t.shape]
        value.shape = ir.Shape(dims)


def optimize(model: Any) -> None:
    """onnxscript's default graph optimization, minus the rewrite rules with multi-output patterns.

    Same passes as `onnxscript.optimizer.optimize_ir` (inlining, constant folding, the default rewrite rules,
    dead-code removal, initializer deduplication, common-subexpression elimination). A rule whose pattern
    has several output nodes (SlicesSplit) is matched by enumerating every node of the graph for every
    candidate: quadratic in graph size, which kept FLUX.1-dev (~23 000 nodes) in the optimizer for over
    seven minutes. The rule only turns several Slices of one tensor into one Split.
    The pass list uses onnxscript internals (tested with 0.7); without them, its full optimizer runs instead.
    """
    import onnx_ir.passes.common as common
    import onnxscript
    from onnxscript import optimizer, rewriter

    try:
        from onnxscript.optimizer import _constant_folding

        default_rules = rewriter._DEFAULT_REWRITE_RULES
    except (ImportError, AttributeError):
        logger.warning(
            "onnxscript %s: using its full optimizer, which is slow on very large graphs",
            onnxscript.__version__,
        )
        optimizer.optimize_ir(model)
        return
    rules = [
        rule
        for rule in default_rules
        if getattr(getattr(rule, "_target_pattern", None), "has_single_output_node", True)
    ]
    passes = ir.passes.Sequential(
        common.InlinePass(),
        ir.passes.PassManager(
            [
                _constant_folding.FoldConstantsPass(
                    shape_inference=True,
                    input_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT,
                    output_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_OUTPUT_SIZE_LIMIT,
                ),
                rewriter.RewritePass(rules),
                common.RemoveUnusedNodesPass(),
                common.RemoveUnusedFunctionsPass(),
                common.RemoveUnusedOpsetsPass(),
            ],
            steps=2,
            early_stop=True,
        ),
        common.RemoveUnusedNodesPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.LiftSubgraphInitializersToMainGraphPass(),
        common.DeduplicateInitializersPass(),
        common.CommonSubexpressionEliminationPass(),
        common.OutputFixPass(),
        common.NameFixPass(),
    )
    passes(model)


def make_initializers_contiguous(model: Any) -> None:
    """Give every strided numpy initializer a contiguous copy, made when it is written, one at a time.

    The optimizer folds `Transpose(weight)` into initializers that are numpy views; `ndarray.tofile` writes a
    strided array element by element, which made writing FLUX's 24 GB of external data 3x slower than
    copying each such tensor first. The bytes written are the same. The copy is lazy (made by `ir.save` as it
    writes that tensor, then dropped): copying them all up front held the weights in RAM twice (a 2.05 GB
    FLUX with 2+2 blocks peaked at 4.05 GB RSS exporting on the CPU).
    """
    import numpy as np

    for value in model.graph.initializers.values():
        tensor = value.const_value
        raw = getattr(tensor, "raw", None)
        if isinstance(raw, np.ndarray) and not raw.flags.c_contiguous:

            def contiguous(raw: np.ndarray = raw, name: str | None = tensor.name) -> ir.Tensor:
                return ir.Tensor(np.ascontiguousarray(raw), name=name)

            value.const_value = ir.LazyTensor(
                contiguous, dtype=tensor.dtype, shape=tensor.shape, name=tensor.name
            )
