"""Writing images with the metadata each format can hold, atomically.

- PNG: one text chunk per field (prompt, seed, size, ...) plus `parameters`, the A1111 / ComfyUI-readable
  string (prompt, "Negative prompt: ...", then "Steps: 28, Sampler: ..., CFG scale: ..., Seed: ..., ...").
- JPEG and WebP: the same `parameters` string as EXIF UserComment (where A1111 writes it for these formats).
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import OutputError

# suffix -> PIL format
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
_EXIF_IFD = 0x8769
_USER_COMMENT = 0x9286
_UNICODE = b"UNICODE\x00"  # EXIF UserComment character code: UCS-2 big-endian, as piexif and A1111 write it
# our metadata keys -> A1111's labels, in A1111's order; other keys follow under their own names
_LABELS = {
    "steps": "Steps",
    "scheduler": "Sampler",
    "guidance_scale": "CFG scale",
    "seed": "Seed",
    "size": "Size",
    "model": "Model",
}
_NOT_IN_PARAMETERS = ("prompt", "negative_prompt", "index")


def _quote(value: str) -> str:
    """A value as A1111 writes one into its "Key: value, Key: value" line: JSON-quoted when it holds a
    comma, colon or newline."""
    value = str(value)
    return json.dumps(value, ensure_ascii=False) if any(c in value for c in ",:\n") else value


def a1111_parameters(metadata: Mapping[str, str], *, distilled_guidance: bool = False) -> str:
    """The A1111-style generation parameters string of an image's metadata.

    `distilled_guidance` (FLUX.1-dev): guidance_scale is written as Forge writes it, `CFG scale: 1,
    Distilled CFG Scale: <value>`."""
    lines = [metadata.get("prompt", "")]
    if metadata.get("negative_prompt"):
        lines.append(f"Negative prompt: {metadata['negative_prompt']}")
    fields: list[str] = []
    for key, label in _LABELS.items():
        if key not in metadata:
            continue
        if key == "guidance_scale" and distilled_guidance:
            fields += ["CFG scale: 1", f"Distilled CFG Scale: {_quote(metadata[key])}"]
        else:
            fields.append(f"{label}: {_quote(metadata[key])}")
    for key, value in metadata.items():
        if key not in _LABELS and key not in _NOT_IN_PARAMETERS:
            fields.append(f"{key.replace('_', ' ').capitalize()}: {_quote(value)}")
    lines.append(", ".join(fields))
    return "\n".join(lines)


def image_format(path: str | Path) -> str | None:
    """The PIL format for a file name's suffix, None when the suffix is not an image format we write."""
    return IMAGE_FORMATS.get(Path(path).suffix.lower())


def encode_image(image: Any, fmt: str, metadata: Mapping[str, str], parameters: str) -> bytes:
    """The file bytes of a PIL image in `fmt` ("PNG" | "JPEG" | "WEBP") with its metadata."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    buffer = io.BytesIO()
    if fmt == "PNG":
        info = PngInfo()
        for key, value in metadata.items():
            info.add_text(key, value)
        info.add_text("parameters", parameters)
        image.save(buffer, format="PNG", pnginfo=info)
    else:
        exif = Image.Exif()
        exif.get_ifd(_EXIF_IFD)[_USER_COMMENT] = _UNICODE + parameters.encode("utf-16-be")
        image.convert("RGB").save(buffer, format=fmt, exif=exif, quality=95)
    return buffer.getvalue()


def read_parameters(path: str | Path) -> str | None:
    """The A1111 parameters string of an image written by `save_image` (PNG text or EXIF UserComment)."""
    from PIL import Image

    with Image.open(path) as image:
        text = getattr(image, "text", {}) or {}
        if "parameters" in text:
            return str(text["parameters"])
        raw = image.getexif().get_ifd(_EXIF_IFD).get(_USER_COMMENT)
    if isinstance(raw, bytes) and raw.startswith(_UNICODE):
        return raw[len(_UNICODE) :].decode("utf-16-be")
    return raw if isinstance(raw, str) else None


def save_image(
    image: Any, path: str | Path, metadata: Mapping[str, str], *, distilled_guidance: bool = False
) -> None:
    """Write `image` to `path` in the format its suffix names, with `metadata`, atomically (temp file in the
    same folder, then rename). OutputError when it cannot be written or the suffix is not an image format."""
    from .cache import atomic_write_bytes

    path = Path(path)
    fmt = image_format(path)
    if fmt is None:
        raise OutputError(
            f"cannot write {path}: {path.suffix or 'no suffix'} is not one of {', '.join(IMAGE_FORMATS)}"
        )
    data = encode_image(
        image, fmt, metadata, a1111_parameters(metadata, distilled_guidance=distilled_guidance)
    )
    try:
        atomic_write_bytes(path, data)
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror or e}") from e
