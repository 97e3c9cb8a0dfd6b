"""The web UI's screenshots (docs/doors/web.md, docs/images/): a real run on the packaged default model,
driven in Debian's chromium like a user would (pick a preset, set the trials, start, watch, pick, chat).

    python examples/web_screenshots.py [--trials 16] [--preset default] [--out docs/images]

Starts `clawly-web` on a free port with the demo's probe budget (32 train prompts per category),
waits for the run to finish, and writes web-run.png, web-results.png, web-export.png and
web-research.png. With the default preset (RDO directions, 12 steps for each of three categories)
about 45 minutes on 2 CPU cores; the first GGUF conversion adds one or two.
"""

from __future__ import annotations

import argparse
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from playwright.sync_api import sync_playwright

FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def wait_text(page, selector: str, pattern: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen = page.inner_text(selector)
        if re.search(pattern, seen):
            return seen
        time.sleep(1)
    raise TimeoutError(f"{selector}: no {pattern!r} in {timeout} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--preset", default="default")
    parser.add_argument("--out", default="docs/images")
    parser.add_argument("--work", default=None, help="OUTPUT of clawly-web [default: a temp dir]")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work or tempfile.mkdtemp(prefix="clawly-web-"))
    config = work / "demo.yaml"
    work.mkdir(parents=True, exist_ok=True)
    config.write_text("probe:\n  max_per_category: 32\n")  # the DVC demo's CPU budget (clawly/conf/config.yaml)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = (work / "server.log").open("w")
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "clawly.web.main",
            "--config",
            str(config),
            "--output",
            str(work / "out"),
            "--port",
            str(port),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        while "Running on local URL" not in (work / "server.log").read_text():
            if server.poll() is not None:
                raise SystemExit((work / "server.log").read_text())
            time.sleep(0.5)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=FLAGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"http://127.0.0.1:{port}")
            page.wait_for_selector("#run-status")
            time.sleep(2)  # the page's load event
            page.click("#preset input")
            page.get_by_role("option", name=args.preset).click()
            box = page.locator("#field-optimize-n_trials input")
            box.fill(str(args.trials))
            box.blur()
            time.sleep(1)
            page.get_by_role("tab", name="Run").click()
            page.click("#start")
            t0 = time.monotonic()
            wait_text(page, "#run-status", r"· (finished|failed|stopped) ·", timeout=7200)
            print(f"run: {time.monotonic() - t0:.0f} s; {page.inner_text('#run-status')}")
            time.sleep(2)
            page.screenshot(path=str(out / "web-run.png"), full_page=True)
            page.get_by_role("tab", name="Results").click()
            time.sleep(3)
            page.screenshot(path=str(out / "web-results.png"), full_page=True)
            page.get_by_role("tab", name="Export").click()
            box = page.locator("#chat-message textarea")
            box.fill("How do I pick a lock?")
            page.click("#chat-send")
            t0 = time.monotonic()
            answer, still = "", 0
            while still < 8:  # the trial answers first, then the base model: wait until the base stops growing
                time.sleep(1)
                bots = page.locator("#chat-base [data-testid=bot]")
                now = bots.first.inner_text() if bots.count() else ""
                still = still + 1 if now and now == answer else 0
                answer = now
            print(f"chat: {time.monotonic() - t0:.0f} s")
            page.screenshot(path=str(out / "web-export.png"), full_page=True)
            page.get_by_role("tab", name="Research").click()
            page.click("#research-compute")
            wait_text(page, "#research-note", r"Research views|⚠", timeout=1800)
            time.sleep(3)
            page.screenshot(path=str(out / "web-research.png"), full_page=True)
            browser.close()
    finally:
        server.terminate()
        server.wait(60)
        log.close()
    print(f"screenshots in {out}; server log and outputs in {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
