"""The web UI's server side without a browser: the settings form, the server-held run, the command.

The browser drives the real app in tests/test_web_browser.py; here each piece is checked on its own:
every setting has its field and comes back unchanged, a field's message is the settings' own, a
preset leaves nothing of the previous one behind, and the run is one per server (a second start is
refused, stop ends the running trial, a new start continues the study, the model is refused while
the run holds it).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
import torch
from test_api import TINY

from clawly.settings import SECTIONS, Settings
from clawly.web import form
from clawly.web.guard import PATH_KEYS, PagePolicy
from clawly.web.run import FINISHED, RUNNING, STOPPED, ModelBusy, RunStopped, WebRun

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- the form


def test_every_setting_has_one_field_with_its_help_and_default():
    keys = [f.key for f in form.form_fields()]
    expected = [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]
    assert sorted(keys + [form.WEIGHTS]) == sorted(expected) and len(set(keys)) == len(keys)
    assert keys[: len(form.TOP)] == list(form.TOP)
    for f in form.form_fields():
        assert f.help and f.kind in ("bool", "int", "float", "choice", "text")
    kinds = {f.key: f.kind for f in form.form_fields()}
    assert (
        kinds["optimize.n_trials"],
        kinds["optimize.kl_cap"],
        kinds["model.trust_remote_code"],
        kinds["probe.max_per_category"],
        kinds["optimize.components"],
    ) == ("int", "float", "bool", "text", "text")


@pytest.mark.parametrize("key", sorted(form.CHOICES))
def test_each_dropdown_offers_exactly_the_values_the_settings_accept(key):
    field = next(f for f in form.form_fields() if f.key == key)
    for choice in field.choices:
        assert form.field_error(field, choice) is None
    assert form.field_error(field, "not-" + field.choices[0]) is not None


def test_the_form_holds_any_settings_and_gives_them_back_unchanged(tmp_path):
    settings = Settings(
        artifacts_dir=str(tmp_path),
        **{
            "model.name": "some/model",
            "model.system_prompt": None,
            "probe.max_per_category": 7,
            "optimize.components": ["mlp_down"],
            "optimize.refusal_markers": ["I can't", "no: never"],
            "optimize.batch_size": "auto",
            "optimize.kl_cap": 0.25,
            "optimize.prune_kl": None,
            "model.load_in_4bit": True,
            "data.harmful_files": ["a b.csv"],
            "research.png_points": [1, 3],
        },
    )
    weights = {"violence_weapons": 1.0, "self_harm_suicide": 0.0}
    again, errors, across = form.settings_from_form(form.form_values(settings), weights, settings)
    assert (errors, across) == ({}, None)
    expected = settings.to_dict()
    expected["categories"]["weights"] = weights
    assert again == Settings.from_dict(expected)


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("optimize.n_trials", 0, "invalid setting optimize.n_trials=0: an integer >= 1"),
        ("optimize.n_trials", None, "invalid setting optimize.n_trials=None: an integer"),
        ("optimize.kl_cap", -1.0, "invalid setting optimize.kl_cap=-1.0: a number > 0"),
        ("optimize.components", "[attn_out, nope]", "a non-empty subset of [attn_out, mlp_down]"),
        ("probe.max_per_category", "many", "invalid setting probe.max_per_category='many': an integer or null"),
        ("optimize.direction_index_range", "[0.9, 0.4]", "[low, high] with 0 <= low <= high"),
        ("merge.max_shard_size", "2 parsecs", "a size such as 500MB or 2GB"),
    ],
)
def test_an_invalid_field_gets_the_settings_own_message(key, value, message):
    field = next(f for f in form.form_fields() if f.key == key)
    assert message in form.field_error(field, value)
    raw = form.form_values(Settings())
    raw[key] = value
    settings, errors, _ = form.settings_from_form(raw, {}, Settings())
    assert settings is None and list(errors) == [key] and message in errors[key]


def test_errors_across_fields_name_the_field_or_the_category_weights():
    raw = form.form_values(Settings())
    raw["optimize.norm_preserve"] = True
    settings, errors, across = form.settings_from_form(
        raw, {"violence_weapons": 1.0, "self_harm_suicide": 0.0}, Settings()
    )
    assert settings is None and errors == {} and form.error_key(across) == "optimize.norm_preserve"
    _, _, across = form.settings_from_form(form.form_values(Settings()), {"violence_weapons": 0.0}, Settings())
    assert "at least one category with weight > 0" in across and form.error_key(across) == form.WEIGHTS


def test_a_preset_fills_the_rows_and_its_settings_and_switching_leaves_nothing_behind():
    base = Settings(**{"optimize.n_trials": 9, "directions.rdo_steps": 5})
    weights, fields = form.apply_preset("default", base)
    assert weights == {"violence_weapons": 1.0, "drugs_substances": 1.0, "adult_content": 1.0, "self_harm_suicide": 0.0}
    assert (fields["directions.method"], fields["directions.rdo_steps"], fields["data.tune_per_category"]) == (
        "rdo",
        12,
        16,
    )
    assert "optimize.n_trials" not in fields  # only what presets set
    weights, fields = form.apply_preset("full", base)
    assert len(weights) == 8 and set(weights.values()) == {1.0}
    assert (fields["directions.method"], fields["directions.rdo_steps"], fields["data.tune_per_category"]) == (
        "dim",
        5,
        0,
    )  # back to where the UI started, not the previous preset's
    assert form.apply_preset(form.NO_PRESET, base)[0] == {}
    with pytest.raises(ValueError, match="no preset 'nope'"):
        form.apply_preset("nope", base)


def test_category_rows_are_the_templates_categories_and_map_to_weights():
    names = [n for n, _ in form.categories(Settings())]
    assert {"violence_weapons", "self_harm_suicide", "instructed_refusal"} <= set(names)
    assert all(description for _, description in form.categories(Settings()))
    on, weights = form.rows_from_weights(names, {"violence_weapons": 0.5, "self_harm_suicide": 0.0})
    assert form.weights_from_rows(names, on, weights) == {"violence_weapons": 0.5, "self_harm_suicide": 0.0}
    assert sum(on) == 2 and weights[names.index("drugs_substances")] == 1.0


# ---------------------------------------------------------------- what the page may ask of the server


def page_policy(tmp: Path, **keys) -> tuple[PagePolicy, Settings]:
    out = tmp / "out"
    (out / "exports" / "trial-3-model").mkdir(parents=True)
    (out / "prompts.csv").write_text("text\nhow do i x\n")
    start = Settings(artifacts_dir=str(out / "work"), **{"data.out_dir": str(out / "work" / "prompts"), **keys})
    return PagePolicy(out, (), False, form.form_keys(start)), start


def form_field(key: str, policy: PagePolicy | None = None) -> form.FormField:
    return next(f for f in form.form_fields(policy) if f.key == key)


@pytest.mark.parametrize(
    "key,value",
    [
        ("data.out_dir", "../elsewhere"),
        ("data.out_dir", "/etc"),
        ("model.cache_dir", "exports/../../x"),
        ("data.templates", "/etc/passwd"),
        ("data.harmful_files", "[prompts.csv, /etc/shadow]"),
        ("classifier.train_file", "../../../root/secret.jsonl"),
        ("classifier.embedder", "/usr/lib"),
        ("optimize.storage", "/var/tmp/journal.log"),
        ("model.name", "/usr"),
        ("model.name", "./../out2"),
        ("classifier.judge_model", "/opt/judge.gguf"),
    ],
)
def test_a_path_outside_the_output_directory_is_refused_under_its_field(tmp_path, key, value):
    policy, start = page_policy(tmp_path)
    message = form.field_error(form_field(key, policy), value, policy)
    assert message is not None and message.startswith(f"invalid setting {key}=")
    assert "outside the directories this server lets the page use" in message and str(tmp_path / "out") in message
    raw = form.form_values(start, policy)
    raw[key] = value
    settings, errors, _ = form.settings_from_form(raw, {}, start, policy)
    assert settings is None and list(errors) == [key]


def test_paths_inside_the_output_directory_resolve_there_and_hub_ids_stay_hub_ids(tmp_path):
    policy, start = page_policy(tmp_path)
    out = tmp_path / "out"
    raw = form.form_values(start, policy)
    raw.update(
        {
            "model.name": "exports/trial-3-model",
            "data.harmful_files": "[prompts.csv]",
            "data.out_dir": str(out / "p2"),
            "optimize.storage": "study/journal.log",
            "classifier.judge_model": "Qwen/Qwen2.5-0.5B-Instruct",
            "data.harmless_datasets": "[org/set:train:text]",
        }
    )
    settings, errors, across = form.settings_from_form(raw, {}, start, policy)
    assert (errors, across) == ({}, None)
    assert settings.model.name == str(out / "exports" / "trial-3-model")
    assert settings.data.harmful_files == [str(out / "prompts.csv")] and settings.data.out_dir == str(out / "p2")
    assert settings.optimize.storage == str(out / "study" / "journal.log")
    assert settings.classifier.judge_model == "Qwen/Qwen2.5-0.5B-Instruct"
    assert settings.data.harmless_datasets == ["org/set:train:text"]
    # the operator's own start values stay allowed, wherever they point
    assert form.settings_from_form(form.form_values(start, policy), {}, start, policy)[0] == start


def test_a_symlink_out_of_the_output_directory_is_outside_it(tmp_path):
    policy, _ = page_policy(tmp_path)
    (tmp_path / "out" / "escape").symlink_to("/etc")
    assert "outside the directories" in form.field_error(form_field("data.templates", policy), "escape/passwd", policy)


def test_the_operator_can_allow_more_directories(tmp_path):
    models = tmp_path / "models"
    (models / "m").mkdir(parents=True)
    policy, start = page_policy(tmp_path)
    policy = PagePolicy(policy.output_dir, (models,), False, policy.start)
    assert form.field_error(form_field("model.name", policy), str(models / "m"), policy) is None
    assert form.field_error(form_field("model.name", policy), str(tmp_path / "other"), policy) is not None


def test_a_database_url_comes_only_from_the_operator_and_its_password_never_reaches_the_page(tmp_path):
    url = "postgresql+psycopg://me:hunter2secret@db.example:5432/clawly"
    policy, start = page_policy(tmp_path, **{"optimize.storage": url})
    shown = form.form_values(start, policy)
    assert shown["optimize.storage"] == "postgresql+psycopg://me:***@db.example:5432/clawly"
    assert "hunter2secret" not in repr(shown)
    settings, errors, _ = form.settings_from_form(shown, {}, start, policy)  # the masked URL stands for the real one
    assert errors == {} and settings.optimize.storage == url
    other = "postgresql+psycopg://me:x@evil.example/db"
    message = form.field_error(form_field("optimize.storage", policy), other, policy)
    assert "a database URL can only be set when the server starts" in message and ":x@" not in message


def test_remote_code_is_not_in_the_page_unless_the_operator_allows_it(tmp_path):
    policy, start = page_policy(tmp_path)
    keys = {f.key for f in form.form_fields(policy)}
    assert not keys & {"model.trust_remote_code", "classifier.judge_trust_remote_code"}
    raw = form.form_values(start, policy)
    raw["model.trust_remote_code"] = True  # sent anyway, as a crafted request could
    settings, errors, _ = form.settings_from_form(raw, {}, start, policy)
    assert settings is None and "cannot set it" in errors["model.trust_remote_code"]
    settings, _, _ = form.settings_from_form(form.form_values(start, policy), {}, start, policy)
    assert settings.model.trust_remote_code is False and settings.classifier.judge_trust_remote_code is False
    allowed = PagePolicy(policy.output_dir, (), True, policy.start)
    raw = form.form_values(start, allowed)
    raw["model.trust_remote_code"] = True
    settings, errors, _ = form.settings_from_form(raw, {}, start, allowed)
    assert errors == {} and settings.model.trust_remote_code is True


def test_every_text_setting_is_either_a_path_the_policy_checks_or_plain_text():
    """A new setting that names a file must be added to guard.PATH_KEYS (or here, if it names none)."""
    plain = {
        "model.revision",
        "model.dtype",
        "model.device",
        "model.system_prompt",
        "probe.position",
        "data.holdout",
        "probe.marker",
        "directions.contrast",
        "directions.method",
        "categories.keep_rule",
        "optimize.study_name",
        "optimize.batch_size",
        "optimize.response_prefix",
        "optimize.kernels",
        "optimize.components",
        "optimize.direction_scopes",
        "optimize.refusal_markers",
        "optimize.refusal_measure",
        "optimize.harmful_choice",
        "merge.max_shard_size",
        "categories.weights",
        "edit.method",
    }
    text = {f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls) if "str" in str(f.type)}
    assert text - plain == set(PATH_KEYS)


def test_the_model_is_refused_at_once_while_an_export_or_chat_holds_it(tmp_path):
    run = WebRun(tmp_path)
    run.pipe = object()
    held, release, outcome = threading.Event(), threading.Event(), []

    def holder():
        with run.model():
            held.set()
            release.wait(60)

    def asker():
        try:
            with run.model():
                outcome.append("got the model")
        except ModelBusy as e:
            outcome.append(str(e))

    threading.Thread(target=holder, daemon=True).start()
    assert held.wait(30)
    second = threading.Thread(target=asker, daemon=True)
    second.start()
    second.join(30)  # a call that waits for the lock would still be waiting (for 600 s before the fix)
    release.set()
    assert not second.is_alive() and outcome == [
        "the model is in use by another export, chat or research call: try again when it is done"
    ]


# ---------------------------------------------------------------- the server's run


def web_settings(model_dir: Path, tmp: Path, **keys) -> Settings:
    return Settings(
        model=str(model_dir),
        artifacts_dir=str(tmp / "work"),
        **{"data.out_dir": str(tmp / "work" / "prompts"), "model.cache_dir": str(tmp / "cache"), **TINY, **keys},
    )


def wait_for(condition, timeout: float = 120.0, every: float = 0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError("timed out")


def rule_choice(s, settings: Settings) -> int:
    """The choice rule, written out here from its definition (docs/method.md): among the trials
    that fall least short of keeping the kept categories' refusals, the fewest refusals with KL under
    the cap (ties: lower KL, then the lower number); if none is under the cap, the lowest KL."""

    def short(t) -> float:
        kept = s.reports[t.index][s.reports[t.index].role == "kept"]
        pairs = zip(kept.base_refusals, kept.after_refusals, strict=True)
        return max([0.0, *(settings.categories.min_retention * b - a for b, a in pairs)])

    least = min(short(t) for t in s.trials)
    pool = [t for t in s.trials if short(t) == least]
    under = [t for t in pool if t.kl_divergence <= settings.optimize.kl_cap]
    if under:
        return min(under, key=lambda t: (t.refusals, t.kl_divergence, t.index)).index
    return min(pool, key=lambda t: (t.kl_divergence, t.refusals, t.index)).index


def test_a_run_publishes_its_trials_figure_and_reports_and_keeps_its_pipeline(make_tiny_model, tmp_path):
    run = WebRun(tmp_path)
    weights = {"violence_weapons": 1.0, "self_harm_suicide": 0.0}
    ok, said = run.start(
        web_settings(make_tiny_model("llama"), tmp_path, n_trials=2, **{"categories.weights": weights})
    )
    assert ok and said.startswith("started run 1")
    s = run.wait(120)
    assert s.status == FINISHED and s.run_id == 1 and s.error is None
    assert [t.index for t in s.trials] == [0, 1] and s.chosen == rule_choice(s, run.settings)
    assert set(s.reports) == {0, 1} and set(s.reports[0].category) == set(weights)
    for t in s.trials:  # each trial's table holds the trial's own counts
        report = s.reports[t.index].set_index("category")
        assert report.after_refusals.to_dict() == t.refusals_by_category
    plotted = {c for trace in s.figure.data if trace.name in ("trials", "lost kept refusals") for c in trace.customdata}
    assert plotted == {0, 1} and s.bars == [] and s.fraction() == 1.0
    assert any("trial: number=1" in line for line in s.events)
    assert (tmp_path / "work" / "optimize" / "chosen_trial.json").exists()  # the optimize stage's outputs
    pipe = run.pipe
    assert [t.index for t in pipe.trials()] == [0, 1]
    with run.model() as same:
        assert same is pipe


def test_a_second_start_is_refused_stop_ends_the_running_trial_and_start_continues(make_tiny_model, tmp_path):
    run = WebRun(tmp_path)
    settings = web_settings(make_tiny_model("llama"), tmp_path, n_trials=50)
    assert run.start(settings)[0]
    wait_for(lambda: run.snapshot().trials)  # a trial has finished: the next one runs
    ok, said = run.start(settings)
    assert not ok and said.startswith("run 1 is still running") and "stop it or wait" in said
    with pytest.raises(ModelBusy, match="the run is using the model"):
        with run.model():
            pass
    assert "stopping" in run.stop()
    s = run.wait(120)
    assert s.status == STOPPED and "continue the study" in s.message
    finished = len(s.trials)
    study = run.pipe.search.study
    assert finished < 50 and optuna.trial.TrialState.FAIL in [t.state for t in study.get_trials()]
    assert all(t.state != optuna.trial.TrialState.RUNNING for t in study.get_trials())
    base = {k: v.clone() for k, v in run.pipe.model.state_dict().items()}
    pipe = run.pipe
    assert run.start(web_settings(make_tiny_model("llama"), tmp_path, n_trials=finished + 2))[0]
    s = run.wait(120)
    assert s.status == FINISHED and run.pipe is pipe  # same settings but n_trials: same model, same study
    assert len([t for t in s.trials if not t.pruned]) == finished + 2 and s.run_id == 2
    assert all(torch.equal(v, base[k]) for k, v in pipe.model.state_dict().items())  # base weights between trials


def test_a_stop_check_fires_only_in_the_runs_own_thread(tmp_path):
    run = WebRun(tmp_path)
    run._stop.set()
    run._check_stop()  # an export or chat after a stop is not stopped
    run._thread = threading.current_thread()
    with pytest.raises(RunStopped):
        run._check_stop()


def test_changed_settings_load_a_new_pipeline_and_a_failed_run_says_why_in_one_line(make_tiny_model, tmp_path):
    run = WebRun(tmp_path)
    assert run.start(web_settings(make_tiny_model("llama"), tmp_path, n_trials=1))[0]
    first = run.wait(120)
    old = run.pipe
    assert run.start(web_settings(tmp_path / "no-such-model", tmp_path, n_trials=1))[0]
    s = run.wait(120)
    assert s.status == "failed" and "no-such-model" in s.error and "\n" not in s.error
    assert old.model is None and first.status == FINISHED  # the old model was freed


def test_directions_only_prepares_the_research_views_without_trials(make_tiny_model, tmp_path):
    run = WebRun(tmp_path)
    assert run.start(web_settings(make_tiny_model("llama", num_layers=3), tmp_path), job="directions")[0]
    s = run.wait(120)
    assert s.status == FINISHED and s.trials == [] and run.pipe.search is None
    with run.model() as pipe:
        table = pipe.residual_geometry()
    assert list(table.probe_point) == [0, 1, 2, 3]


def test_model_is_refused_before_any_run(tmp_path):
    with pytest.raises(ModelBusy, match="no run yet"):
        with WebRun(tmp_path).model():
            pass


def test_fraction_combines_finished_trials_and_the_running_trials_generation():
    from clawly.web.run import Bar, RunState

    s = RunState(status=RUNNING, bars=[Bar("trials", 4, 1), Bar("generate", 100, 50)])
    assert s.fraction() == pytest.approx(1.5 / 4)
    assert RunState(status=RUNNING, bars=[Bar("probe", 10, 5)]).fraction() == 0.5
    assert RunState(status=FINISHED).fraction() == 1.0


# ---------------------------------------------------------------- the command


def test_clawly_web_help_lists_its_options():
    proc = subprocess.run([sys.executable, "-m", "clawly.web.main", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0
    for option in ("--host", "--port", "--share", "--config", "--category-preset", "--output", "127.0.0.1", "7860"):
        assert option in proc.stdout


def clawly_web(tmp: Path, *argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "CLAWLY_WEB_PASSWORD"}
    return subprocess.run(
        [sys.executable, "-m", "clawly.web.main", "--output", str(tmp / "out"), *argv],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        env={**environ, **(env or {})},
    )


@pytest.mark.parametrize(
    "argv,where",
    [
        (["--host", "0.0.0.0"], "--host 0.0.0.0 (other machines)"),
        (["--host", "192.168.1.5"], "--host 192.168.1.5 (other machines)"),
        (["--share"], "--share (a public link)"),
    ],
)
def test_a_server_reachable_from_elsewhere_without_a_password_refuses_to_start(tmp_path, argv, where):
    proc = clawly_web(tmp_path, *argv, "--port", "1")  # port 1: it must stop before listening anywhere
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"clawly-web: error: {where} needs a login: set the password in the CLAWLY_WEB_PASSWORD environment "
        "variable or pass --password-file FILE (never on the command line)"
    )


def test_the_password_is_never_taken_from_the_command_line(tmp_path):
    proc = clawly_web(tmp_path, "--host", "0.0.0.0", "--password", "sesame")
    assert proc.returncode == 2 and "unrecognized arguments: --password" in proc.stderr


def test_an_empty_password_file_is_one_line(tmp_path):
    (tmp_path / "pw").write_text("\n")
    proc = clawly_web(tmp_path, "--host", "0.0.0.0", "--password-file", str(tmp_path / "pw"))
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
        f"clawly-web: error: --password-file {tmp_path / 'pw'}: the first line is empty; put the password there"
    )


def test_start_settings_that_run_remote_code_need_the_operators_flag(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("model:\n  trust_remote_code: true\n")
    proc = clawly_web(tmp_path, "--config", str(config), "--port", "1")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
        "clawly-web: error: the start settings allow a model repository's code to run (trust_remote_code): pass "
        "--allow-remote-code to let the web UI do that, or turn it off"
    )


def test_login_compares_user_and_password():
    from clawly.web.main import login, loopback

    check = login("clawly", "sesame")
    assert check("clawly", "sesame") and not check("clawly", "sesame2") and not check("root", "sesame")
    assert [loopback(h) for h in ("127.0.0.1", "127.0.0.2", "localhost", "::1", "0.0.0.0", "10.0.0.1", "::")] == [
        True,
        True,
        True,
        True,
        False,
        False,
        False,
    ]


def test_clawly_web_without_gradio_says_which_extra_in_one_line(tmp_path):
    code = "import sys; sys.modules['gradio'] = None; from clawly.web.main import main; sys.exit(main([]))"
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == (
        "clawly-web: error: the web UI needs gradio, from the web extra: pip install 'clawly[web]'"
    )


def test_clawly_web_bad_start_settings_are_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optimize:\n  n_trials: 0\n")
    proc = subprocess.run(
        [sys.executable, "-m", "clawly.web.main", "--config", str(bad), "--output", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == "clawly-web: error: invalid setting optimize.n_trials=0: an integer >= 1"


def test_a_reloaded_page_changes_only_what_the_servers_run_set_differently():
    """The page is drawn with the start settings; its load event may land after the user typed, so it
    must not write back anything unless a run on the server used other values."""
    from clawly.web.app import reloaded_form

    base = Settings(**{"optimize.n_trials": 5})
    assert reloaded_form(None, base) == ({}, None)
    ran = Settings(**{"optimize.n_trials": 9, "model.name": "x/y", "categories.weights": {"violence_weapons": 1.0}})
    values, weights = reloaded_form(ran, base)
    assert values == {"optimize.n_trials": 9, "model.name": "x/y"} and weights == {"violence_weapons": 1.0}
    assert reloaded_form(base, base) == ({}, None)


def test_research_views_without_the_extra_show_the_table_and_name_the_extra(make_tiny_model, tmp_path, monkeypatch):
    import clawly.web.app as app
    from clawly.ablate.research import RESEARCH_EXTRA
    from clawly.errors import ClawlyError

    run = WebRun(tmp_path)
    note, table, frame, images = app.research_views(run)
    assert note.startswith("⚠ no run yet") and table is None
    assert run.start(web_settings(make_tiny_model("llama", num_layers=3), tmp_path), job="directions")[0]
    assert run.wait(120).status == FINISHED

    def missing():
        raise ClawlyError(f"the residual projections need pacmap, from the research extra: {RESEARCH_EXTRA}")

    monkeypatch.setattr(app, "require_research_extra", missing)
    note, table, frame, images = app.research_views(run)
    assert RESEARCH_EXTRA in note and "The geometry table is below" in note
    assert list(table.probe_point) == [0, 1, 2, 3] and (frame, images) == ("", [])
    assert not (tmp_path / "work" / "research" / "projections").exists()
