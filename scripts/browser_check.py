"""The web page in a real headless browser: start a server (tiny-sd on loopback), type a prompt, submit, watch
the progress, wait for the image, download it, and record what happened.

    python scripts/browser_check.py [--model tiny-sd] [--chromium /usr/bin/chromium] [--out-dir docs]

Writes OUT_DIR/serve_browser.png (a screenshot) and OUT_DIR/serve_browser.json (the result); exits 1 if the page
did not produce the image. Needs Debian's chromium (`apt-get install -y chromium`) and Python playwright
(`pip install playwright`; its own browser download is not used).
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PROMPT = "a red fox in the snow"
SEED = 42
STEPS = 12


def check_page(url: str, chromium: str, screenshot: Path, workdir: Path) -> dict[str, Any]:
    from PIL import Image
    from playwright.sync_api import sync_playwright

    result: dict[str, Any] = {"url": url, "prompt": PROMPT, "seed": SEED, "steps": STEPS}
    console: list[str] = []
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(workdir / "profile"),  # a fresh profile
            executable_path=chromium,
            headless=True,
            args=CHROMIUM_FLAGS,
            accept_downloads=True,
            viewport={"width": 1100, "height": 760},
        )
        try:
            result["chromium"] = context.browser.version if context.browser else None
            page = context.new_page()
            page.on("console", lambda m: console.append(f"{m.type}: {m.text}") if m.type == "error" else None)
            page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
            page.goto(url)
            page.wait_for_function("document.querySelector('#size').options.length > 0")
            result["model_line"] = page.inner_text("#model")
            page.fill("#prompt", PROMPT)
            page.fill("#steps", str(STEPS))
            page.fill("#seed", str(SEED))
            result["size"] = page.input_value("#size")
            result["scheduler"] = page.input_value("#scheduler")
            start = time.monotonic()
            page.click("#generate")
            seen: list[str] = []
            while not page.query_selector(".card img"):  # watch the live progress line
                text = page.inner_text("#status")
                if text and (not seen or seen[-1] != text):
                    seen.append(text)
                if "error" in text or time.monotonic() - start > 120:
                    break
                time.sleep(0.03)
            page.wait_for_function(
                "(() => { const i = document.querySelector('.card img'); return i && i.naturalWidth > 0 })()",
                timeout=5_000,
            )
            result["seconds_to_image"] = round(time.monotonic() - start, 2)
            result["progress_seen"] = seen
            result["status"] = page.inner_text("#status")
            image = page.eval_on_selector(".card img", "i => [i.naturalWidth, i.naturalHeight]")
            result["image_size"] = image
            settings = page.eval_on_selector_all(
                ".card dl dt",
                "dts => Object.fromEntries(dts.map(dt => [dt.textContent, dt.nextSibling.textContent]))",
            )
            result["card_settings"] = settings
            with page.expect_download() as download_info:
                page.click(".card a[download]")
            download = download_info.value
            saved = workdir / download.suggested_filename
            download.save_as(saved)
            png = Image.open(io.BytesIO(saved.read_bytes()))
            result["download"] = {
                "file": download.suggested_filename,
                "size": list(png.size),
                "metadata": png.text,
            }
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            context.close()
    result["console_errors"] = console
    meta = result["download"]["metadata"]
    result["ok"] = bool(
        image[0] > 0
        and meta.get("prompt") == PROMPT
        and meta.get("seed") == str(SEED)
        and meta.get("steps") == str(STEPS)
        and any("step" in s for s in seen)
        and not console
    )
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny-sd")
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    ap.add_argument("--out-dir", default="docs")
    args = ap.parse_args(argv)
    from pipeline.serve.launch import running_server

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        server_args = [
            "--model",
            args.model,
            "--device",
            "cpu",
            "--backend",
            "torch",
            "--cache-dir",
            str(work),
        ]
        with running_server(server_args, log_path=work / "server.log") as server:
            result = check_page(server.url + "/", args.chromium, out / "serve_browser.png", work)
    import playwright

    result |= {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "model": args.model,
        "playwright": getattr(playwright, "__version__", None),
        "python": platform.python_version(),
        "machine": f"{platform.system()} {platform.machine()}",
        "screenshot": "serve_browser.png",
    }
    (out / "serve_browser.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("ok", "seconds_to_image", "image_size", "status", "chromium")}))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
