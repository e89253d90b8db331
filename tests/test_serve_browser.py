"""scripts/browser_check.py in Debian's chromium: the web page types, submits, shows progress, shows and downloads
the image (skipped where /usr/bin/chromium or playwright is missing)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "browser_check.py"

pytestmark = [
    pytest.mark.skipif(
        not CHROMIUM.is_file(), reason="needs Debian's chromium (apt-get install -y chromium)"
    ),
    pytest.mark.slow,
]


def test_the_page_makes_an_image_in_a_real_browser(tmp_path: Path) -> None:
    pytest.importorskip("playwright.sync_api")
    pytest.importorskip("fastapi")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--out-dir", str(tmp_path), "--chromium", str(CHROMIUM)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((tmp_path / "serve_browser.json").read_text())
    assert result["ok"] and result["image_size"] == [64, 64] and not result["console_errors"]
    assert any(text.startswith("step ") for text in result["progress_seen"])
    assert result["download"]["metadata"]["prompt"] == "a red fox in the snow"
    assert (tmp_path / "serve_browser.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
