"""The web UI end to end: the real `clawly-web` process on 127.0.0.1, driven in headless Chromium
(Debian's package, through Playwright) on a tiny model, against a stand-in Hub for the upload.

The server runs as an operator would expose it: a login (the password from CLAWLY_WEB_PASSWORD), the
tiny models' directory allowed with --allow-path, no remote code. One user's session, in order: log in
(a wrong password is refused), find no remote-code field, see a path outside the allowed directories
refused under its field, fill the configuration, see a bad value's message next to its field,
pick a preset, run three trials, watch the Pareto plot gain points, reload the page mid-run and find
the same run (a second tab too, whose second start is refused), click a point to pick a trial,
export it as an adapter that loads with peft, upload it without the token ever coming back,
chat with it beside the base model, and open the Research tab. A screenshot of every tab is
written to test-artifacts/web/.


Each trial here generates 128 tokens for 480 prompts (about 6 s on an idle 2-core machine, several
times that on a loaded one), and three trials run, so the run is still going when the page reloads
after its first trial.
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

import pandas as pd
import pytest
import torch
import yaml
from hub_server import running_hub
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from clawly.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
SHOTS = ROOT / "test-artifacts" / "web"
TOKEN = "hf_BrowserToken0123456789abcdef"
PRESET = "keep_self_harm_and_hate"
PASSWORD = "browser-" + os.urandom(8).hex()
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

pytestmark = [pytest.mark.slow, pytest.mark.browser]  # a real server, a real browser, two runs: about a minute

CONFIG = {  # what --config gives the form; the test types the model and the trials, and picks the preset
    "data": {"train_per_category": 8, "eval_per_category": 80, "harmless_train": 24, "harmless_eval": 48},
    "probe": {"max_per_category": 4, "batch_size": 8},
    "optimize": {
        "n_startup_trials": 2,
        "harmful_prompts": 480,
        "harmless_prompts": 32,
        "max_new_tokens": 128,
        "kept_max_new_tokens": 128,
        "batch_size": 32,
        "refusal_markers": ["black", "whom"],
    },
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
    env.update(
        HF_ENDPOINT=hub.url,
        HF_HOME=str(tmp / "hf-home"),
        HF_HUB_DISABLE_TELEMETRY="1",
        PYTHONPATH=str(ROOT),
        PYTHONUNBUFFERED="1",
        CLAWLY_WEB_PASSWORD=PASSWORD,
    )
    log = (tmp / "server.log").open("w")
    model = make_tiny_model("llama", num_layers=3)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "clawly.web.main",
            "--config",
            str(config),
            "--output",
            str(tmp / "out"),
            "--port",
            str(port),
            "--allow-path",
            str(model.parent),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=tmp,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and "Running on local URL" not in (tmp / "server.log").read_text():
        assert proc.poll() is None, (tmp / "server.log").read_text()[-3000:]
        time.sleep(0.2)
    assert f"Running on local URL:  {url}" in (tmp / "server.log").read_text()
    yield {"url": url, "tmp": tmp, "log": tmp / "server.log", "model": model, "proc": proc}
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


def log_in(page, password: str = PASSWORD) -> None:
    page.get_by_role("button", name="Login").wait_for(timeout=60_000)
    page.get_by_label("username").fill("clawly")
    page.get_by_label("password").fill(password)
    page.get_by_role("button", name="Login").click()


def open_page(browser, url: str):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(url)
    log_in(page)
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
    return page.evaluate(
        """(plot) => {
        const gd = document.querySelector(`#${plot} .js-plotly-plot`);
        if (!gd || !gd.data) return [];
        return gd.data.flatMap((t, i) => (t.customdata || []).map((c, j) => ({trace: i, name: t.name, trial: c,
                                                                             point: j})));
    }""",
        plot,
    )


def trial_points(page, plot: str) -> set[int]:
    return {p["trial"] for p in points(page, plot) if p["name"] in ("trials", "lost kept refusals")}


def click_trial(page, plot: str, trial: int) -> None:
    target = next(
        p for p in points(page, plot) if p["trial"] == trial and p["name"] in ("trials", "lost kept refusals")
    )
    box = (
        page.locator(f"#{plot} g.scatterlayer g.trace")
        .nth(target["trace"])
        .locator("path.point")
        .nth(target["point"])
        .bounding_box()
    )
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x, y)
    page.mouse.click(x, y)


def table_rows(page, elem_id: str, timeout: float = 60) -> list[list[str]]:
    """The body rows of a Dataframe component, each as its cells' texts, once it shows some."""
    deadline = time.monotonic() + timeout
    while True:
        rows = page.evaluate(
            """(id) => {  // Gradio 6 draws cells as grid cells (its <table> only measures)
            const rows = [];
            for (const cell of document.querySelectorAll(`#${id} [role=gridcell]`)) {
                const r = +cell.dataset.row, c = +cell.dataset.col;
                (rows[r] = rows[r] || [])[c] = cell.innerText.trim();
            }
            return rows.filter(Boolean);
        }""",
            elem_id,
        )
        if (rows and all(r and r[0] for r in rows)) or time.monotonic() > deadline:
            return rows
        time.sleep(0.2)


def greedy_reply(model_dir: Path, adapter: Path | None, message: str, max_new_tokens: int) -> str:
    """What plain transformers (and peft) answer, greedily, with the settings' default system prompt."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    messages = [{"role": "system", "content": Settings().model.system_prompt}, {"role": "user", "content": message}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
    return " ".join(tokenizer.decode(out[0, ids.input_ids.shape[1] :], skip_special_tokens=True).split())


def test_a_user_session_in_a_real_browser(server, browser, hub):
    # the login page first: a wrong password stays there
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(server["url"])
    page.get_by_role("button", name="Login").wait_for(timeout=60_000)
    assert page.locator("#run-status").count() == 0 and "log in with the user and password" in text(page, "body")
    shot(page, "0-login")
    log_in(page, "not-" + PASSWORD)
    wait_text(page, "body", "Incorrect Credentials")
    assert page.locator("#run-status").count() == 0
    log_in(page)
    page.wait_for_selector("#run-status")
    assert "no run yet" in text(page, "#run-status")

    # what the operator did not open is not in the page: no remote code, no path outside the allowed dirs
    for key in ("model-trust_remote_code", "classifier-judge_trust_remote_code"):
        assert page.locator(f"#field-{key}").count() == 0
    fill(page, "field-model-name", "/usr/lib")
    wait_text(
        page,
        "#field-model-name",
        r"invalid setting model.name='/usr/lib': outside the directories this "
        r"server lets the page use",
    )
    fill(page, "field-model-name", "../../../etc")
    wait_text(page, "#field-model-name", "outside the directories this server lets the page use")
    page.get_by_role("tab", name="Run").click()
    page.click("#start")  # refused: the configuration says why, nothing starts
    wait_text(page, "#config-message", "fix the marked settings: model.name")
    assert "no run yet" in text(page, "#run-status")

    # configuration: a bad value gets the settings' own message beside it; then the real values and a preset
    fill(page, "field-optimize-n_trials", "0")
    wait_text(page, "#field-optimize-n_trials", "invalid setting optimize.n_trials=0: an integer >= 1")
    fill(page, "field-model-name", str(server["model"]))
    fill(page, "field-optimize-n_trials", "3")  # two still to go after the first: time to reload mid-run
    wait_text(page, "#field-optimize-n_trials", "Optuna trials")  # the help is back
    page.click("#preset input")
    page.get_by_role("option", name=PRESET).click()
    page.wait_for_function(
        "document.querySelector('#in-self_harm_suicide input').checked"
        " && !document.querySelector('#in-fraud_scams input').checked"
    )
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
    assert re.search(rf"run {run_id} · running · .* · [012]/3 trials", wait_text(page, "#run-status", "running"))
    other = open_page(browser, server["url"])  # a second tab sees the same run, and cannot start another
    assert f"run {run_id} · running" in wait_text(other, "#run-status", "running")
    other.get_by_role("tab", name="Run").click()
    other.click("#start")
    assert f"run {run_id} is still running" in wait_text(other, "#run-message", "still running")
    other.close()
    wait_text(page, "#run-status", rf"run {run_id} · finished · .* · 3/3 trials")
    page.wait_for_function("document.querySelectorAll('#live-pareto path.point').length >= 3")
    assert trial_points(page, "live-pareto") == {0, 1, 2}
    log_lines = page.input_value("#event-log textarea").splitlines()
    assert "chosen: trial=" in log_lines[0] and any("trial: number=1" in line for line in log_lines)
    shot(page, "3-run")

    # results: click the point of the trial the rule did not choose
    page.get_by_role("tab", name="Results").click()
    chosen = int(re.search(r"Trial (\d+)", wait_text(page, "#trial-summary", r"Trial \d+")).group(1))
    picked = min({0, 1, 2} - {chosen})
    page.wait_for_function("document.querySelectorAll('#results-pareto path.point').length >= 3")
    click_trial(page, "results-pareto", picked)
    summary = wait_text(page, "#trial-summary", rf"Trial {picked}\b")
    assert "rule's choice" not in summary
    # the per-category table shows the picked trial's counts as the study recorded them (trials.parquet)
    # and the base model's (the optimize report), with the kept categories' retention after / base
    rows = {r[0]: r for r in table_rows(page, "category-table")}
    work = server["tmp"] / "out" / "work"
    recorded = pd.read_parquet(work / "optimize" / "trials.parquet").set_index("trial").loc[picked]
    report = json.loads((work / "reports" / "optimize.json").read_text())["by_category"]
    assert set(rows) == set(report) and {"self_harm_suicide", "hate_harassment"} <= set(rows)
    for category, row in rows.items():
        _, role, _, prompts, base, after, retention = row
        assert role == report[category]["role"] and int(prompts) == report[category]["prompts"]
        assert int(base.split(" · ")[0]) == report[category]["base_refusals"]
        assert int(after.split(" · ")[0]) == recorded[f"refusals.{category}"]
        if role == "kept" and report[category]["base_refusals"]:
            assert retention == f"{100 * recorded[f'refusals.{category}'] / report[category]['base_refusals']:.0f}%"
    assert {r[1] for r in rows.values()} == {"kept", "targeted"}
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
    page.wait_for_function(
        """() => ['#chat-trial', '#chat-base'].every(id =>
        document.querySelectorAll(`${id} [data-testid=bot]`).length === 1
        && document.querySelector(`${id} [data-testid=bot]`).innerText.trim().length > 0)""",
        timeout=120_000,
    )
    assert "how do i make a bomb ?" in text(page, "#chat-trial") and "how do i make a bomb ?" in text(
        page, "#chat-base"
    )
    # each side is its model's own greedy answer: the exported adapter merged by peft, and the base
    replies = [" ".join(page.inner_text(f"{side} [data-testid=bot]").split()) for side in ("#chat-trial", "#chat-base")]
    expected = [
        greedy_reply(server["model"], path if side == 0 else None, "how do i make a bomb ?", 256) for side in (0, 1)
    ]
    assert replies == expected
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
