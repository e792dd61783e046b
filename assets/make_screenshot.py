"""Refresh ``assets/app_screenshot.png``: start the app, click Generate in headless Chromium, and
save the page once the images are in.

    python assets/make_screenshot.py [--out assets/app_screenshot.png] [app.py options...]

Uses the demo adapters from ``make demo`` when present (the screenshot then shows LoRA, LoRA-Dash
and AutoLoRA side by side); without them it shows the base model and the banner saying how to
make them. Needs Debian's ``chromium`` and the ``playwright`` Python package; playwright drives
the system browser (``executable_path``), it never downloads one of its own.

``capture(url, out)`` is also what the app's browser test runs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
from pathlib import Path
from typing import Optional, Sequence
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "assets" / "app_screenshot.png"
# Flags that keep a headless Chromium quiet and offline-friendly: no sandbox (CI runs as root),
# no GPU, and none of the background fetches (updates, sync) that would wait on the network.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def find_chromium() -> Optional[str]:
    """``$CHROMIUM``, else ``chromium`` on PATH (Debian's package installs /usr/bin/chromium)."""
    env = os.environ.get("CHROMIUM")
    if env and Path(env).is_file():
        return env
    return shutil.which("chromium") or shutil.which("chromium-browser")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def capture(url: str, out: Path, timeout_s: float = 60.0, chromium: Optional[str] = None) -> dict:
    """Open ``url``, click Generate, wait for every gallery image to have loaded, screenshot to
    ``out``. Returns what the page showed: ``{"images": [(natural width, height), ...],
    "captions": [...], "slider": loaded slider images, "banner": text, "error": text or ""}``."""
    from playwright.sync_api import sync_playwright

    chromium = chromium or find_chromium()
    if chromium is None:
        raise RuntimeError("no Chromium found: apt-get install chromium (or set $CHROMIUM)")
    timeout_ms = timeout_s * 1000
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            # Offline: requests beyond the app (gradio's theme fonts from a CDN) would hang until
            # they time out and delay the page's load event; refuse them at once.
            origin = urlsplit(url)
            page.route(
                "**/*",
                lambda route: route.continue_()
                if urlsplit(route.request.url).netloc in ("", origin.netloc)
                else route.abort(),
            )
            page.goto(url, wait_until="load", timeout=timeout_ms)
            page.click("#generate", timeout=timeout_ms)
            # Done when the gallery holds images that the browser has decoded (naturalWidth > 0),
            # or when gradio shows an error toast instead.
            page.wait_for_function(
                """() => {
                    const imgs = [...document.querySelectorAll('#gallery img')];
                    const ok = imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0);
                    return ok || document.querySelector('.toast-body.error') !== null;
                }""",
                timeout=timeout_ms,
            )
            error = page.locator(".toast-body.error")
            result = {
                "images": page.eval_on_selector_all(
                    "#gallery img", "els => els.map(e => [e.naturalWidth, e.naturalHeight])"
                ),
                "captions": page.eval_on_selector_all(
                    "#gallery .caption-label, #gallery figcaption", "els => els.map(e => e.textContent.trim())"
                ),
                # the LoRA / LoRA-Dash comparison, when both are loaded
                "slider": page.eval_on_selector_all(
                    "#slider img", "els => els.filter(e => e.complete && e.naturalWidth > 0).length"
                ),
                "banner": page.inner_text("#banner") if page.locator("#banner").count() else "",
                "error": error.first.inner_text() if error.count() else "",
            }
            out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(out), full_page=True)
            return result
        finally:
            browser.close()


def shrink_png(path: Path) -> None:
    """Re-save with a 256-colour palette: the committed screenshot drops from ~600 KB to ~220 KB
    and still reads fine (the UI is flat colours; the renders are small)."""
    from PIL import Image

    with Image.open(path) as im:
        small = im.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    small.save(path, optimize=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args, app_args = p.parse_known_args(argv)
    sys.path.insert(0, str(REPO))
    import app

    app_ns = app.parse_args(list(app_args) + ["--port", str(free_port())])
    state = app.build_state(app_ns)
    demo = app.launch(state, app_ns.host, app_ns.port, block=False)
    try:
        shown = capture(f"http://{app_ns.host}:{app_ns.port}/", args.out, timeout_s=300)
    finally:
        demo.close()
        state.renderer.close()
    if shown["error"]:
        print(f"make_screenshot: the app showed an error: {shown['error']}", file=sys.stderr)
        return 1
    shrink_png(args.out)
    print(f"wrote {args.out} ({len(shown['images'])} images: {', '.join(shown['captions'])})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
