"""Screenshot of a built page with headless Chromium, to see that its figures show.

python -m sphinx -W --keep-going -b html docs docs/_build/html
python docs/screenshot.py [docs/_build/html/index.html] [docs/_build/landing.png]
"""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys
import tempfile

DOCS = pathlib.Path(__file__).resolve().parent


def screenshot(page: pathlib.Path, png: pathlib.Path, size: str = "1280,1600") -> pathlib.Path:
    """Writes `png`, Chromium's rendering of `page` (an HTML file) at `size` pixels."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if chromium is None:
        raise SystemExit("no Chromium found: apt-get install -y chromium")
    png.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", f"--screenshot={png}", f"--window-size={size}",
             page.resolve().as_uri()],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip
    return png


if __name__ == "__main__":
    page = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else DOCS / "_build" / "html" / "index.html"
    png = pathlib.Path(sys.argv[2]) if len(sys.argv) > 2 else DOCS / "_build" / "landing.png"
    print(screenshot(page, png))
