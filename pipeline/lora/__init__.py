"""LoRA adapters as weights updated in place: load, mix, switch and unload with no change to the modules.

A LoRA changes a layer's weight by a low-rank product. Merged into the weight:

    W = W0 + sum_i  w_i * s_i * (B_i @ A_i)        s_i = alpha_i / r_i  (alpha_i / sqrt(r_i) with rsLoRA)

for the active adapters i with the weights w_i given to `set_adapters`. The sum is computed in float32 on the
weight's device and written into the weight itself (`copy_`): same tensor, same storage, same shape. Compiled
code (which takes parameters as graph inputs) and captured CUDA graphs (which read their storage) see the new
values with no recompile and no re-capture; persisted compile artifacts do not depend on the values either.
Switching adapters or weights recomputes from W0 (`Restore` says how W0 is kept).

Files go through diffusers' own readers and converters (`<Pipeline>.lora_state_dict` turns kohya / A1111 /
diffusers names into PEFT names), the rank and alpha of each layer come from the `LoraConfig` diffusers builds
(`_create_lora_config`), resolved per layer the way peft resolves it (`get_pattern_key`): a merged layer is
the layer peft would run. Only the last step is ours: PEFT layer names -> the backend's weights, a
`WeightStore`: `InPlaceWeights` here for the torch modules, `RefitWeights` (pipeline/engines/rtx_refit.py)
for TensorRT-RTX engines.

    files.py     a LoRA file: local file, folder or hub id; sha256; the CLI's PATH[:SCALE]
    reading.py   file -> factors (A, B, alpha / r) per layer, through diffusers' converters, checked
    weights.py   sites, factors, merged deltas; InPlaceWeights (torch) and Restore (how W0 is kept)
    adapters.py  LoraAdapters: load, set_adapters, delete, unload, describe; one write per switch
"""

from .adapters import Adapter, LoraAdapters, LoraStats, adapters_for
from .files import LoraFile, check_scale, parse_lora_spec, resolve_lora
from .reading import check_lora, lora_components, read_factors, skeleton
from .weights import Factor, InPlaceWeights, Restore, Site, Term, WeightStore, merged_delta

__all__ = [
    "Adapter",
    "Factor",
    "InPlaceWeights",
    "LoraAdapters",
    "LoraFile",
    "LoraStats",
    "Restore",
    "Site",
    "Term",
    "WeightStore",
    "adapters_for",
    "check_lora",
    "check_scale",
    "lora_components",
    "merged_delta",
    "parse_lora_spec",
    "read_factors",
    "resolve_lora",
    "skeleton",
]
