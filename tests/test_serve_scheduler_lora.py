"""The `scheduler` and `lora` request fields, on a real server started with `--lora px=FILE:0.8`.

They need the pipeline's settable `pipe.scheduler` (class name, built from the model's scheduler config) and
diffusers' LoRA methods (`load_lora_weights`, `set_adapters`): the server is coded against those names.
"""

from __future__ import annotations

import asyncio
import base64
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from PIL import Image  # noqa: E402

from pipeline.serve.launch import ServerProcess, start_server  # noqa: E402

SHAPE = {"size": "32x32", "steps": 3, "seed": 5, "response_format": "b64_json"}


def write_lora(unet_folder: Path, path: Path, rank: int = 4) -> Path:
    """A LoRA for every attention projection of the UNet, in the format diffusers' save_lora_weights writes
    ("unet.<module>.lora_A.weight" / "lora_B"), with weights large enough to change a tiny model's image."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    unet = UNet2DConditionModel.from_pretrained(unet_folder)
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith(("to_q", "to_k", "to_v", "to_out.0")):
            tensors[f"unet.{name}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=g) * 0.5
            tensors[f"unet.{name}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=g) * 0.5
    save_file(tensors, path)
    return path


@pytest.fixture(scope="module")
def server(tiny_sd: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("serve-choices")
    lora = write_lora(tiny_sd / "unet", root / "px.safetensors")
    args = ["--model", str(tiny_sd), "--device", "cpu", "--backend", "torch", "--cache-dir", str(root)]
    args += ["--lora", f"px={lora}:0.8", "--max-batch", "4"]
    s = start_server(args, log_path=root / "server.log")
    try:
        yield s
    finally:
        s.stop()


def generate(server: ServerProcess, **extra: Any) -> tuple[dict[str, Any], Image.Image]:
    r = httpx.post(
        f"{server.url}/v1/images/generations", json={"prompt": "a cat", **SHAPE, **extra}, timeout=60
    )
    assert r.status_code == 200, r.text
    body = r.json()
    return body, Image.open(io.BytesIO(base64.b64decode(body["data"][0]["b64_json"])))


def same(a: Image.Image, b: Image.Image) -> bool:
    return bool(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max() <= 1)


def test_models_lists_the_schedulers_and_loras(server: ServerProcess) -> None:
    card = httpx.get(f"{server.url}/v1/models").json()["data"][0]
    assert card["scheduler"] == "PNDMScheduler"
    assert {"PNDMScheduler", "EulerDiscreteScheduler", "DDIMScheduler"} <= set(card["schedulers"])
    assert card["loras"] == {"px": 0.8}


def test_a_request_picks_a_scheduler_and_the_next_one_gets_the_default_back(server: ServerProcess) -> None:
    _, default = generate(server)
    body, euler = generate(server, scheduler="EulerDiscreteScheduler")
    assert body["settings"]["scheduler"] == "EulerDiscreteScheduler"
    assert euler.text["scheduler"] == "EulerDiscreteScheduler"
    assert not same(default, euler)
    _, again = generate(server)
    assert same(default, again)
    r = httpx.post(f"{server.url}/v1/images/generations", json={"prompt": "x", "scheduler": "Nope"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "scheduler"


def test_a_request_picks_a_lora_by_name_with_a_scale(server: ServerProcess) -> None:
    _, plain = generate(server)
    body, styled = generate(server, lora="px")
    assert body["settings"]["lora"] == {"px": 0.8} and styled.text["lora"] == "px:0.8"
    assert not same(plain, styled)
    _, stronger = generate(server, lora={"px": 1.5})
    assert not same(styled, stronger)
    _, off = generate(server, lora={"px": 0.0})  # switching back: scale 0 is no LoRA
    assert same(plain, off)
    for bad in ("nope", {"px": float("1e9")}, {"other": 1.0}):
        r = httpx.post(f"{server.url}/v1/images/generations", json={"prompt": "x", "lora": bad})
        assert r.status_code == 400 and r.json()["error"]["param"] == "lora", r.text


def test_different_schedulers_and_loras_are_batched_apart(server: ServerProcess) -> None:
    choices = [
        {},
        {"scheduler": "EulerDiscreteScheduler"},
        {},
        {"lora": "px"},
        {"scheduler": "EulerDiscreteScheduler"},
    ]

    async def scenario() -> list[dict[str, Any]]:
        async with httpx.AsyncClient(timeout=120) as client:
            url = f"{server.url}/v1/images/generations"
            blocker = asyncio.create_task(
                client.post(url, json={"prompt": "b", "size": "64x64", "steps": 20})
            )
            while (await client.get(f"{server.url}/health")).json()["running"] == 0:
                await asyncio.sleep(0.05)
            tasks = [
                asyncio.create_task(client.post(url, json={"prompt": f"p{i}", **SHAPE, **c}))
                for i, c in enumerate(choices)
            ]
            while (await client.get(f"{server.url}/health")).json()["queued"] < len(choices):
                await asyncio.sleep(0.05)
            responses = await asyncio.gather(blocker, *tasks)
        assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
        return [r.json() for r in responses[1:]]

    bodies = asyncio.run(scenario())
    batch = [b["batch"]["id"] for b in bodies]
    assert batch[0] == batch[2] and batch[1] == batch[4]  # same choices: one call
    assert len({batch[0], batch[1], batch[3]}) == 3  # different choices: separate calls
    assert [b["settings"]["scheduler"] for b in bodies] == [
        "PNDMScheduler",
        "EulerDiscreteScheduler",
        "PNDMScheduler",
        "PNDMScheduler",
        "EulerDiscreteScheduler",
    ]
