"""`dvc repro` of the whole pipeline in a temp copy of the project (tiny model; the real one is slow)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from peft import PeftModel
from safetensors import safe_open
from test_research import check_silhouettes_against_sklearn
from transformers import AutoModelForCausalLM

from clawly.measure.stance import STANCES
from clawly.settings import Settings
from clawly.steps import analyze
from stages.params import composed_params

ROOT = Path(__file__).resolve().parent.parent
PROJECT_FILES = ["dvc.yaml", "stages", "clawly", "pyproject.toml"]


def _run(cmd, cwd, env):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout + proc.stderr


def make_project(tmp: Path, overrides: list[str]) -> dict:
    for name in PROJECT_FILES:
        src, dst = ROOT / name, tmp / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dst)
    (tmp / "params.yaml").write_text(composed_params(overrides))
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
        "PYTHONPATH": str(tmp),
    }
    _run(["git", "init", "-q"], tmp, env)
    _run([sys.executable, "-m", "dvc", "init", "-q"], tmp, env)
    return env


def tiny_overrides(model_dir: Path) -> list[str]:
    return [
        f"model.name={model_dir}",
        "data.train_per_category=8",
        "data.eval_per_category=6",
        "data.harmless_train=24",
        "data.harmless_eval=24",
        "probe.max_per_category=4",
        "probe.batch_size=8",
        "optimize.n_trials=3",
        "optimize.n_startup_trials=2",
        "optimize.harmful_prompts=8",
        "optimize.harmless_prompts=8",
        "optimize.max_new_tokens=4",
        "optimize.batch_size=8",
        "evaluate.per_category=2",
        "evaluate.harmless_prompts=8",
        "evaluate.max_new_tokens=4",
        "merge.max_shard_size=100KB",
    ]


def check_outputs(tmp: Path, n_trials: int) -> None:
    harmful = pd.read_parquet(tmp / "data/prompts/harmful.parquet")
    assert list(harmful.columns) == ["id", "text", "category", "split", "system"]
    acts = pd.read_parquet(tmp / "artifacts/activations/harmful.parquet")
    assert list(acts.columns) == ["id", "category", "layer", "residual"]
    with safe_open(str(tmp / "artifacts/directions/directions.safetensors"), "pt") as f:
        d = f.get_tensor("refusal_direction")
        assert int(f.metadata()["probe_points"]) == d.shape[0]
    # point 0 is the embedding of the same last template token for every prompt: no difference there
    torch.testing.assert_close(d[1:].norm(dim=-1), torch.ones(d.shape[0] - 1), rtol=1e-5, atol=1e-5)
    trials = pd.read_parquet(tmp / "artifacts/optimize/trials.parquet")
    assert len(trials) == n_trials and trials.pareto.any()
    assert (tmp / "artifacts/optimize/pareto.html").read_text().count("Pareto front") >= 1
    metrics = json.loads((tmp / "artifacts/metrics/optimize.json").read_text())
    summary = json.loads((tmp / "artifacts/reports/optimize.json").read_text())
    assert summary["trials"] == n_trials and summary["pareto_front"]
    assert metrics == {
        "kl_divergence": summary["chosen"]["kl_divergence"],
        "keyword_refusal_rate": summary["chosen"]["refusal_rate"],
    }
    by_layer = pd.read_csv(tmp / "artifacts/directions/by_layer.csv")
    assert len(by_layer) == d.shape[0] and by_layer.mean_difference_norm.iloc[1:].gt(0).all()
    # analyze: the research views of the same probe points, from the probe and directions outputs
    geometry = pd.read_csv(tmp / "artifacts/research/geometry.csv")
    assert list(geometry.probe_point) == list(range(d.shape[0]))
    expected_norms = by_layer.mean_difference_norm.tolist()
    assert geometry.difference_norm.tolist() == pytest.approx(expected_norms, rel=1e-4, abs=1e-5)
    params = yaml.safe_load((tmp / "params.yaml").read_text())  # the run's settings, its paths made absolute
    params["artifacts_dir"], params["data"]["out_dir"] = str(tmp / "artifacts"), str(tmp / params["data"]["out_dir"])
    check_silhouettes_against_sklearn(geometry, analyze.geometry(Settings.from_dict(params)).sample)
    research = json.loads((tmp / "artifacts/metrics/analyze.json").read_text())
    assert research["silhouette"] == pytest.approx(geometry.silhouette.max(), abs=1e-4)
    views = tmp / "artifacts/research/projections"
    assert (views / "residuals.html").read_text().rstrip().endswith("</html>")
    assert sorted(f.name for f in views.glob("pacmap_point_*.png"))
    assert (tmp / "artifacts/lora/adapter_config.json").exists()
    model_dir = tmp / "artifacts/model"
    assert (model_dir / "model.safetensors.index.json").exists()  # sharded at 100KB
    for name in (
        "config.json",
        "tokenizer_config.json",
        "generation_config.json",
        "README.md",
        "clawly_reproduction.json",
    ):
        assert (model_dir / name).exists(), name
    headline = json.loads((tmp / "artifacts/metrics/evaluate.json").read_text())
    assert json.loads((tmp / "artifacts/metrics/selectivity.json").read_text()) == {}  # global mode
    evaluation = json.loads((tmp / "artifacts/reports/evaluate.json").read_text())
    told = evaluation["by_category"]["instructed_refusal"]  # refusals a system prompt asks for: reported, not targeted
    assert told["role"] == "untargeted" and told["instructed"]
    expected = {k: evaluation["merged"][k] for k in ("kl_divergence", "keyword_refusal_rate", "not_compliant_rate")}
    if told["retention"] is not None:
        expected["instructed_retention"] = told["retention"]
    assert headline == expected
    # the overall figures count the safety categories only
    assert (
        evaluation["harmful_prompts"]
        == sum(m["base"]["prompts"] for c, m in evaluation["by_category"].items() if c != "instructed_refusal")
        > 0
    )
    assert evaluation["instructed_prompts"] == told["base"]["prompts"] > 0
    safety = [m for c, m in evaluation["by_category"].items() if c != "instructed_refusal"]
    assert evaluation["merged"]["keyword_refusals"] == sum(m["merged"]["keyword_refusals"] for m in safety)
    scored = pd.read_parquet(tmp / "artifacts/optimize/prompts.parquet")
    assert not scored.id.str.contains("instructed_refusal").any()  # global mode never targets them
    assert {"refusal", "not_compliant", "accuracy"} <= set(evaluation["classifier"]["scores"])
    for cat, m in evaluation["by_category"].items():
        for model in ("base", "merged"):
            row = m[model]
            for key in (
                "keyword_refusal",
                "strict_keyword_refusal",
                "refusal",
                "hedged",
                "compliance",
                "classifier_refusal",
                "off_topic",
                "degenerate",
            ):
                lo, hi = row[f"{key}_rate_ci95"]
                assert lo <= row[f"{key}_rate"] <= hi, (cat, model, key)
            assert row["classifier_refusals"] + row["off_topic"] + row["degenerate"] == row["not_compliant"]
            # the five labels split every answer; hedged ones come out of the classifier's refusals and compliance
            five = ("refusals", "hedged", "compliance", "off_topic", "degenerate")
            assert sum(row[k] for k in five) == row["prompts"]
            assert row["refusals"] <= row["classifier_refusals"]
    answers = pd.read_parquet(tmp / "artifacts/evaluate/responses.parquet")
    assert set(answers.merged_label) | set(answers.base_label) <= {"refusal", "compliance", "off_topic", "degenerate"}
    assert set(answers.merged_stance) | set(answers.base_stance) <= set(STANCES)
    assert len(answers) == evaluation["harmful_prompts"] + evaluation["instructed_prompts"]
    logs = (tmp / "artifacts/logs/optimize.jsonl").read_text().splitlines()
    assert all(json.loads(line)["stage"] == "optimize" for line in logs)


def test_dvc_repro_runs_the_whole_pipeline_and_a_second_repro_is_a_no_op(make_tiny_model, tmp_path):
    model_dir = make_tiny_model("qwen2", num_layers=3)
    env = make_project(tmp_path, tiny_overrides(model_dir))
    _run([sys.executable, "-m", "dvc", "repro"], tmp_path, env)
    check_outputs(tmp_path, 3)
    # the merged model equals base + adapter
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "artifacts/model").eval()
    with_adapter = PeftModel.from_pretrained(base, str(tmp_path / "artifacts/lora")).eval()
    ids = torch.randint(3, base.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(merged(ids).logits, with_adapter(ids).logits, rtol=1e-4, atol=1e-4)
    status = _run([sys.executable, "-m", "dvc", "repro"], tmp_path, env)
    assert "Running stage" not in status, status
    # the headline figures fit a terminal
    shown = _run([sys.executable, "-m", "dvc", "metrics", "show"], tmp_path, env)
    assert max(map(len, shown.splitlines())) <= 160, shown
    # editing one stage's step reruns that stage alone (and what its new outputs feed); a help text none
    with open(tmp_path / "clawly/steps/merge.py", "a") as f:
        f.write("# an edit\n")
    with open(tmp_path / "clawly/settings_docs.py", "a") as f:
        f.write("# an edit\n")
    changed = _run([sys.executable, "-m", "dvc", "status"], tmp_path, env)
    assert [line[:-1] for line in changed.splitlines() if line and not line[0].isspace()] == ["merge"], changed
    # more trials resume the persisted study instead of starting over
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["optimize"]["n_trials"] = 4
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = _run([sys.executable, "-m", "dvc", "repro", "optimize"], tmp_path, env)
    assert "resuming study" in out
    assert len(pd.read_parquet(tmp_path / "artifacts/optimize/trials.parquet")) == 4


def test_stage_reports_missing_input_in_one_line(tmp_path):
    env = make_project(tmp_path, [])
    proc = subprocess.run(
        [sys.executable, "-m", "stages.compute_directions"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "run the 'probe-activations' stage first" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_stage_rejects_bad_override_in_one_line(tmp_path):
    env = make_project(tmp_path, [])
    proc = subprocess.run(
        [sys.executable, "-m", "stages.optimize", "optimize.n_trials=0"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "optimize.n_trials=0" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "artifacts" / "optimize").exists()


def check_refusals_drop(tmp: Path) -> None:
    """The ablation works: the chosen trial refuses less than the base model on the optimizer's
    prompts, and the merged model less than the base model on the held-out harmful prompts (counted
    answer by answer from the evaluate stage's responses, which agree with its report)."""
    optimized = json.loads((tmp / "artifacts/reports/optimize.json").read_text())
    assert optimized["chosen"]["refusals"] < optimized["base"]["refusals"], optimized["chosen"]
    evaluation = json.loads((tmp / "artifacts/reports/evaluate.json").read_text())
    answers = pd.read_parquet(tmp / "artifacts/evaluate/responses.parquet")
    instructed = {c for c, m in evaluation["by_category"].items() if m.get("instructed")}
    safety = answers[~answers.category.isin(instructed)]  # the report's overall figures count these
    assert len(safety) == evaluation["harmful_prompts"] > 0
    refused = {model: int(safety[f"{model}_keyword_refusal"].sum()) for model in ("base", "merged")}
    assert refused == {model: evaluation[model]["keyword_refusals"] for model in ("base", "merged")}
    assert refused["merged"] < refused["base"], refused


@pytest.mark.slow
def test_dvc_repro_on_the_real_default_model(tmp_path):
    pytest.importorskip("gguf")
    overrides = [
        "data.train_per_category=100",
        "probe.max_per_category=6",
        "optimize.n_trials=3",
        "optimize.n_startup_trials=3",
        "optimize.harmful_prompts=16",
        "optimize.harmless_prompts=16",
        "optimize.max_new_tokens=12",
        "evaluate.per_category=3",
        "evaluate.harmless_prompts=16",
        "evaluate.max_new_tokens=16",
    ]
    env = make_project(tmp_path, overrides)
    _run([sys.executable, "-m", "dvc", "repro"], tmp_path, env)
    check_outputs_real = json.loads((tmp_path / "artifacts/reports/optimize.json").read_text())
    assert check_outputs_real["trials"] == 3
    assert check_outputs_real["base"]["refusals"] > 0  # the real model does refuse
    check_refusals_drop(tmp_path)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "artifacts/model")
    assert merged.config.num_hidden_layers == 24


def test_dvc_exp_run_with_a_preset_runs_category_mode(make_tiny_model, tmp_path):
    model_dir = make_tiny_model("llama", num_layers=3)
    overrides = tiny_overrides(model_dir)
    env = make_project(tmp_path, overrides)
    shutil.copy(ROOT / ".dvc" / "config", tmp_path / ".dvc" / "config")  # Hydra composition, config_dir
    _run(["git", "add", "-A"], tmp_path, env)
    _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "base"], tmp_path, env)
    # the preset learns its directions (RDO) from the base model's refusals: markers the tiny model writes
    sets = [
        a
        for o in [
            "+preset=default",
            "categories.per_category_adapters=true",
            *overrides,
            "optimize.refusal_markers=[black,whom,the]",
        ]
        for a in ("-S", o)
    ]
    _run([sys.executable, "-m", "dvc", "exp", "run", *sets], tmp_path, env)
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    assert params["categories"]["weights"]["self_harm_suicide"] == 0.0
    learned = json.loads((tmp_path / "artifacts/reports/directions.json").read_text())
    assert learned["method"] == "rdo" and set(learned["rdo"]["by_direction"]) == {
        "violence_weapons",
        "drugs_substances",
        "adult_content",
    }
    report = json.loads((tmp_path / "artifacts/reports/orthogonalize.json").read_text())
    assert report["mode"] == "category" and report["kept"] == ["self_harm_suicide"]
    assert report["order"] == ["violence_weapons", "drugs_substances", "adult_content"]
    with safe_open(str(tmp_path / "artifacts/directions/orthogonalized.safetensors"), "pt") as f:
        q = f.get_tensor("directions").double()
    with safe_open(str(tmp_path / "artifacts/directions/directions.safetensors"), "pt") as f:
        kept = f.get_tensor("category_direction.self_harm_suicide").double()
    assert q.shape[0] == 3 and torch.einsum("mpd,pd->mp", q, kept).abs().max() < 1e-5
    metrics = json.loads((tmp_path / "artifacts/reports/optimize.json").read_text())
    roles = {c: r["role"] for c, r in metrics["by_category"].items()}
    assert roles == {
        "violence_weapons": "targeted",
        "drugs_substances": "targeted",
        "adult_content": "targeted",
        "self_harm_suicide": "kept",
    }
    assert "kept category" in metrics["rule"]
    for cat in report["order"]:
        assert (tmp_path / "artifacts/lora/categories" / cat / "adapter_model.safetensors").exists()
    evaluation = json.loads((tmp_path / "artifacts/reports/evaluate.json").read_text())
    assert evaluation["by_category"]["fraud_scams"]["role"] == "untargeted"
    sel = json.loads((tmp_path / "artifacts/metrics/selectivity.json").read_text())
    assert set(sel["removed"]) == set(report["order"]) and set(sel["retained"]) == {"self_harm_suicide"}
    kept_eval = evaluation["by_category"]["self_harm_suicide"]
    assert sel["retained"]["self_harm_suicide"] == kept_eval["retention"]
    if kept_eval["base"]["refusals"]:
        assert kept_eval["retention"] == round(kept_eval["merged"]["refusals"] / kept_eval["base"]["refusals"], 4)
    headline = json.loads((tmp_path / "artifacts/metrics/optimize.json").read_text())
    kept = metrics["by_category"]["self_harm_suicide"]["retention"]
    assert headline.get("kept_retention") == kept and set(headline) <= {
        "kl_divergence",
        "keyword_refusal_rate",
        "kept_retention",
    }
    # the headline figures still fit a terminal; the selectivity block is a metric of its own
    shown = _run(
        [
            sys.executable,
            "-m",
            "dvc",
            "metrics",
            "show",
            "artifacts/metrics/evaluate.json",
            "artifacts/metrics/optimize.json",
        ],
        tmp_path,
        env,
    )
    assert max(map(len, shown.splitlines())) <= 160, shown
    diff = _run([sys.executable, "-m", "dvc", "metrics", "diff", "--all"], tmp_path, env)
    listed = [f"{kind}.{c}" for kind in ("removed", "retained") for c, v in sel[kind].items() if v is not None]
    assert listed and all(name in diff for name in listed), diff  # (null: the base model refused none)
    card = (tmp_path / "artifacts/model/README.md").read_text()
    assert "self_harm_suicide 0" in card and "| kept |" in card
