"""Take the README's screenshot of the web app: two edits on the demo model, in Debian's chromium.

    .venv/bin/python scripts/webapp_screenshot.py [--out docs/webapp.png] [--steps 50]
"""

import argparse
import socket
import tempfile
from pathlib import Path

from playwright.sync_api import sync_playwright

from prompt2prompt.demo.showcase import GUIDANCE, SEED, SOURCE
from prompt2prompt.webapp import launch

EDITS = [SOURCE.replace("red", "green"), SOURCE.replace("circle", "star")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/webapp.png"))
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--model", default="demo")
    args = parser.parse_args()

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with tempfile.TemporaryDirectory() as out_dir:
        app = launch([args.model], port=port, out_dir=out_dir, device="cpu", prevent_thread_lock=True)
        try:
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", headless=True,
                                                     args=["--no-sandbox", "--disable-background-networking"])
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                page.goto(app.local_url)
                page.fill("#source textarea", SOURCE)
                page.click("text=Add edit")
                for i, edit in enumerate(EDITS, 1):
                    page.fill(f"#edit-{i} textarea", edit)
                for selector, value in [("#steps input[type=number]", str(args.steps)), ("#seed input", str(SEED)),
                                        ("#guidance input[type=number]", str(GUIDANCE))]:
                    page.fill(selector, value)
                    page.press(selector, "Enter")
                page.click("#run")
                page.wait_for_function("document.querySelector('#status').innerText.includes('Saved to')",
                                       timeout=600_000)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(args.out), full_page=True)
                browser.close()
        finally:
            app.close()
    print(args.out)


if __name__ == "__main__":
    main()
