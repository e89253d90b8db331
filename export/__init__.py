"""`python -m export`: forwards to `pipeline.export` (ONNX export of each stage, TensorRT-RTX engine builds)."""

from pipeline.export import *  # noqa: F403
from pipeline.export import __all__  # noqa: F401
