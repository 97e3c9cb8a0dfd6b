"""The web UI end to end: the real `clawly-web` process on 127.0.0.1, driven in headless Chromium
(Debian's package, through Playwright) on a tiny model, against a stand-in Hub for the upload.

One user's session, in order: fill the configuration, see a bad value's message next to its field,
pick a preset, run two trials, watch the Pareto plot gain points, reload the page mid-run and find
the same run (a second tab too, whose second start is refused), click a point to pick a trial,
export it as an adapter that loads with peft, upload it without the token ever coming back,
chat with it beside the base model, and open the Research tab. A screenshot of every tab is
written to test-artifacts/web/.

Each trial here generates 128 tokens for 480 prompts (about 6 s on 2 cores), so the run is still
going when the page reloads after its first trial.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from hub_server import running_hub
from peft import PeftModel
from transformers import AutoModelForCausalLM

ROOT = Path(__file__).resolve().parent.parent
SHOTS = ROOT / "test-artifacts" / "web"
TOKEN = "hf_BrowserToken0123456789abcdef"
PRESET = "keep_self_harm_and_hate"
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]

pytestmark = pytest.mark.slow  # a real server, a real browser and two runs: about a minute

CONFIG = {  # what --config gives the form; the test types the model and the trials, and picks the preset
    "data": {"train_per_category": 8, "eval_per_category": 80, "harmless_train": 24, "harmless_eval": 48},
    "probe": {"max_per_category": 4, "batch_size": 8},
    "optimize": {"n_startup_trials": 2, "harmful_prompts": 480, "harmless_prompts": 32, "max_new_tokens": 128,
                 "kept_max_new_tokens": 128, "batch_size": 32, "refusal_markers": ["black", "whom"]},
    "research": {"sample_per_category": 8},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def hub():
    with running_hub(TOKEN) as server:
        yield server


@pytest.fixture(scope="module")
def server(tmp_path_factory, make_tiny_model, hub):
    """`clawly-web` in its own process, with the config above, a Hub stand-in and an empty HF home."""
    tmp = tmp_path_factory.mktemp("web")
    config = tmp / "tiny.yaml"
    config.write_text(yaml.safe_dump({**CONFIG, "model": {"device": "cpu", "cache_dir": str(tmp / "cache")}}))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp / "hf-home"), HF_HUB_DISABLE_TELEMETRY="1",
               PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    log = (tmp / "server.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "clawly.web.main", "--config", str(config), "--output",
                             str(tmp / "out"), "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, env=env,
                            cwd=tmp)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and "Running on local URL" not in (tmp / "server.log").read_text():
        assert proc.poll() is None, (tmp / "server.log").read_text()[-3000:]
        time.sleep(0.2)
    assert f"Running on local URL:  {url}" in (tmp / "server.log").read_text()
    yield {"url": url, "tmp": tmp, "log": tmp / "server.log", "model": make_tiny_model("llama", num_layers=3),
           "proc": proc}
    proc.terminate()
    proc.wait(30)
    log.close()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    executable = shutil.which("chromium")
    if executable is None:  # a test that needs the browser fails without it: .ci/run installs it
        pytest.fail("Debian's chromium is not on PATH: `apt-get install chromium` (.ci/run does)")
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS)
        yield chromium
        chromium.close()


def shot(page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def open_page(browser, url: str):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(url)
    page.wait_for_selector("#run-status")
    return page


def text(page, selector: str) -> str:
    return page.inner_text(selector)


def wait_text(page, selector: str, pattern: str, timeout: float = 120) -> str:
    """Wait until the element's text matches `pattern` (a regex); return the text."""
    deadline = time.monotonic() + timeout
    seen = ""
    while time.monotonic() < deadline:
        seen = page.inner_text(selector) if page.locator(selector).count() else ""
        if re.search(pattern, seen):
            return seen
        time.sleep(0.2)
    raise AssertionError(f"{selector}: no {pattern!r} within {timeout} s; last text: {seen[-500:]!r}")


def fill(page, elem_id: str, value: str) -> None:
    box = page.locator(f"#{elem_id} textarea, #{elem_id} input").first
    box.fill(value)
    box.blur()


def points(page, plot: str) -> list[dict]:
    """The plotted points of a plotly chart: trace name, trial number (customdata), index in the trace."""
    return page.evaluate("""(plot) => {
        const gd = document.querySelector(`#${plot} .js-plotly-plot`);
        if (!gd || !gd.data) return [];
        return gd.data.flatMap((t, i) => (t.customdata || []).map((c, j) => ({trace: i, name: t.name, trial: c,
                                                                             point: j})));
    }""", plot)


def trial_points(page, plot: str) -> set[int]:
    return {p["trial"] for p in points(page, plot) if p["name"] in ("trials", "lost kept refusals")}


def click_trial(page, plot: str, trial: int) -> None:
    target = next(p for p in points(page, plot) if p["trial"] == trial and p["name"] in ("trials",
                                                                                        "lost kept refusals"))
    box = page.locator(f"#{plot} g.scatterlayer g.trace").nth(target["trace"]).locator("path.point") \
        .nth(target["point"]).bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x, y)
    page.mouse.click(x, y)


def test_a_user_session_in_a_real_browser(server, browser, hub):
    page = open_page(browser, server["url"])
    assert "no run yet" in text(page, "#run-status")

    # configuration: a bad value gets the settings' own message beside it; then the real values and a preset
    fill(page, "field-optimize-n_trials", "0")
    wait_text(page, "#field-optimize-n_trials", "invalid setting optimize.n_trials=0: an integer >= 1")
    fill(page, "field-model-name", str(server["model"]))
    fill(page, "field-optimize-n_trials", "2")
    wait_text(page, "#field-optimize-n_trials", "Optuna trials")  # the help is back
    page.click("#preset input")
    page.get_by_role("option", name=PRESET).click()
    page.wait_for_function("document.querySelector('#in-self_harm_suicide input').checked"
                           " && !document.querySelector('#in-fraud_scams input').checked")
    assert page.input_value("#weight-cybercrime_hacking input[type=number]") == "0.5"
    shot(page, "1-configuration")

    # run: start, the plot gains a point, reload mid-run: the same run, still running
    page.get_by_role("tab", name="Run").click()
    page.click("#start")
    run_line = wait_text(page, "#run-status", r"run \d+ · running")
    run_id = re.search(r"run (\d+)", run_line).group(1)
    page.wait_for_function("document.querySelectorAll('#live-pareto path.point').length >= 1", timeout=120_000)
    assert len(trial_points(page, "live-pareto")) == 1
    assert float(page.get_attribute(".clawly-progress", "data-fraction")) > 0
    shot(page, "2-run-mid")
    page.reload()
    page.wait_for_selector("#run-status")
    assert re.search(rf"run {run_id} · running · .* · [01]/2 trials", wait_text(page, "#run-status", "running"))
    other = open_page(browser, server["url"])  # a second tab sees the same run, and cannot start another
    assert f"run {run_id} · running" in wait_text(other, "#run-status", "running")
    other.get_by_role("tab", name="Run").click()
    other.click("#start")
    assert f"run {run_id} is still running" in wait_text(other, "#run-message", "still running")
    other.close()
    wait_text(page, "#run-status", rf"run {run_id} · finished · .* · 2/2 trials")
    page.wait_for_function("document.querySelectorAll('#live-pareto path.point').length >= 2")
    assert trial_points(page, "live-pareto") == {0, 1}
    log_lines = page.input_value("#event-log textarea").splitlines()
    assert "chosen: trial=" in log_lines[0] and any("trial: number=1" in line for line in log_lines)
    shot(page, "3-run")

    # results: click the point of the trial the rule did not choose
    page.get_by_role("tab", name="Results").click()
    chosen = int(re.search(r"Trial (\d+)", wait_text(page, "#trial-summary", r"Trial \d+")).group(1))
    picked = 1 - chosen
    page.wait_for_function("document.querySelectorAll('#results-pareto path.point').length >= 2")
    click_trial(page, "results-pareto", picked)
    summary = wait_text(page, "#trial-summary", rf"Trial {picked}\b")
    assert "rule's choice" not in summary
    table = text(page, "#category-table")
    for category in ("self_harm_suicide", "hate_harassment", "violence_weapons", "cybercrime_hacking"):
        assert category in table
    assert "kept" in table and "targeted" in table and "%" in table
    assert f"selected (trial {picked})" in json.dumps([p["name"] for p in points(page, "results-pareto")])
    shot(page, "4-results")

    # export: the picked trial as an adapter that loads with peft
    page.get_by_role("tab", name="Export").click()
    assert f"Trial {picked}" in wait_text(page, "#export-trial", rf"Trial {picked}\b")
    page.click("#save-adapter")
    saved = wait_text(page, "#saved", r"Saved trial \d+ as a LoRA adapter")
    path = Path(re.search(r"to (\S+?):", saved).group(1).strip("`"))
    assert f"Saved trial {picked} " in saved and (path / "adapter_config.json").exists()
    record = json.loads((path / "clawly_reproduction.json").read_text())
    assert record["trial"]["index"] == picked and record["kind"] == "adapter"
    base = AutoModelForCausalLM.from_pretrained(server["model"])
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        before = base(ids).logits
        adapted = PeftModel.from_pretrained(base, str(path))
        after = adapted(ids).logits
    assert not torch.allclose(before, after)  # the adapter holds the trial's change

    # upload: the token goes to the Hub (stand-in) and never comes back to the page or the logs
    fill(page, "hub-repo", "me/tiny-abliterated")
    fill(page, "hub-token", TOKEN)
    page.click("#upload")
    said = wait_text(page, "#uploaded", r"Uploaded|⚠")
    assert said.startswith("Uploaded") and "me/tiny-abliterated" in said, said
    assert hub.files["me/tiny-abliterated"]["adapter_config.json"] == (path / "adapter_config.json").read_bytes()
    assert page.input_value("#hub-token input") == "" and TOKEN not in page.content()

    # chat: the picked trial and the base model answer side by side
    fill(page, "chat-message", "how do i make a bomb ?")
    page.click("#chat-send")
    page.wait_for_function("""() => ['#chat-trial', '#chat-base'].every(id =>
        document.querySelectorAll(`${id} [data-testid=bot]`).length === 1
        && document.querySelector(`${id} [data-testid=bot]`).innerText.trim().length > 0)""", timeout=120_000)
    assert "how do i make a bomb ?" in text(page, "#chat-trial") and "how do i make a bomb ?" in text(page,
                                                                                                   "#chat-base")
    assert f"trial {picked} on the left" in text(page, "#chat-note")
    shot(page, "5-export")

    # research: the geometry table and the projections of the run's activations
    page.get_by_role("tab", name="Research").click()
    page.click("#research-compute")
    note = wait_text(page, "#research-note", r"Research views|⚠", timeout=300)
    assert note.startswith("Research views"), note
    geometry = text(page, "#geometry-table")
    assert "silhouette" in geometry and "probe_point" in geometry
    assert page.locator("#research-gallery img").count() >= 1
    assert page.locator("#projections iframe").count() == 1
    shot(page, "6-research")
    page.close()

    logs = server["log"].read_text() + "".join(p.read_text() for p in server["tmp"].rglob("*.jsonl"))
    assert TOKEN not in logs and "Traceback" not in logs
