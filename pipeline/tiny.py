"""Small random-weight FLUX, Stable Diffusion and SDXL models in diffusers format, made offline.

They have the real architectures (same classes, same configs keys, same scheduler) at toy sizes, and
tokenizers built locally from a byte-level vocabulary, so the whole product runs on a CPU with no network.
They generate noise: real images need real weights.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

CLIP_LENGTH = 77
TINY_MODELS = ("tiny-flux", "tiny-sd", "tiny-sdxl")  # built-in names, made offline on first use


def _byte_vocab() -> list[str]:
    """The 256 printable stand-ins for bytes that byte-level BPE tokenizers (CLIP, GPT-2) use."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def _write_clip_tokenizer(folder: Path, pad_token: str = "<|endoftext|>") -> int:
    """A CLIP BPE tokenizer over single bytes plus a few merges; returns its vocabulary size.

    SDXL's second tokenizer pads with "!" instead of the end-of-text token: `pad_token` says which."""
    from transformers import CLIPTokenizer

    chars = _byte_vocab()
    merges = ["t h", "th e</w>", "a n", "o n", "e r", "i n", "r e", "f o"]
    vocab: dict[str, int] = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    for m in merges:
        vocab.setdefault(m.replace(" ", ""), len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    try:  # transformers >= 5 takes the vocabulary and merges as values
        tok = CLIPTokenizer(
            vocab=vocab,
            merges=[tuple(m.split()) for m in merges],
            model_max_length=CLIP_LENGTH,
            pad_token=pad_token,
        )
    except TypeError:  # transformers 4 reads them from files
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "vocab.json").write_text(json.dumps(vocab))
            (Path(tmp) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
            tok = CLIPTokenizer(
                str(Path(tmp) / "vocab.json"),
                str(Path(tmp) / "merges.txt"),
                model_max_length=CLIP_LENGTH,
                pad_token=pad_token,
            )
    tok.save_pretrained(folder)
    return len(vocab)


def _write_t5_tokenizer(folder: Path, max_length: int) -> int:
    """A T5-style (Unigram, sentencepiece-like) fast tokenizer over characters; returns its vocab size."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("▁", -2.0)] + [(c, -3.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789.,!?'-"]
    pieces += [("▁" + w, -1.0) for w in ("a", "the", "in", "of", "red", "fox", "snow", "cat")]
    tk = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tk.normalizer = normalizers.Sequence([normalizers.Lowercase(), normalizers.Replace(" ", "▁")])
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tk.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    with tempfile.TemporaryDirectory() as tmp:
        tk.save(str(Path(tmp) / "tokenizer.json"))
        tok = T5TokenizerFast(
            tokenizer_file=str(Path(tmp) / "tokenizer.json"),
            eos_token="</s>",
            unk_token="<unk>",
            pad_token="<pad>",
            extra_ids=0,
            model_max_length=max_length,
        )
        tok.save_pretrained(folder)
    return len(pieces)


def _clip_text_model(
    vocab_size: int, projection: bool = False, hidden_size: int = 32, projection_dim: int = 32
) -> torch.nn.Module:
    """CLIPTextModel, or CLIPTextModelWithProjection (`projection`: SDXL's second encoder)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=CLIP_LENGTH,
        projection_dim=projection_dim,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _write_model_index(folder: Path, index: dict) -> None:
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def _save(module: torch.nn.Module, folder: Path) -> None:
    module.save_pretrained(folder, safe_serialization=True)


def _tiny_vae(**config: object) -> torch.nn.Module:
    """An AutoencoderKL with the real 8x downsampling (4 levels) at 8 channels."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=64,
        **config,
    )


def _make_flux(folder: Path) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    clip_vocab = _write_clip_tokenizer(folder / "tokenizer")
    t5_vocab = _write_t5_tokenizer(folder / "tokenizer_2", max_length=512)
    _save(_clip_text_model(clip_vocab), folder / "text_encoder")
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=t5_vocab,
            d_model=32,
            d_kv=8,
            d_ff=37,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            pad_token_id=0,
            eos_token_id=1,
        )
    )
    _save(t5, folder / "text_encoder_2")
    _save(
        FluxTransformer2DModel(
            patch_size=1,
            in_channels=16,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            guidance_embeds=True,
            axes_dims_rope=(4, 4, 8),
        ),
        folder / "transformer",
    )
    _save(
        _tiny_vae(
            scaling_factor=1.5035, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False
        ),
        folder / "vae",
    )
    FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    ).save_pretrained(folder / "scheduler")
    _write_model_index(
        folder,
        {
            "_class_name": "FluxPipeline",
            "_diffusers_version": _diffusers_version(),
            "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "text_encoder_2": ["transformers", "T5EncoderModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "tokenizer_2": ["transformers", "T5TokenizerFast"],
            "transformer": ["diffusers", "FluxTransformer2DModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        },
    )


def _make_sd(folder: Path) -> None:
    from diffusers import PNDMScheduler, UNet2DConditionModel

    clip_vocab = _write_clip_tokenizer(folder / "tokenizer")
    _save(_clip_text_model(clip_vocab), folder / "text_encoder")
    _save(
        UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(8, 16),
            layers_per_block=1,
            norm_num_groups=4,
            cross_attention_dim=32,
            attention_head_dim=4,
        ),
        folder / "unet",
    )
    _save(_tiny_vae(scaling_factor=0.18215), folder / "vae")
    PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        set_alpha_to_one=False,
        skip_prk_steps=True,
        steps_offset=1,
    ).save_pretrained(folder / "scheduler")
    _write_model_index(
        folder,
        {
            "_class_name": "StableDiffusionPipeline",
            "_diffusers_version": _diffusers_version(),
            "feature_extractor": [None, None],
            "image_encoder": [None, None],
            "requires_safety_checker": False,
            "safety_checker": [None, None],
            "scheduler": ["diffusers", "PNDMScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        },
    )


def _make_sdxl(folder: Path) -> None:
    """SDXL base at toy size: the real classes and config keys, three UNet levels as SDXL has (plain, then
    cross-attention with 1 and 2 transformer layers), encoders of different widths so a mix-up of the
    feature axes cannot go unnoticed (hidden 32 + 48 = cross-attention 80; pooled projection 40)."""
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel

    clip_vocab = _write_clip_tokenizer(folder / "tokenizer")
    _write_clip_tokenizer(folder / "tokenizer_2", pad_token="!")
    _save(_clip_text_model(clip_vocab), folder / "text_encoder")
    _save(
        _clip_text_model(clip_vocab, projection=True, hidden_size=48, projection_dim=40),
        folder / "text_encoder_2",
    )
    _save(
        UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(8, 16, 16),
            layers_per_block=1,
            transformer_layers_per_block=(1, 1, 2),
            norm_num_groups=4,
            cross_attention_dim=80,
            attention_head_dim=(2, 4, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=8 * 6 + 40,
        ),
        folder / "unet",
    )
    _save(_tiny_vae(scaling_factor=0.13025, force_upcast=True), folder / "vae")
    EulerDiscreteScheduler(**SDXL_SCHEDULER).save_pretrained(folder / "scheduler")
    _write_model_index(
        folder,
        {
            "_class_name": "StableDiffusionXLPipeline",
            "_diffusers_version": _diffusers_version(),
            "force_zeros_for_empty_prompt": True,
            "scheduler": ["diffusers", "EulerDiscreteScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "tokenizer_2": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        },
    )


# stabilityai/stable-diffusion-xl-base-1.0 scheduler/scheduler_config.json (the keys EulerDiscreteScheduler takes)
SDXL_SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "interpolation_type": "linear",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "use_karras_sigmas": False,
}


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


_MAKERS = {"tiny-flux": _make_flux, "tiny-sd": _make_sd, "tiny-sdxl": _make_sdxl}


def write_folder_atomically(folder: str | Path, fill: Callable[[Path], None]) -> Path:
    """Make `folder` by `fill(temp_folder)` then one rename, so no half-made model folder is ever seen.

    Under the folder's lock: a second process making the same folder waits, then keeps the first one's. The
    temp folder (`.<name>.<random>.tmp`) of a killed process is swept at a later start (cache/files.py)."""
    from .cache.files import UMASK, file_lock, sweep_temps, temp_prefix
    from .loading import quiet_hub_output

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    sweep_temps(folder.parent)  # before the lock: under it, our own target would look busy
    with file_lock(folder, None, purpose=f"making {folder.name}"):
        if folder.exists():
            return folder
        tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(folder), suffix=".tmp", dir=folder.parent))
        try:
            with quiet_hub_output():
                fill(tmp)
            os.chmod(tmp, 0o777 & ~UMASK)  # mkdtemp makes 0700; a model folder gets the usual mode
            os.replace(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return folder


def make_tiny_model(name: str, folder: str | Path, seed: int = 0) -> Path:
    """Write the built-in random-weight model `name` (tiny-flux, tiny-sd, tiny-sdxl) to `folder`, atomically."""
    if name not in _MAKERS:
        raise ValueError(f"unknown tiny model {name!r}; choose one of {sorted(_MAKERS)}")

    def fill(tmp: Path) -> None:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            _MAKERS[name](tmp)

    return write_folder_atomically(folder, fill)
