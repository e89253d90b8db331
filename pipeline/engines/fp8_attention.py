"""FLUX's joint attention in float8 through cuDNN's `sdpa_fp8` (the torch backend's `attention="fp8"`).

torch's `scaled_dot_product_attention` refuses float8 inputs (torch 2.11; its quantized variant needs
FlashAttention-3, which has no wheel here), so FLUX's attention stayed bf16 under fp8 Linear layers: 0.71 s of
a 3.22 s FLUX.1-dev 1024² call on the H100 (docs/benchmarks.md). cuDNN has fp8 attention; NVIDIA's
`nvidia-cudnn-frontend` package exposes it to Python, and this module runs it as a torch custom op:

- `quantize_per_tensor`: Q, K and V to float8 (e4m3) with one scale each, in plain torch, so Inductor fuses it
  with the RMSNorm and RoPE before it;
- `adaptive_diffusion::sdpa_fp8`: the attention. On CUDA one cuDNN graph per shape and layout, built on first
  use and kept for the process (the variant pack is bound per call, so it runs inside CUDA graphs); on other
  devices the same contract in float32 (dequantized inputs, exact softmax): the reference the tests check;
- `Fp8JointAttention`: diffusers' FLUX attention processor with that attention (diffusers has no fp8
  attention backend to plug in); the projections, norms and RoPE are diffusers' own functions.

An option, not the default: it is faster only if cuDNN's fp8 kernel beats its bf16 one by more than the
quantization costs, and its error must stay inside the fp8 bound; `scripts/attention_probe.py speed` and
`scripts/bench.py --configs fp8_attention` measure both.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BackendUnavailableError

logger = logging.getLogger(__name__)

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # e4m3's largest finite value; also the scale of softmax probabilities (in [0, 1]) in cuDNN


class Fp8AttentionUnavailable(BackendUnavailableError):
    """fp8 attention cannot run here (cuDNN refused the graph, or an attention mask came)."""


def available(device: torch.device) -> tuple[bool, str]:
    """(whether `attention="fp8"` can run on `device`, why not)."""
    if device.type != "cuda":
        return True, ""  # the float32 reference implementation
    if torch.cuda.get_device_capability(device) < (8, 9):
        return False, "cuDNN's fp8 attention needs compute capability 8.9 or newer (Ada, Hopper)"
    try:
        import cudnn  # noqa: F401  (nvidia-cudnn-frontend)
    except ImportError:
        return False, "it needs NVIDIA's cuDNN frontend: pip install 'adaptive-diffusion[fp8-attention]'"
    except Exception as exc:  # installed but broken (its libraries): say what failed
        return False, f"NVIDIA's cuDNN frontend did not load: {type(exc).__name__}: {exc}"
    return True, ""


def quantize_per_tensor(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`x` in float8 e4m3 scaled by its absolute maximum, and the float32 descale (shape (1,)) undoing it."""
    amax = x.abs().amax().float().clamp(min=1e-12)
    x8 = (x.float() * (FP8_MAX / amax)).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return x8, (amax / FP8_MAX).reshape(1)


@torch.library.custom_op("adaptive_diffusion::sdpa_fp8", mutates_args=())
def sdpa_fp8(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    descale_q: torch.Tensor,
    descale_k: torch.Tensor,
    descale_v: torch.Tensor,
    scale: float,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """softmax(scale · Q Kᵀ) V for float8 (batch, heads, tokens, head size) Q, K, V with per-tensor descales;
    returned in `out_dtype`, (batch, heads, tokens, head size) over (batch, tokens, heads, head size) memory."""
    if q.device.type == "cuda":
        return _cudnn_sdpa_fp8(q, k, v, descale_q, descale_k, descale_v, scale, out_dtype)
    qf, kf, vf = (t.float() * s for t, s in ((q, descale_q), (k, descale_k), (v, descale_v)))
    out = F.scaled_dot_product_attention(qf, kf, vf, scale=scale)
    return _bshd_output(q, out_dtype).copy_(out)


@sdpa_fp8.register_fake
def _(q, k, v, descale_q, descale_k, descale_v, scale, out_dtype):
    return _bshd_output(q, out_dtype)


def _bshd_output(q: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    b, h, s, d = q.shape
    return torch.empty((b, s, h, d), dtype=dtype, device=q.device).transpose(1, 2)


# --- cuDNN -------------------------------------------------------------------------------------------------

_local = threading.local()  # a cuDNN handle per thread and device
_graphs: dict[tuple[Any, ...], tuple[Any, dict[str, Any], int]] = {}
_constants: dict[torch.device, dict[str, torch.Tensor]] = {}
_lock = threading.Lock()


def _handle(device: torch.device) -> Any:
    import cudnn

    handles = getattr(_local, "handles", None)
    if handles is None:
        handles = _local.handles = {}
    if device not in handles:
        with torch.cuda.device(device):
            handles[device] = cudnn.create_handle()
    cudnn.set_stream(handle=handles[device], stream=torch.cuda.current_stream(device).cuda_stream)
    return handles[device]


def build_fp8_graph(handle: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                    out: torch.Tensor) -> tuple[Any, dict[str, Any]]:  # fmt: skip
    """A built cuDNN `sdpa_fp8` graph for these tensors' shapes and strides; (graph, its tensors by name).

    P (the softmax probabilities, in [0, 1]) is scaled by 448 into e4m3 and O is written unscaled in
    `out`'s dtype. The amax outputs stay virtual: declaring them keeps the graph off cuDNN's fastest engines."""
    import cudnn

    f8, f32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
    out_type = {torch.bfloat16: cudnn.data_type.BFLOAT16, torch.float16: cudnn.data_type.HALF}[out.dtype]
    g = cudnn.pygraph(handle=handle, io_data_type=f8, intermediate_data_type=f32, compute_data_type=f32)
    tensors = {
        name: g.tensor(name=name, dim=list(t.shape), stride=list(t.stride()), data_type=f8)
        for name, t in (("q", q), ("k", k), ("v", v))
    }
    for name in ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o"):
        tensors[name] = g.tensor(name=name, dim=[1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=f32)
    o, *_ = g.sdpa_fp8(
        q=tensors["q"], k=tensors["k"], v=tensors["v"],
        descale_q=tensors["descale_q"], descale_k=tensors["descale_k"], descale_v=tensors["descale_v"],
        descale_s=tensors["descale_s"], scale_s=tensors["scale_s"], scale_o=tensors["scale_o"],
        generate_stats=False, attn_scale=scale,
    )  # fmt: skip
    o.set_output(True).set_dim(list(out.shape)).set_stride(list(out.stride())).set_data_type(out_type)
    tensors["o"] = o
    g.build([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    return g, tensors


def _cudnn_sdpa_fp8(q, k, v, descale_q, descale_k, descale_v, scale, out_dtype):
    device = q.device
    out = _bshd_output(q, out_dtype)
    handle = _handle(device)
    key = (device, q.shape, q.stride(), k.shape, k.stride(), v.shape, v.stride(), scale, out_dtype)
    entry = _graphs.get(key)
    if entry is None:
        with _lock:
            entry = _graphs.get(key)
            if entry is None:
                try:
                    graph, tensors = build_fp8_graph(handle, q, k, v, scale, out)
                except Exception as exc:  # cuDNN's refusal names the unsupported part
                    raise Fp8AttentionUnavailable(
                        f"cuDNN refused fp8 attention for {tuple(q.shape)} ({exc}); use attention='cudnn'"
                    ) from exc
                entry = _graphs[key] = (graph, tensors, graph.get_workspace_size())
                logger.debug("cuDNN fp8 attention graph for %s built", tuple(q.shape))
    graph, tensors, workspace_size = entry
    constants = _constants.get(device)
    if constants is None:  # built outside any CUDA graph capture: the first call per device is eager
        one = torch.ones(1, 1, 1, 1, device=device)
        constants = _constants[device] = {
            "descale_s": one / FP8_MAX,
            "scale_s": one * FP8_MAX,
            "scale_o": one,
        }
    pack = {tensors["q"]: q, tensors["k"]: k, tensors["v"]: v, tensors["o"]: out}
    for name, value in (("descale_q", descale_q), ("descale_k", descale_k), ("descale_v", descale_v)):
        pack[tensors[name]] = value.reshape(1, 1, 1, 1)
    pack.update({tensors[name]: value for name, value in constants.items()})
    workspace = torch.empty(max(workspace_size, 1), dtype=torch.uint8, device=device)
    graph.execute(pack, workspace, handle=handle)
    return out


# --- FLUX's attention processor ------------------------------------------------------------------------------


class Fp8JointAttention:
    """diffusers' FluxAttnProcessor with its attention in float8 (cuDNN's `sdpa_fp8`)."""

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: Any = None,
    ) -> Any:
        from diffusers.models.embeddings import apply_rotary_emb
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections

        if attention_mask is not None:
            raise Fp8AttentionUnavailable("fp8 attention takes no attention mask")
        q, k, v, eq, ek, ev = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        q, k, v = (t.unflatten(-1, (-1, attn.head_dim)) for t in (q, k, v))  # (batch, tokens, heads, head)
        q, k = attn.norm_q(q), attn.norm_k(k)
        if attn.added_kv_proj_dim is not None:  # the text tokens first, as diffusers orders them
            eq, ek, ev = (t.unflatten(-1, (-1, attn.head_dim)) for t in (eq, ek, ev))
            q = torch.cat([attn.norm_added_q(eq), q], dim=1)
            k = torch.cat([attn.norm_added_k(ek), k], dim=1)
            v = torch.cat([ev, v], dim=1)
        if image_rotary_emb is not None:
            q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
            k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        (q8, dq), (k8, dk), (v8, dv) = (quantize_per_tensor(t) for t in (q, k, v))
        out = torch.ops.adaptive_diffusion.sdpa_fp8(
            q8.transpose(1, 2), k8.transpose(1, 2), v8.transpose(1, 2), dq, dk, dv,
            attn.head_dim**-0.5, hidden_states.dtype,
        )  # fmt: skip
        out = out.transpose(1, 2).flatten(2, 3)
        if encoder_hidden_states is None:
            return out
        text, image = out.split_with_sizes([encoder_hidden_states.shape[1], hidden_states.shape[1]], dim=1)
        image = attn.to_out[1](attn.to_out[0](image.contiguous()))
        return image, attn.to_add_out(text.contiguous())


def use_fp8_attention(denoiser: nn.Module) -> int:
    """Give each of FLUX's attention modules fp8 attention; returns how many (0 for a model without them)."""
    from diffusers.models.transformers.transformer_flux import FluxAttention

    count = 0
    for module in denoiser.modules():
        if isinstance(module, FluxAttention) and not isinstance(module.processor, Fp8JointAttention):
            module.set_processor(Fp8JointAttention())
            count += 1
    logger.debug("fp8 attention in %d attention modules", count)
    return count
