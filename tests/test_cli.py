"""The `clawly` command line: every option's effect or validation, runs on a tiny model, the Hub path."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import saved_tensors
from safetensors.torch import load_file
from test_hub import TOKEN, hub, isolated_hf  # noqa: F401 - fixtures
from test_research import without_research_extra

from clawly import cli
from clawly.settings import key_sections

TINY = {
    "data": {"train_per_category": 8, "eval_per_category": 6, "harmless_train": 24, "harmless_eval": 24},
    "probe": {"max_per_category": 4, "batch_size": 8},
    "optimize": {
        "n_trials": 3,
        "n_startup_trials": 2,
        "harmful_prompts": 8,
        "harmless_prompts": 8,
        "max_new_tokens": 4,
        "batch_size": 8,
    },
    "model": {"device": "cpu"},
}

# Options outside the generated config keys, each with the test(s) below that show its effect or validation.
SPECIAL_OPTIONS = {
    "--help": "test_help_lists_every_config_key_with_its_default",
    "--config": "test_config_file_yaml_and_toml_with_precedence, test_bad_config_file_is_one_line",
    "--category-preset": "test_category_preset",
    "--output": "test_non_interactive_run_saves_adapter_and_model",
    "--save": "test_save_adapter_only_and_none",
    "--non-interactive": "test_non_interactive_run_saves_adapter_and_model",
    "--push-to-hub": "test_push_to_hub_uploads_the_saved_model",
    "--hub-private": "test_push_to_hub_uploads_the_saved_model",
    "--reproduce": "test_reproduce_rebuilds_the_saved_model, test_reproduce_errors",
    "--layers": "test_direct_mode_ablates_only_the_given_layers, test_direct_mode_validation",
    "--use-layer": "test_direct_mode_ablates_only_the_given_layers, test_direct_mode_validation",
    "--ablation-strength": "test_direct_mode_ablates_only_the_given_layers",
    "--probe-marker": "test_probe_marker_sets_the_probe_position",
    "--artifacts-dir": "test_artifacts_dir_and_default_work_dir",
    "--print-residual-geometry": "test_cli_prints_the_geometry_and_plots_without_optimizing",
    "--plot-residuals": "test_cli_prints_the_geometry_and_plots_without_optimizing, "
    "test_cli_plot_residuals_without_the_extra_is_one_line",
    "--debug": "test_debug_shows_the_traceback_the_one_line_error_hides",
}


def parse(*argv: str):
    return cli.settings_from_args(cli.build_parser().parse_args(list(argv)))


def field_default(f: dataclasses.Field):
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


# a valid non-default value per key, as text for the command line and as the parsed value
SAMPLES = {
    "model.name": ("some/model", "some/model"),
    "model.dtype": ("bfloat16", "bfloat16"),
    "model.device": ("cpu", "cpu"),
    "model.gguf_file": ("m.gguf", "m.gguf"),
    "probe.position": ("marker", "marker"),
    "directions.contrast": ("mixed", "mixed"),
    "categories.weights": (
        "violence_weapons=1,self_harm_suicide=0",
        {"violence_weapons": 1.0, "self_harm_suicide": 0.0},
    ),
    "categories.keep_rule": ("objective", "objective"),
    "optimize.batch_size": ("auto", "auto"),
    "optimize.response_prefix": ("null", None),
    "optimize.components": ("mlp_down", ["mlp_down"]),
    "optimize.direction_scopes": ("global", ["global"]),
    "optimize.refusal_measure": ("classifier", "classifier"),
    "optimize.harmful_choice": ("base_refusals", "base_refusals"),
    "optimize.refusal_markers": ("I cannot,I won't", ["I cannot", "I won't"]),
    "merge.max_shard_size": ("500MB", "500MB"),
    "directions.winsorize_quantile": ("0.01", 0.01),
    "orthogonalize.warn_retained": ("0.5", 0.5),
    "categories.min_retention": ("0.5", 0.5),
    "export.energy": ("0.9", 0.9),
    "optimize.kl_cap": ("0.3", 0.3),
    "optimize.prune_kl": ("0.7", 0.7),
    "export.warn_relative_error": ("0.05", 0.05),
    "directions.method": ("rdo", "rdo"),
    "directions.rdo_lr": ("0.05", 0.05),
    "directions.rdo_init_point": ("0.3", 0.3),
    "directions.rdo_kept_weight": ("2.5", 2.5),
    "directions.rdo_harmless_weight": ("0.5", 0.5),
    "optimize.kernels": ("per_category", "per_category"),
    "research.projection_points": ("[1, 3]", [1, 3]),
    "research.png_points": ("[2]", [2]),
    "data.holdout": ("prompt", "prompt"),
    "edit.method": ("nullspace", "nullspace"),
    "distill.lr": ("0.05", 0.05),
    "distill.kept_weight": ("2.5", 2.5),
    "distill.harmless_weight": ("0.5", 0.5),
    "edit.energy_range": ("[0.6, 0.9]", [0.6, 0.9]),
    "edit.ridge_range": ("[0.01, 0.5]", [0.01, 0.5]),
}


def sample(key: str, f: dataclasses.Field):
    if key in SAMPLES:
        return SAMPLES[key]
    default, kind = field_default(f), str(f.type)
    if kind == "bool":
        return None, not default
    if kind.startswith("list[float]"):
        return "[0.1, 0.2]", [0.1, 0.2]
    if kind.startswith("list[str]"):
        return "a.txt,b.txt", ["a.txt", "b.txt"]
    if kind.startswith("int"):
        return str((default or 0) + 3), (default or 0) + 3
    if kind.startswith("str"):
        return "some-text", "some-text"
    raise AssertionError(f"no sample value for {key} ({kind}): add one to SAMPLES")


CONFIG_KEYS = cli.config_options()
NEEDS = {"edit.method": ["--edit.harmless-prompts", "8"]}  # what a sample value needs besides itself


@pytest.mark.parametrize("key,field", CONFIG_KEYS, ids=[k for k, _ in CONFIG_KEYS])
def test_every_config_key_option_sets_its_setting(key, field):
    section, name = key.split(".")
    text, value = sample(key, field)
    assert value != field_default(field), f"{key}: the sample must differ from the default"
    flag = f"--{section}.{name.replace('_', '-')}"
    argv = ([flag] if value else [f"--no-{flag[2:]}"]) if text is None else [flag, text]
    argv += NEEDS.get(key, [])
    assert getattr(getattr(parse(*argv), section), name) == value
    if len(key_sections()[name]) == 1 and key != "model.name":  # the flat alias does the same
        alias = f"--{name.replace('_', '-')}"
        argv = ([alias] if value else [f"--no-{alias[2:]}"]) if text is None else [alias, text]
        assert getattr(getattr(parse(*argv), section), name) == value


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--optimize.n-trials", "0"], "invalid setting optimize.n_trials=0: an integer >= 1"),
        (["--n-trials", "many"], "invalid setting optimize.n_trials='many': an integer"),
        (["--kl-cap", "[1, 2]"], "invalid setting optimize.kl_cap=[1, 2]: a number"),
        (["--components", "attn_out,ffn"], "optimize.components"),
        (["--weights", "violence_weapons=2"], "categories.weights.violence_weapons=2: a number in [0, 1]"),
        (["--model.dtype", "int3"], "model.dtype"),
        (["--probe.batch-size", "0"], "probe.batch_size"),
    ],
)
def test_invalid_option_values_are_one_line_errors(argv, message, capsys):
    assert cli.main(["--non-interactive", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("clawly: error: ") and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_every_help_option_is_tested():
    parser = cli.build_parser()
    generated = {s for a in parser._actions for s in a.option_strings if a.dest.startswith(cli.KEY)}
    generated -= {"--artifacts-dir"}
    expected = set()
    for key, f in CONFIG_KEYS:
        section, name = key.split(".")
        flags = [f"--{section}.{name.replace('_', '-')}"]
        if len(key_sections()[name]) == 1 and key != "model.name":
            flags.append(f"--{name.replace('_', '-')}")
        expected |= set(flags) | ({f"--no-{x[2:]}" for x in flags} if str(f.type) == "bool" else set())
    assert generated == expected  # each covered by test_every_config_key_option_sets_its_setting
    special = {s for a in parser._actions for s in a.option_strings if not a.dest.startswith(cli.KEY)}
    special |= {"--artifacts-dir"}
    assert special - {"-h"} == set(SPECIAL_OPTIONS)
    names = {n.strip() for tests in SPECIAL_OPTIONS.values() for n in tests.split(",")}
    assert names <= set(globals()), names - set(globals())


def test_help_lists_every_config_key_with_its_default(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for key, _ in CONFIG_KEYS:
        section, name = key.split(".")
        assert f"--{section}.{name.replace('_', '-')}" in out
    assert "[default: 16]" in out  # optimize.n_trials
    assert "[default: [attn_out, mlp_down]]" in out  # optimize.components
    assert "--orthogonalize-categories" in out and "--no-orthogonalize-categories" in out
    assert "examples:" in out
    # each settings group is described by its section's docstring, not by the dataclass's repr
    assert "Settings(" not in out
    from clawly.settings_docs import SECTIONS

    for section, doc in SECTIONS.items():
        assert f"{section} settings:\n  {doc}" in out


def test_config_file_yaml_and_toml_with_precedence(tmp_path):
    (tmp_path / "c.yaml").write_text(
        "optimize: {n_trials: 5, kl_cap: 0.2}\ndata.seed: 4\nper_category: 3\n"
        "categories:\n  weights: {drugs_substances: 1}\n"
    )
    s = parse("--config", str(tmp_path / "c.yaml"), "--kl-cap", "0.4")
    assert (s.optimize.n_trials, s.optimize.kl_cap, s.data.seed, s.evaluate.per_category) == (5, 0.4, 4, 3)
    assert s.categories.weights == {"drugs_substances": 1.0}
    (tmp_path / "c.toml").write_text('n_trials = 9\n[model]\nname = "from-toml"\n[optimize]\nkl_cap = 0.25\n')
    s = parse("--config", str(tmp_path / "c.toml"))
    assert (s.optimize.n_trials, s.optimize.kl_cap, s.model.name) == (9, 0.25, "from-toml")
    assert parse("my/model", "--config", str(tmp_path / "c.toml")).model.name == "my/model"  # MODEL wins


def test_config_toml_in_the_working_directory_is_read_and_said_and_config_wins(tmp_path, monkeypatch, capsys):
    """Clawly's and Heretic's users keep a config.toml beside them; Clawly documents exactly these two
    lines in it."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.toml").write_text('category_preset = "default"\northogonalize_categories = true\n')
    s = parse()
    assert s.categories.weights == {
        "violence_weapons": 1.0,
        "drugs_substances": 1.0,
        "adult_content": 1.0,
        "self_harm_suicide": 0.0,
    }
    assert s.orthogonalize.orthogonalize_categories is True
    assert f"reading settings from {tmp_path / 'config.toml'}" in capsys.readouterr().err
    (tmp_path / "config.toml").write_text("orthogonalize_categories = false\nn_trials = 7\n")
    (tmp_path / "other.yaml").write_text("optimize: {n_trials: 3}\n")
    s = parse("--config", "other.yaml")  # --config replaces config.toml: none of its keys apply
    assert (s.optimize.n_trials, s.orthogonalize.orthogonalize_categories) == (3, True)
    assert "reading settings from" not in capsys.readouterr().err
    assert parse("--category-preset", "full").categories.weights["fraud_scams"] == 1.0  # the flag over the file


def test_the_seed_cli_options_parse(tmp_path, monkeypatch):
    """Clawly's documented command line: `clawly --category-preset default --orthogonalize-categories MODEL`."""
    monkeypatch.chdir(tmp_path)
    s = parse("--category-preset", "default", "--orthogonalize-categories", "some/model")
    assert s.model.name == "some/model" and s.orthogonalize.orthogonalize_categories is True
    assert s.categories.weights["self_harm_suicide"] == 0.0


@pytest.mark.parametrize(
    "content,name,message",
    [
        ("optimize: [1", "bad.yaml", "not valid YAML"),
        ("n_trials = ", "bad.toml", "not valid TOML"),
        ("- 1\n- 2\n", "list.yaml", "expected a mapping"),
        ("batch_size: 3\n", "amb.yaml", "ambiguous setting"),
        ("n_trails: 3\n", "typo.yaml", "did you mean 'n_trials'"),
    ],
)
def test_bad_config_file_is_one_line(tmp_path, capsys, content, name, message):
    (tmp_path / name).write_text(content)
    assert cli.main(["--config", str(tmp_path / name), "--non-interactive"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert cli.main(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert "file not found" in capsys.readouterr().err


def test_category_preset(tmp_path, capsys):
    s = parse("--category-preset", "default")
    assert s.categories.weights["self_harm_suicide"] == 0.0 and s.categories.weights["violence_weapons"] == 1.0
    s = parse("--category-preset", "default", "--weights", "drugs_substances=1")
    assert s.categories.weights == {"drugs_substances": 1.0}  # an option beats the preset
    (tmp_path / "mine.yaml").write_text("# @package _global_\ncategories:\n  weights:\n    fraud_scams: 0.5\n")
    assert parse("--category-preset", str(tmp_path / "mine.yaml")).categories.weights == {"fraud_scams": 0.5}
    assert cli.main(["--category-preset", "nope"]) == 2
    assert "no such preset; available: default, full" in capsys.readouterr().err


def test_probe_marker_sets_the_probe_position():
    s = parse("--probe-marker", "auto")
    assert (s.probe.position, s.probe.marker) == ("marker", None)
    s = parse("--probe-marker", "<|im_start|>assistant")
    assert (s.probe.position, s.probe.marker) == ("marker", "<|im_start|>assistant")


def test_artifacts_dir_and_default_work_dir():
    s = parse("--output", "out")
    assert (s.artifacts_dir, s.data.out_dir) == (str(Path("out/work")), str(Path("out/work/prompts")))
    s = parse("--artifacts-dir", "elsewhere")
    assert (s.artifacts_dir, s.data.out_dir) == ("elsewhere", str(Path("elsewhere/prompts")))


# ---------------------------------------------------------------- runs on a tiny model


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli-config") / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return str(path)


@pytest.fixture(scope="module")
def cli_run(make_tiny_model, tiny_config, tmp_path_factory):
    """One non-interactive optimization run, shared by the tests that read its outputs."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("cli-run") / "out"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = cli.main(
            [str(make_tiny_model("llama")), "--config", tiny_config, "--output", str(out), "--non-interactive"]
        )
    return code, out, buf.getvalue()


def test_non_interactive_run_saves_adapter_and_model(cli_run):
    code, out, stdout = cli_run
    assert code == 0
    assert "Pareto front" in stdout and "<- chosen by the rule" in stdout
    assert f"saved the LoRA adapter to {out / 'adapter'}" in stdout
    assert f"saved the merged model to {out / 'model'}" in stdout
    assert (out / "adapter" / "adapter_config.json").exists() and (out / "model" / "config.json").exists()
    record = json.loads((out / "model" / "clawly_reproduction.json").read_text())
    chosen = json.loads((out / "work" / "optimize" / "chosen_trial.json").read_text())
    assert record["trial"]["index"] == chosen["trial"] and record["plan"] == chosen["plan"]
    assert len(json.loads((out / "work" / "reports" / "optimize.json").read_text())["pareto_front"]) >= 1
    metrics = json.loads((out / "work" / "metrics" / "optimize.json").read_text())
    assert set(metrics) == {"kl_divergence", "keyword_refusal_rate"}


def test_reproduce_rebuilds_the_saved_model(cli_run, tmp_path, capsys):
    _, out, _ = cli_run
    assert cli.main(["--reproduce", str(out / "model" / "clawly_reproduction.json"), "--output", str(tmp_path)]) == 0
    assert f"into {tmp_path / 'model'}" in capsys.readouterr().out
    a, b = saved_tensors(out / "model"), saved_tensors(tmp_path / "model")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_reproduce_errors(tmp_path, capsys):
    assert cli.main(["--reproduce", str(tmp_path / "nope.json")]) == 2
    assert "reproduction record not found" in capsys.readouterr().err


def test_save_adapter_only_and_none(make_tiny_model, tiny_config, tmp_path, cli_run):
    _, first, _ = cli_run
    # same work dir as the first run: its study is complete, so nothing is optimized again
    argv = [
        str(make_tiny_model("llama")),
        "--config",
        tiny_config,
        "--non-interactive",
        "--artifacts-dir",
        str(first / "work"),
    ]
    assert cli.main([*argv, "--output", str(tmp_path / "a"), "--save", "adapter"]) == 0
    assert (tmp_path / "a" / "adapter").exists() and not (tmp_path / "a" / "model").exists()
    assert cli.main([*argv, "--output", str(tmp_path / "n"), "--save", "none"]) == 0
    assert not (tmp_path / "n").exists()


def test_direct_mode_ablates_only_the_given_layers(make_tiny_model, tiny_config, tmp_path, capsys):
    model_dir = make_tiny_model("llama", num_layers=4)
    assert (
        cli.main(
            [
                str(model_dir),
                "--config",
                tiny_config,
                "--output",
                str(tmp_path),
                "--non-interactive",
                "--layers",
                "1-2",
                "--use-layer",
                "2",
                "--ablation-strength",
                "0.7",
                "--save",
                "model",
            ]
        )
        == 0
    )
    assert "direct mode: " in capsys.readouterr().out
    base, merged = load_file(str(model_dir / "model.safetensors")), saved_tensors(tmp_path / "model")
    changed = {k.split(".")[2] for k in base if not torch.equal(base[k], merged[k])}
    assert changed == {"1", "2"}
    record = json.loads((tmp_path / "model" / "clawly_reproduction.json").read_text())
    assert record["trial"] is None and record["plan"]["direction_index"] == 3.0
    assert {k["peak_weight"] for k in record["plan"]["kernels"].values()} == {0.7}
    assert not (tmp_path / "work" / "optimize" / "trials.parquet").exists()  # nothing was optimized


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--layers", "one-two"], "--layers 'one-two'"),
        (["--layers", "2-9"], "outside the model's decoder layers 0-1"),
        (["--use-layer", "5"], "use_layer 5 is outside"),
    ],
)
def test_direct_mode_validation(make_tiny_model, tiny_config, tmp_path, capsys, argv, message):
    assert (
        cli.main(
            [
                str(make_tiny_model("llama")),
                "--config",
                tiny_config,
                "--output",
                str(tmp_path),
                "--non-interactive",
                *argv,
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert message in err and not (tmp_path / "model").exists()


def test_push_to_hub_uploads_the_saved_model(
    hub,  # noqa: F811 - the fixture
    cli_run,
    make_tiny_model,
    tiny_config,
    tmp_path,  # noqa: F811
    monkeypatch,
    capfd,
):
    _, first, _ = cli_run
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert (
        cli.main(
            [
                str(make_tiny_model("llama")),
                "--config",
                tiny_config,
                "--non-interactive",
                "--artifacts-dir",
                str(first / "work"),
                "--output",
                str(tmp_path),
                "--save",
                "model",
                "--push-to-hub",
                "me/tiny-abliterated",
                "--hub-private",
            ]
        )
        == 0
    )
    assert hub.repos["me/tiny-abliterated"]["private"] is True
    files = hub.files["me/tiny-abliterated"]
    for name in ("config.json", "README.md", "clawly_reproduction.json", "model.safetensors"):
        assert files[name] == (tmp_path / "model" / name).read_bytes()
    captured = capfd.readouterr()
    assert TOKEN not in captured.out + captured.err
    assert all(TOKEN not in p.read_text() for p in (first / "work" / "logs").glob("*.jsonl"))


def test_interactive_session_picks_saves_and_chats(cli_run, make_tiny_model, tiny_config, tmp_path, monkeypatch):
    _, first, _ = cli_run
    monkeypatch.setattr("sys.stdin.isatty", lambda: True)
    answers = iter(["", "a", "c", "hello there", "", "t", "x", "1", "m", "q"])
    said: list[str] = []
    args = cli.build_parser().parse_args(
        [
            str(make_tiny_model("llama")),
            "--config",
            tiny_config,
            "--artifacts-dir",
            str(first / "work"),
            "--output",
            str(tmp_path),
        ]
    )
    assert cli.run(args, ask=lambda prompt: next(answers), say=said.append) == 0
    text = "\n".join(said)
    assert "the model now holds trial" in text and "not a number: 'x'" in text
    assert "the model now holds trial 1:" in text
    assert any(s.startswith("model> ") for s in said)
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    record = json.loads((tmp_path / "model" / "clawly_reproduction.json").read_text())
    assert record["trial"]["index"] == 1  # the model saved after picking trial 1


def test_cli_prints_the_geometry_and_plots_without_optimizing(make_tiny_model, tmp_path, capsys):
    model_dir = make_tiny_model("llama", num_layers=3)
    argv = [
        str(model_dir),
        "--output",
        str(tmp_path / "out"),
        "--non-interactive",
        "--device",
        "cpu",
        "--data.train-per-category",
        "8",
        "--data.harmless-train",
        "24",
        "--probe.max-per-category",
        "8",
        "--sample-per-category",
        "8",
        "--print-residual-geometry",
        "--plot-residuals",
        str(tmp_path / "views"),
    ]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "Residual geometry per probe point" in out and "silhouette by category" in out
    lines = [line for line in out.splitlines() if line.strip()[:1].isdigit() or line.strip().startswith("│ ")]
    assert (
        sum(
            1
            for line in out.splitlines()
            if line.startswith("│") and line.split("│")[1].strip() in {"0", "1", "2", "3"}
        )
        == 4
    ), lines
    assert (tmp_path / "views/residuals.html").exists()
    assert not (tmp_path / "out/work/optimize").exists() and not (tmp_path / "out/model").exists()


def test_cli_plot_residuals_without_the_extra_is_one_line(make_tiny_model, tmp_path, capsys, monkeypatch):
    without_research_extra(monkeypatch)
    argv = [
        str(make_tiny_model("llama")),
        "--output",
        str(tmp_path / "out"),
        "--device",
        "cpu",
        "--data.train-per-category",
        "4",
        "--data.harmless-train",
        "8",
        "--plot-residuals",
        str(tmp_path / "v"),
    ]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if "error" in line] == [
        "clawly: error: the residual projections need pacmap and matplotlib, from the research extra: "
        "pip install 'clawly[research]' (the geometry table needs neither)"
    ]
    assert not (tmp_path / "v").exists() and not (tmp_path / "out/work/activations").exists()  # said before probing


def test_debug_shows_the_traceback_the_one_line_error_hides(tmp_path, capsys):
    from clawly.errors import ClawlyError

    assert cli.main([str(tmp_path / "nope"), "--output", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.startswith("clawly: error: model not found")
    with pytest.raises(ClawlyError, match="model not found"):
        cli.main([str(tmp_path / "nope"), "--output", str(tmp_path / "o"), "--debug"])
