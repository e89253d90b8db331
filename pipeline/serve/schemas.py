"""Request and response bodies: OpenAI's Images API (`POST /v1/images/generations`) plus our extras.

Standard fields: prompt, n, size ("WIDTHxHEIGHT", as OpenAI: width first), response_format (url | b64_json),
model, and quality / style / user, which are accepted and ignored. Our extras: seed, steps, guidance_scale,
negative_prompt, scheduler (a class name), lora (a name, or {name: scale}), stream (server-sent events) and
request_id (to follow a request on /v1/progress/{request_id}). Unknown fields are refused, so a typo ("step")
is a 400 and not a silently ignored setting.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_N = 10  # as OpenAI's dall-e-2; the server's --max-batch may lower it
MAX_SEED = 2**53  # seeds round-trip exactly through JavaScript numbers (the web page)
REQUEST_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
# characters in a prompt (and in a negative prompt), as OpenAI's gpt-image-1. The text encoders read far less
# (CLIP 77 tokens, T5 512), but every image records its prompt in its metadata, twice (the `prompt` chunk and
# A1111's `parameters`): unbounded, a 5 MB prompt made each image a 10 MB file.
MAX_PROMPT_CHARS = 32_000


class ImageRequest(BaseModel):
    """The body of `POST /v1/images/generations`. Types are strict: "steps": "4" is a 400, not a 4."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    model: str | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    size: str | None = None
    response_format: Literal["url", "b64_json"] = "url"
    quality: str | None = None
    style: str | None = None
    user: str | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    steps: int | None = None
    guidance_scale: float | None = Field(None, ge=0, le=100)
    negative_prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS)
    scheduler: str | None = None
    lora: str | dict[str, float] | None = None
    stream: bool = False
    request_id: str | None = Field(None, pattern=REQUEST_ID_PATTERN)


class ImageData(BaseModel):
    url: str | None = None
    b64_json: str | None = None
    revised_prompt: str | None = None
    seed: int  # ours: this image's seed (a request's image i has seed + i)


class BatchInfo(BaseModel):
    """The pipeline call that made this request's images: requests of the same shape share one."""

    id: int
    images: int


class ImageResponse(BaseModel):
    created: int
    data: list[ImageData]
    size: str
    output_format: Literal["png"] = "png"
    request_id: str
    settings: dict[str, Any]  # width, height, steps, guidance_scale, scheduler, lora: what the images used
    batch: BatchInfo
    replica: str


def error_body(
    message: str, type_: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """An OpenAI-style error: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
