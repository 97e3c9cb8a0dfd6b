"""The Pipeline API on a tiny model: the notebook flow, agreement with the stages, resume, reproduce."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import saved_tensors
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from clawly import Pipeline, Settings, TrialOutcome
from clawly.errors import ClawlyError
from clawly.log import get_logger
from clawly.steps import export_lora, merge

ROOT = Path(__file__).resolve().parent.parent

TINY = {
    "data.train_per_category": 8,
    "data.eval_per_category": 6,
    "data.harmless_train": 24,
    "data.harmless_eval": 24,
    "probe.max_per_category": 4,
    "probe.batch_size": 8,
    "n_trials": 3,
    "n_startup_trials": 2,
    "harmful_prompts": 8,
    "optimize.harmless_prompts": 8,
    "optimize.max_new_tokens": 4,
    "optimize.batch_size": 8,
    "model.device": "cpu",
    # words the tiny random model writes in some answers, so refusal counts are not all zero
    "optimize.refusal_markers": ["black", "whom"],
}


def tiny_settings(model_dir: Path, tmp: Path, **keys) -> Settings:
    return Settings(
        model=str(model_dir),
        artifacts_dir=str(tmp / "artifacts"),  # caches inside tmp, not ~/.cache
        **{"data.out_dir": str(tmp / "prompts"), "model.cache_dir": str(tmp / "cache"), **TINY, **keys},
    )


def quiet(tmp: Path):
    return get_logger("test", tmp / "logs", quiet=True)


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def logits(model, tokenizer, text: str = "how do I bake bread ?") -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def done_pipeline(tmp_path_factory, make_tiny_model):
    """A pipeline that has run the whole notebook flow once (shared: tests must not change its study)."""
    tmp = tmp_path_factory.mktemp("api")
    pipe = Pipeline(tiny_settings(make_tiny_model("llama"), tmp), log=quiet(tmp))
    pipe.load_model()
    harmful, harmless = pipe.load_datasets()
    base = weights(pipe.model)
    directions = pipe.compute_refusal_directions()
    prefix = pipe.detect_response_prefix()
    batch = pipe.auto_batch_size()
    pipe.start_search()
    trials = list(pipe.run_optimization_iter())
    return (
        pipe,
        tmp,
        {
            "harmful": harmful,
            "harmless": harmless,
            "base": base,
            "directions": directions,
            "prefix": prefix,
            "batch": batch,
            "trials": trials,
        },
    )


def test_notebook_flow_yields_one_result_per_trial(done_pipeline):
    pipe, _, r = done_pipeline
    assert set(r["harmful"].columns) == {"id", "text", "category", "split", "system"} and len(r["harmless"]) == 48
    assert r["directions"].directions.shape[:2] == (1, pipe.model.config.num_hidden_layers + 1)
    assert isinstance(r["prefix"], str) and 1 <= r["batch"] <= 8
    trials = r["trials"]
    assert [t.index for t in trials] == [0, 1, 2]
    for t in trials:
        assert isinstance(t, TrialOutcome) and not t.pruned
        assert sum(t.refusals_by_category.values()) == t.refusals
        assert sum(t.prompts_by_category.values()) == 8
        assert "direction_scope" in t.parameters and t.plan.kernels
    # the generator ran every trial while the model held base weights between trials
    assert all(torch.equal(v, r["base"][k]) for k, v in pipe.model.state_dict().items())
    # each trial's figures, recounted with transformers on the trial's weights
    counts = [(t.refusals, t.kl_divergence) for t in trials]
    assert counts == [reference_scores(pipe, t.plan) for t in trials]
    assert any(refusals for refusals, _ in counts)


def reference_scores(pipe, plan) -> tuple[int, float]:
    """Refusals (transformers.generate, the pipeline's markers) and KL (plain forwards, torch's
    kl_div) of the pipeline's model with `plan`'s float64 change applied to its base weights."""
    from clawly.ablate.ablation import ablated, weight_deltas
    from clawly.measure.logprobs import first_token_logprobs
    from clawly.measure.reference import generate
    from clawly.measure.stance import RefusalDetector

    model, tok, prompts, s = pipe.model, pipe.tokenizer, pipe.search.prompts, pipe.settings.optimize
    base = first_token_logprobs(model, tok, prompts.harmless, batch_size=1)
    with ablated(model, weight_deltas(model, pipe.directions.basis, plan, pipe.directions.strengths)):
        answers = generate(model, tok, prompts.harmful, s.max_new_tokens, batch_size=1)
        after = first_token_logprobs(model, tok, prompts.harmless, batch_size=1)
    kl = torch.nn.functional.kl_div(after.double(), base.double(), reduction="batchmean", log_target=True)
    # float32 logits batched differently differ by ~1e-6, which moves a KL near zero by up to ~1.2e-7
    # (seen under load, with other thread timings): a KL near zero can only match that closely
    return sum(map(RefusalDetector(s.refusal_markers), answers)), pytest.approx(float(kl), rel=2e-3, abs=3e-7)


def test_pareto_front_is_the_non_dominated_trials(done_pipeline):
    pipe, _, r = done_pipeline
    front = pipe.get_pareto_front()
    points = {(t.refusals, t.kl_divergence) for t in r["trials"]}
    assert front and [t.kl_divergence for t in front] == sorted(t.kl_divergence for t in front)
    for t in front:
        assert not any(
            a <= t.refusals and b <= t.kl_divergence and (a, b) != (t.refusals, t.kl_divergence) for a, b in points
        )
    dominated = [t for t in r["trials"] if t.index not in {f.index for f in front}]
    for t in dominated:
        assert any(f.refusals <= t.refusals and f.kl_divergence <= t.kl_divergence for f in front)


def test_restore_trial_swaps_weights_and_back(done_pipeline):
    pipe, _, r = done_pipeline
    a, b = r["trials"][0], r["trials"][1]
    pipe.restore_trial(a)
    with_a = weights(pipe.model)
    assert any(not torch.equal(with_a[k], r["base"][k]) for k in with_a)
    pipe.restore_trial(b.index)  # by number
    pipe.restore_trial(a)
    assert all(torch.equal(v, with_a[k]) for k, v in pipe.model.state_dict().items())
    with pytest.raises(ClawlyError, match="no finished trial 99"):
        pipe.restore_trial(99)
    pipe._restore_base()
    assert all(torch.equal(v, r["base"][k]) for k, v in pipe.model.state_dict().items())


def test_saved_adapter_and_model_load_in_peft_and_transformers(done_pipeline, tmp_path):
    pipe, _, r = done_pipeline
    trial = r["trials"][2]
    pipe.restore_trial(trial)
    expected = logits(pipe.model, pipe.tokenizer)
    pipe.save_adapter(tmp_path / "adapter")
    pipe.save_model(tmp_path / "model")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    torch.testing.assert_close(logits(merged, pipe.tokenizer), expected, rtol=0, atol=0)
    base = AutoModelForCausalLM.from_pretrained(pipe.settings.model.name)
    with_adapter = PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    torch.testing.assert_close(logits(with_adapter, pipe.tokenizer), expected, rtol=1e-5, atol=1e-5)
    record = json.loads((tmp_path / "model" / "clawly_reproduction.json").read_text())
    assert record["kind"] == "model" and record["trial"]["index"] == trial.index
    assert record["plan"] == trial.plan.to_dict()
    assert record["model"]["fingerprint"].startswith("sha256:")
    assert set(record["prompts"]) == {"harmful", "harmless"}
    assert record["prompts"]["harmful"]["fingerprint"].startswith("sha256:")
    assert record["settings"]["optimize"]["n_trials"] == 3 and "torch" in record["packages"]
    assert pipe.settings.model.cache_dir and record["settings"]["model"]["cache_dir"] is None  # this machine's
    assert "LoRA adapter" in (tmp_path / "adapter" / "README.md").read_text()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("mode,arch", [("global", "llama"), ("category", "llama"), ("global", "opt")])
def test_api_save_reproduce_and_the_stages_merge_agree_bit_for_bit(make_tiny_model, tmp_path, dtype, mode, arch):
    """No second implementation: the stages' adapter + peft merge, the API's saved model and
    `reproduce` give the same weights, in every dtype (peft adds B A formed in float32), biases
    included (OPT's writers have one)."""
    keys = {"model.dtype": dtype, "n_trials": 2, "direction_scopes": ["per_layer"]}
    if mode == "category":  # and the fractional global index, where the basis is orthogonalized
        keys.update(
            {
                "categories.weights": {"violence_weapons": 1.0, "drugs_substances": 0.6, "self_harm_suicide": 0.0},
                "direction_scopes": ["global"],
            }
        )
    pipe = Pipeline(tiny_settings(make_tiny_model(arch, num_layers=3), tmp_path, **keys), log=quiet(tmp_path))
    list(pipe.run_optimization_iter())
    pipe.write_outputs()
    export_lora.run(pipe.settings, quiet(tmp_path))
    merge.run(pipe.settings, quiet(tmp_path))
    pipe.restore_trial(pipe.choose_trial())
    if mode == "category":
        assert pipe.trial.plan.direction_index % 1 != 0
    pipe.save_model(tmp_path / "model")
    stage, api = saved_tensors(Path(pipe.settings.artifacts_dir) / "model"), saved_tensors(tmp_path / "model")
    assert stage.keys() == api.keys() and {t.dtype for t in stage.values()} == {getattr(torch, dtype)}
    differ = [k for k in stage if not torch.equal(stage[k], api[k])]
    assert not differ, f"{len(differ)} of {len(stage)} tensors differ: {differ[:4]}"
    base = saved_tensors(make_tiny_model(arch, num_layers=3))
    assert sum(not torch.equal(api[k], base[k].to(api[k].dtype)) for k in api) >= 2  # the trial changed weights
    rebuilt = saved_tensors(Pipeline.reproduce(tmp_path / "model", tmp_path / "again", quiet(tmp_path)))
    assert [k for k in stage if not torch.equal(stage[k], rebuilt[k])] == []
    stage_record = json.loads((Path(pipe.settings.artifacts_dir) / "model" / "clawly_reproduction.json").read_text())
    assert stage_record["plan"] == pipe.trial.plan.to_dict()


def test_reproduce_rebuilds_the_same_weights(done_pipeline, tmp_path):
    pipe, tmp, r = done_pipeline
    pipe.restore_trial(r["trials"][1])
    pipe.save_model(tmp_path / "model")
    pipe.save_adapter(tmp_path / "adapter")
    out = Pipeline.reproduce(tmp_path / "model" / "clawly_reproduction.json", tmp_path / "again", quiet(tmp))
    saved, rebuilt = saved_tensors(tmp_path / "model"), saved_tensors(out)
    assert saved.keys() == rebuilt.keys() and all(torch.equal(saved[k], rebuilt[k]) for k in saved)
    out = Pipeline.reproduce(tmp_path / "adapter", tmp_path / "again-adapter", quiet(tmp))
    a, b = (
        load_file(str(tmp_path / "adapter" / "adapter_model.safetensors")),
        load_file(str(out / "adapter_model.safetensors")),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_reproduce_refuses_a_changed_directions_file_or_another_model(done_pipeline, tmp_path, make_tiny_model):
    pipe, tmp, r = done_pipeline
    pipe.restore_trial(r["trials"][0])
    pipe.save_adapter(tmp_path / "adapter")
    record_file = tmp_path / "adapter" / "clawly_reproduction.json"
    record = json.loads(record_file.read_text())
    record["settings"]["model"]["name"] = str(make_tiny_model("llama", hidden=48))
    (tmp_path / "other.json").write_text(json.dumps(record))
    import shutil

    shutil.copy(tmp_path / "adapter" / "clawly_directions.safetensors", tmp_path / "clawly_directions.safetensors")
    with pytest.raises(ClawlyError, match="not the one recorded"):
        Pipeline.reproduce(tmp_path / "other.json", tmp_path / "x", quiet(tmp))
    with open(tmp_path / "adapter" / "clawly_directions.safetensors", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ClawlyError, match="does not match the record's sha256"):
        Pipeline.reproduce(record_file, tmp_path / "y", quiet(tmp))
    assert not (tmp_path / "y").exists()
    (tmp_path / "junk.json").write_text("{}")
    with pytest.raises(ClawlyError, match="not a clawly reproduction record"):
        Pipeline.reproduce(tmp_path / "junk.json", tmp_path / "z", quiet(tmp))


def test_interrupted_optimization_resumes_with_the_trials_an_uninterrupted_run_draws(make_tiny_model, tmp_path):
    model_dir = make_tiny_model("llama")
    settings = tiny_settings(model_dir, tmp_path / "resumed", n_trials=4)
    first = Pipeline(settings, log=quiet(tmp_path))
    for trial in first.run_optimization_iter():
        assert trial.index == 0
        break  # interrupted after one trial (a startup trial: n_startup_trials=2)
    first.close()
    again = Pipeline(settings, log=quiet(tmp_path))
    assert [t.index for t in again.run_optimization_iter()] == [1, 2, 3]
    resumed = again.trials()
    whole = Pipeline(tiny_settings(model_dir, tmp_path / "whole", n_trials=4), log=quiet(tmp_path))
    uninterrupted = list(whole.run_optimization_iter())
    assert [t.index for t in resumed] == [0, 1, 2, 3]
    assert [t.parameters for t in resumed] == [t.parameters for t in uninterrupted]
    assert [(t.refusals, t.kl_divergence) for t in resumed] == [(t.refusals, t.kl_divergence) for t in uninterrupted]


def test_direct_plan_ablates_only_the_given_layers(make_tiny_model, tmp_path):
    pipe = Pipeline(tiny_settings(make_tiny_model("llama", num_layers=4), tmp_path), log=quiet(tmp_path))
    plan = pipe.direct_plan(layers=(1, 2), use_layer=2, strength=0.5)
    base = weights(pipe.load_model()[0])
    pipe.restore_trial(plan)
    changed = {k.split(".")[2] for k, v in pipe.model.state_dict().items() if not torch.equal(v, base[k])}
    assert changed == {"1", "2"}
    assert plan.direction_index == 3.0  # the output of layer 2 is probe point 3
    scored = pipe.score()
    pipe._restore_base()  # the reference applies the plan's float64 change to the base weights
    refusals, kl = reference_scores(pipe, plan)
    assert scored.index == -1 and scored.refusals == refusals and scored.kl_divergence == kl
    with pytest.raises(ClawlyError, match="outside the model's decoder layers 0-3"):
        pipe.direct_plan(layers=(2, 4))
    with pytest.raises(ClawlyError, match="use_layer 7"):
        pipe.direct_plan(use_layer=7)


def test_settings_accept_every_key_flat_dotted_or_by_section():
    s = Settings(model="some/model", n_trials=7, optimize={"batch_size": 5}, **{"evaluate.batch_size": 3})
    assert (s.model.name, s.optimize.n_trials, s.optimize.batch_size, s.evaluate.batch_size) == ("some/model", 7, 5, 3)
    assert Settings(kl_cap=0.2).optimize.kl_cap == 0.2
    assert Settings.from_dict(s.to_dict()) == s
    with pytest.raises(ValueError, match="ambiguous setting 'batch_size': it is in probe, optimize, distill, evaluate"):
        Settings(batch_size=4)
    with pytest.raises(ValueError, match="did you mean 'n_trials'"):
        Settings(n_trial=4)
    with pytest.raises(ValueError, match=r"invalid setting optimize.n_trials='x'"):
        Settings(n_trials="x")


def test_notebook_example_runs_end_to_end(make_tiny_model, tmp_path):
    """examples/notebook.py (docs/doors/api.md's walkthrough) on a tiny model, as a script."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run(
        [sys.executable, str(root / "examples" / "notebook.py"), str(make_tiny_model("llama")), str(tmp_path / "nb")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials = [line for line in proc.stdout.splitlines() if line.startswith("trial ")]
    assert len(trials) >= 6 + 1  # six results, then the front
    assert "chosen: trial" in proc.stdout and "base model: " in proc.stdout
    assert (tmp_path / "nb" / "adapter" / "adapter_config.json").exists()
    assert (tmp_path / "nb" / "model" / "clawly_reproduction.json").exists()


def test_a_norm_preserving_trial_is_saved_as_scored_and_a_lossy_adapter_is_flagged(make_tiny_model, tmp_path):
    """The trials score the dense (full-rank) norm-preserving change; the merged model, the API's
    saved model and the reproduction hold exactly that, while the adapter approximates it by SVD
    and says how far off it is."""
    from clawly.ablate.ablation import ablated, weight_deltas

    model_dir = make_tiny_model("llama", num_layers=3)
    settings = tiny_settings(model_dir, tmp_path, n_trials=2, **{"optimize.norm_preserve": True, "export.max_rank": 2})
    pipe = Pipeline(settings, log=quiet(tmp_path))
    list(pipe.run_optimization_iter())
    pipe.write_outputs()
    log = quiet(tmp_path)
    metrics = export_lora.run(settings, log)
    merge.run(settings, log)
    chosen = pipe.choose_trial()
    assert chosen.plan.norm_preserve
    model = pipe.load_model()[0]
    pipe._restore_base()
    deltas = weight_deltas(model, pipe.directions.basis, chosen.plan, pipe.directions.strengths)
    with ablated(model, deltas):
        scored = weights(model)
    merged = saved_tensors(Path(settings.artifacts_dir) / "model")
    assert [k for k in scored if not torch.equal(scored[k], merged[k])] == []
    pipe.restore_trial(chosen)
    pipe.save_model(tmp_path / "api-model")
    api = saved_tensors(tmp_path / "api-model")
    assert [k for k in scored if not torch.equal(scored[k], api[k])] == []
    assert metrics["max_relative_error"] > 0.05  # rank 2 cannot hold a full-rank change
    warnings = [
        json.loads(line) for line in log.path.read_text().splitlines() if json.loads(line)["event"] == "warning"
    ]
    assert any("relative error" in w.get("message", "") for w in warnings)
    lora = str(Path(settings.artifacts_dir) / "lora")
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), lora)
    exact = AutoModelForCausalLM.from_pretrained(tmp_path / "api-model")
    assert not torch.allclose(logits(adapter, pipe.tokenizer), logits(exact, pipe.tokenizer), atol=1e-5)


def test_norm_preservation_with_kept_categories_is_refused():
    """Rescaling columns changes every kept direction's component: it would void the guarantee."""
    with pytest.raises(ValueError, match="optimize.norm_preserve.*kept categor"):
        Settings(
            **{
                "optimize.norm_preserve": True,
                "categories.weights": {"violence_weapons": 1.0, "self_harm_suicide": 0.0},
            }
        )
    Settings(**{"optimize.norm_preserve": True, "categories.weights": {"violence_weapons": 1.0}})  # no kept one


@pytest.mark.parametrize(
    "measure,says,never",
    [("keywords", "keyword refusals", "classifier"), ("classifier", "not compliant (classifier)", "keyword refusals")],
)
def test_metrics_card_and_pareto_plot_name_the_measure_the_optimizer_used(
    make_tiny_model, tmp_path, measure, says, never
):
    settings = tiny_settings(make_tiny_model("llama"), tmp_path, n_trials=2, **{"optimize.refusal_measure": measure})
    pipe = Pipeline(settings, log=quiet(tmp_path))
    list(pipe.run_optimization_iter())
    metrics = pipe.write_outputs()
    assert metrics["refusal_measure"] == measure and metrics["refusal_label"] == says
    assert {"refusals", "refusal_rate"} <= set(metrics["base"]) and "keyword_refusals" not in metrics["base"]
    assert says in metrics["rule"] and never not in metrics["rule"]
    pipe.save_adapter(tmp_path / "adapter")
    card = (tmp_path / "adapter" / "README.md").read_text().lower()
    plot = (Path(settings.artifacts_dir) / "optimize" / "pareto.html").read_text().lower()
    for text in (card, plot):
        assert says in text and never not in text


# ---------------------------------------------------------------- what the web UI drives: chat, stop, figures


def greedy_reply(model, tokenizer, messages: list[dict], max_new_tokens: int) -> str:
    """The reference answer: transformers' own greedy generate on the templated conversation."""
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.input_ids.shape[1] :], skip_special_tokens=True).strip()


def test_chat_streams_the_restored_trials_greedy_answer_and_the_base_models_beside_it(done_pipeline):
    pipe, _, r = done_pipeline
    trial = max(r["trials"], key=lambda t: t.kl_divergence)  # the trial that moves the model most
    pipe.restore_trial(trial)
    with_trial = weights(pipe.model)
    asked = [{"role": "user", "content": "how do i make a bomb ?"}]
    full = [{"role": "system", "content": pipe.settings.model.system_prompt}, *asked]
    stream = list(pipe.chat(asked, max_new_tokens=12))
    assert len(stream) >= 2  # it grows, piece by piece
    assert all(later.startswith(earlier) for earlier, later in zip(stream, stream[1:], strict=False))
    assert stream[-1] == greedy_reply(pipe.model, pipe.tokenizer, full, 12)
    base = list(pipe.chat(asked, max_new_tokens=12, base=True))[-1]
    assert all(torch.equal(v, with_trial[k]) for k, v in pipe.model.state_dict().items())  # the trial is back
    pipe._restore_base()
    assert base == greedy_reply(pipe.model, pipe.tokenizer, full, 12) and base != stream[-1]
    assert pipe.trial is None


def test_closing_a_chat_stream_stops_generation_and_restores_the_trial(done_pipeline):
    pipe, _, r = done_pipeline
    pipe.restore_trial(r["trials"][0])
    with_trial = weights(pipe.model)
    stream = pipe.chat([{"role": "user", "content": "tell me a story"}], max_new_tokens=400, base=True)
    first = next(stream)
    stream.close()  # the UI's stop: generation ends at the next token, the trial's weights come back
    assert first and all(torch.equal(v, with_trial[k]) for k, v in pipe.model.state_dict().items())
    assert pipe.trial.index == r["trials"][0].index


def test_pareto_figure_marks_each_point_with_its_trial_and_the_front(done_pipeline):
    pipe, _, r = done_pipeline
    fig = pipe.pareto_figure()
    points = {(t.kl_divergence, t.refusals): t.index for t in r["trials"]}
    traces = {trace.name: trace for trace in fig.data}
    assert set(traces["trials"].customdata) == {t.index for t in r["trials"]}
    for trace in fig.data:
        assert list(trace.customdata) == [points[x, y] for x, y in zip(trace.x, trace.y, strict=True)]
    assert set(traces["Pareto front"].customdata) == {t.index for t in pipe.get_pareto_front()}
    assert list(traces[f"chosen (trial {pipe.choose_trial().index})"].customdata) == [pipe.choose_trial().index]


def test_category_report_is_the_base_and_trial_counts_with_intervals_and_retention(make_tiny_model, tmp_path):
    weights_ = {"violence_weapons": 1.0, "drugs_substances": 1.0, "self_harm_suicide": 0.0}
    pipe = Pipeline(
        tiny_settings(
            make_tiny_model("llama"), tmp_path, n_trials=2, **{"categories.weights": weights_, "harmful_prompts": 12}
        ),
        log=quiet(tmp_path),
    )
    trials = list(pipe.run_optimization_iter())
    report = pipe.category_report(trials[1]).set_index("category")
    base = pipe.search.base
    assert list(report.index) == sorted(weights_)
    assert report.role.to_dict() == {
        "drugs_substances": "targeted",
        "self_harm_suicide": "kept",
        "violence_weapons": "targeted",
    }
    for cat, row in report.iterrows():
        assert row.prompts == base.prompts_by_category[cat] == 4
        assert (row.base_refusals, row.after_refusals) == (
            base.refusals_by_category[cat],
            trials[1].refusals_by_category[cat],
        )
        low, high = row.after_rate_ci95
        assert low <= row.after_rate <= high
    kept = report.loc["self_harm_suicide"]
    assert kept.retention == (round(kept.after_refusals / kept.base_refusals, 4) if kept.base_refusals else None)
    assert report.retention.drop("self_harm_suicide").isna().all()
    with pytest.raises(ClawlyError, match="no scored trial"):
        pipe._restore_base(), pipe.category_report()


def test_a_run_stopped_mid_trial_loses_only_that_trial_and_continues(make_tiny_model, tmp_path):
    """With trial_progress, each generation pass of a trial reports through log.progress; raising
    there stops the trial in its middle: Optuna records it as failed, the model holds its base
    weights, and running again adds new trials until n_trials have finished (the stopped one's
    number is spent, so later trials draw other parameters than an uninterrupted run)."""
    import optuna

    class Stop(Exception):
        pass

    class StoppingLog(type(quiet(tmp_path))):
        def progress(self, iterable=None, total=None, desc="", unit="it"):
            if desc == "generate" and pipe.search is not None and len(pipe.trials()) == 1:
                raise Stop  # the second trial's first generation pass
            return super().progress(iterable, total, desc, unit)

    model_dir = make_tiny_model("llama")
    pipe = Pipeline(tiny_settings(model_dir, tmp_path / "a", n_trials=3), log=StoppingLog("t", None, quiet=True))
    pipe.trial_progress = True
    base = weights(pipe.load_model()[0])
    with pytest.raises(Stop):
        list(pipe.run_optimization_iter())
    assert [t.state for t in pipe.search.study.get_trials()] == [
        optuna.trial.TrialState.COMPLETE,
        optuna.trial.TrialState.FAIL,
    ]
    assert all(torch.equal(v, base[k]) for k, v in pipe.model.state_dict().items())
    pipe.log = quiet(tmp_path)
    assert [t.index for t in pipe.run_optimization_iter()] == [2, 3]
    whole = Pipeline(tiny_settings(model_dir, tmp_path / "b", n_trials=1), log=quiet(tmp_path))
    first = list(whole.run_optimization_iter())[0]
    kept = pipe.trials()[0]
    assert [t.index for t in pipe.trials()] == [0, 2, 3]
    assert (kept.parameters, kept.refusals, kept.kl_divergence) == (
        first.parameters,
        first.refusals,
        first.kl_divergence,
    )


def test_without_trial_progress_a_trial_reports_no_inner_progress(make_tiny_model, tmp_path):
    bars: list[str] = []

    class Recording(type(quiet(tmp_path))):
        def progress(self, iterable=None, total=None, desc="", unit="it"):
            bars.append(desc)
            return super().progress(iterable, total, desc, unit)

    pipe = Pipeline(tiny_settings(make_tiny_model("llama"), tmp_path, n_trials=1), log=Recording("t", None, True))
    list(pipe.run_optimization_iter())
    assert "generate" not in bars and "trials" in bars  # the CLI and the stages keep one bar per run
    pipe.trial_progress = True
    pipe.settings.optimize.n_trials = 2
    list(pipe.run_optimization_iter())
    assert bars.count("generate") >= 1


# Clawly's README example of the Pipeline API, verbatim (only the model id and the trial count differ).
SEED_EXAMPLE = """
from clawly import Pipeline, Settings

settings = Settings(model="Qwen/Qwen3-4B-Instruct-2507", n_trials=50)
pipeline = Pipeline(settings)

pipeline.load_model()
pipeline.load_datasets()
pipeline.auto_batch_size()
pipeline.detect_response_prefix()
pipeline.init_evaluator()
pipeline.compute_refusal_directions()

# Stream results
for result in pipeline.run_optimization_iter():
    print(f"Trial {result.index}: {result.refusals} refusals, KL={result.kl_divergence:.4f}")

# Export best trial
best = pipeline.get_pareto_front()[0]
pipeline.restore_trial(best)
pipeline.save_model("./output")
"""


def test_the_seed_readme_example_runs_as_written(make_tiny_model, tmp_path):
    """A notebook written for Clawly runs unchanged: the same calls, in the same order, and the same
    result attributes (init_evaluator scores the base model before the directions exist)."""
    script = SEED_EXAMPLE.replace("Qwen/Qwen3-4B-Instruct-2507", str(make_tiny_model("llama"))).replace(
        "n_trials=50", "n_trials=2"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CLAWLY_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("Trial ")]
    assert [line.split(":")[0] for line in lines] == ["Trial 0", "Trial 1"]
    assert all(re.fullmatch(r"Trial \d: \d+ refusals, KL=\d+\.\d{4}", line) for line in lines)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "output")
    assert merged.config.num_hidden_layers == 2
    events = [json.loads(line)["event"] for line in (tmp_path / "artifacts" / "logs" / "pipeline.jsonl").open()]
    assert events.count("baseline") == 1  # init_evaluator scored the base model; the search reused it
