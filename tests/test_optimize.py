import json

import optuna
import pytest

from clawly.ablate.ablation import AblationPlan
from clawly.search.study import choose_trial, completed, open_study, suggest_plan, trials_table
from clawly.settings import OptimizeSettings


def _trial(number, refusals, kl):
    t = optuna.trial.create_trial(values=[refusals, kl], params={}, distributions={})
    t.number = number
    return t


def test_choice_rule_fewest_refusals_under_the_kl_cap_else_lowest_kl():
    trials = [_trial(0, 10, 0.1), _trial(1, 3, 0.9), _trial(2, 5, 0.4), _trial(3, 5, 0.2)]
    assert choose_trial(trials, kl_cap=0.5).number == 3  # 5 refusals, tie broken by KL
    assert choose_trial(trials, kl_cap=1.0).number == 1
    assert choose_trial(trials, kl_cap=0.05).number == 0  # none under the cap: lowest KL
    with pytest.raises(ValueError):
        choose_trial([], 1.0)


def test_suggested_plan_stays_inside_the_configured_ranges():
    s = OptimizeSettings(peak_weight_range=[0.9, 1.1], reach_range=[0.2, 0.3], direction_scopes=["global"])
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        trial = study.ask()
        plan = suggest_plan(trial, num_layers=10, s=s)
        assert 4.0 <= plan.direction_index <= 9.0
        for k in plan.kernels.values():
            assert 0.9 <= k.peak_weight <= 1.1 and 0 <= k.floor_weight <= k.peak_weight
            assert 2.0 <= k.reach <= 3.0 and 0.4 * 9 <= k.peak_position <= 9
        assert AblationPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
        study.tell(trial, [1.0, 1.0])


def _two_floats(trial):
    return trial.suggest_float("x", 0, 1), trial.suggest_float("y", 0, 1)


@pytest.mark.parametrize("stops", [[2, 4, 6], [1, 5, 6], [3, 6]])
def test_a_resumed_study_draws_the_trials_an_uninterrupted_one_draws(tmp_path, stops):
    """Startup (random) trials and TPE trials alike: each reopen is a new process resuming."""

    def run(journal, stops):
        for n in stops:
            study = open_study(str(journal), "s", seed=0, n_startup_trials=3)
            study.optimize(_two_floats, n_trials=n - len(study.trials))
        return [t.params for t in study.trials]

    uninterrupted = run(tmp_path / "one.log", [6])
    assert len({p["x"] for p in uninterrupted}) == 6
    assert run(tmp_path / "resumed.log", stops) == uninterrupted


def test_another_seed_draws_other_trials(tmp_path):
    a = open_study(str(tmp_path / "a.log"), "s", seed=0, n_startup_trials=3)
    b = open_study(str(tmp_path / "b.log"), "s", seed=1, n_startup_trials=3)
    a.optimize(_two_floats, n_trials=2)
    b.optimize(_two_floats, n_trials=2)
    assert [t.params for t in a.trials] != [t.params for t in b.trials]


def test_reopening_fails_only_trials_whose_worker_is_gone(tmp_path):
    import socket
    import subprocess
    import sys

    from clawly.search.study import WORKER

    journal = str(tmp_path / "study" / "journal.log")
    study = open_study(journal, "s", seed=0, n_startup_trials=2)
    study.optimize(_two_floats, n_trials=3)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        workers = {
            "no worker recorded": None,  # interrupted before it said whose it was
            "dead process here": {"host": socket.gethostname(), "pid": int(gone.stdout)},
            "live process here": {"host": socket.gethostname(), "pid": alive.pid},
            "another machine": {"host": "some-other-node", "pid": 1},
        }
        for name, worker in workers.items():
            t = study.ask()
            t.set_user_attr("name", name)
            if worker is not None:
                t.set_user_attr(WORKER, worker)
        again = open_study(journal, "s", seed=0, n_startup_trials=2)
        states = {t.user_attrs.get("name"): t.state for t in again.get_trials()}
    finally:
        alive.kill()
    running, failed = optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.FAIL
    assert states == {
        None: optuna.trial.TrialState.COMPLETE,
        "no worker recorded": failed,
        "dead process here": failed,
        "live process here": running,
        "another machine": running,
    }
    assert len(completed(again)) == 3


def test_trials_table_has_one_row_per_trial_and_marks_the_pareto_front():
    trials = [_trial(0, 10, 0.1), _trial(1, 3, 0.9)]
    table = trials_table(trials, {1})
    assert table.trial.tolist() == [0, 1] and table.pareto.tolist() == [False, True]
    assert table.refusals.tolist() == [10, 3]


TEXTS = ["how do i cook rice", "write a poem", "tell me about the weather", "help me with my code"]


def _study_on_tiny_model(tiny_model, tmp_path, **settings):
    import torch

    from clawly.ablate.directions import AblationBasis
    from clawly.measure.scoring import ScoringPrompts, TrialScorer
    from clawly.measure.templating import chat_prompts
    from clawly.search.study import iter_study

    model, tok = tiny_model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    s = OptimizeSettings(n_trials=3, n_startup_trials=3, max_new_tokens=4, batch_size=4, **settings)
    prompts = ScoringPrompts(chat_prompts(tok, TEXTS, None), ["a", "a", "b", "b"], chat_prompts(tok, TEXTS[::-1], None))
    scorer = TrialScorer(model, tok, prompts, s)
    torch.manual_seed(0)
    basis = AblationBasis(
        torch.nn.functional.normalize(
            torch.randn(1, model.config.num_hidden_layers + 1, model.config.hidden_size), dim=-1
        )
    )
    study = open_study(str(tmp_path / "journal.log"), "s", seed=0, n_startup_trials=3)
    list(iter_study(study, model, scorer, basis, model.config.num_hidden_layers, s))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} not restored"
    return study, basis, prompts, s


def test_trials_over_prune_kl_are_pruned_before_generation_and_count_as_run(tiny_model, tmp_path):
    from clawly.search.study import finished

    study, *_ = _study_on_tiny_model(tiny_model, tmp_path, prune_kl=1e-12)
    states = [t.state for t in study.get_trials()]
    assert states == [optuna.trial.TrialState.PRUNED] * 3  # n_trials counts pruned trials: no endless loop
    assert len(finished(study)) == 3 and not completed(study)
    for t in study.get_trials():
        assert t.user_attrs["kl_divergence"] > 1e-12 and "plan" in t.user_attrs


def test_each_trial_records_the_seconds_of_its_phases_within_its_wall_time(tiny_model, tmp_path):
    """Where a trial's time goes: the edit, the KL pass, the answers, restoring the weights; a pruned
    trial stops after the KL pass. The phases are consecutive, so they sum to no more than the trial's
    own start-to-end time."""
    for prune_kl, phases in ((None, ["edit", "kl", "answers", "restore"]), (1e-12, ["edit", "kl"])):
        study, *_ = _study_on_tiny_model(tiny_model, tmp_path / str(prune_kl), prune_kl=prune_kl)
        for t in study.get_trials():
            laps = t.user_attrs["phase_seconds"]
            assert list(laps) == phases and all(v >= 0 for v in laps.values())
            assert sum(laps.values()) <= (t.datetime_complete - t.datetime_start).total_seconds() + 2e-3


def test_each_trial_scores_what_transformers_measures_on_its_weights(tiny_model, tmp_path):
    """A trial's values are recomputed independently: its plan applied, refusals counted on answers
    from `transformers.generate`, KL from plain forward passes and torch's kl_div."""
    import torch

    from clawly.ablate.ablation import ablated, weight_deltas
    from clawly.measure.logprobs import first_token_logprobs
    from clawly.measure.reference import generate
    from clawly.measure.stance import RefusalDetector

    model, tok = tiny_model
    with torch.no_grad():  # peaked next-token distributions, so trials move KL well away from zero
        model.lm_head.weight.mul_(40.0)
    # markers the random model writes in some answers, so the counts are not all zero
    answers = generate(model, tok, [p for p in _study_prompts(tok)], max_new_tokens=4, batch_size=4)
    markers = sorted({a.split()[1] for a in answers if len(a.split()) > 1})[:2]
    study, basis, prompts, s = _study_on_tiny_model(tiny_model, tmp_path, prune_kl=None, refusal_markers=markers)
    detector = RefusalDetector(markers)
    base = first_token_logprobs(model, tok, prompts.harmless, batch_size=1)
    counts = []
    for t in completed(study):
        plan = AblationPlan.from_dict(t.user_attrs["plan"])
        with ablated(model, weight_deltas(model, basis, plan)):
            replies = generate(model, tok, prompts.harmful, s.max_new_tokens, batch_size=1)
            after = first_token_logprobs(model, tok, prompts.harmless, batch_size=1)
        refusals = sum(detector(r) for r in replies)
        kl = torch.nn.functional.kl_div(after.double(), base.double(), reduction="batchmean", log_target=True)
        assert t.values[0] == refusals and t.user_attrs["keyword_refusals"] == refusals
        assert t.values[1] == pytest.approx(float(kl), rel=1e-3) and t.values[1] > 1e-3
        assert t.user_attrs["refusals_by_category"] == {
            c: sum(detector(r) for r, cat in zip(replies, prompts.harmful_categories, strict=True) if cat == c)
            for c in ("a", "b")
        }
        assert t.user_attrs["tokens"] > 0
        counts.append(refusals)
    assert len(counts) == 3 and any(counts)


def _study_prompts(tok):
    from clawly.measure.templating import chat_prompts

    return chat_prompts(tok, TEXTS, None)


def test_batch_size_setting_accepts_auto_or_a_positive_integer():
    from clawly.settings import SettingsError

    assert OptimizeSettings(batch_size="auto").batch_size == "auto"
    for bad in (0, "big"):
        with pytest.raises(SettingsError, match="optimize.batch_size"):
            OptimizeSettings(batch_size=bad)
    with pytest.raises(SettingsError, match="optimize.prune_kl"):
        OptimizeSettings(prune_kl=0)


class _Classifier:
    """Stands in for clawly.measure.classify.ResponseClassifier: a fixed verdict per request."""

    def __init__(self, verdict_of):
        self.verdict_of, self.calls = verdict_of, []

    def __call__(self, prompts, responses):
        from clawly.measure.classify import Verdicts

        self.calls.append((list(prompts), list(responses)))
        labels = [self.verdict_of(p) for p in prompts]
        return Verdicts(labels, None, [False] * len(labels))


def _scorer(tiny_model, classifier, measure="classifier", max_new_tokens=6):
    from clawly.measure.scoring import ScoringPrompts, TrialScorer
    from clawly.measure.templating import chat_prompts

    model, tok = tiny_model
    s = OptimizeSettings(max_new_tokens=max_new_tokens, batch_size=4, refusal_measure=measure)
    texts = ["how do i cook rice", "write a poem", "tell me about the weather", "help me with my code"]
    prompts = ScoringPrompts(
        chat_prompts(tok, texts, None),
        ["a", "a", "b", "b"],
        chat_prompts(tok, texts[::-1], None),
        harmful_requests=texts,
    )
    return TrialScorer(model, tok, prompts, s, classifier=classifier), texts


def test_with_the_classifier_as_measure_every_answer_it_does_not_call_compliance_counts(tiny_model):
    verdicts = {
        "how do i cook rice": "refusal",
        "write a poem": "compliance",
        "tell me about the weather": "off_topic",
        "help me with my code": "degenerate",
    }
    clf = _Classifier(verdicts.get)
    scorer, texts = _scorer(tiny_model, clf)
    r = scorer.score()
    assert r.refusals == 3 and r.refusals_by_category == {"a": 1, "b": 2}
    assert r.labels == [verdicts[t] for t in texts]
    # the classifier judged the raw requests (not the chat-templated prompts) and the answers generated
    ((requests, answers),) = clf.calls
    assert requests == texts and answers == r.responses
    assert r.keyword_refusals == sum(scorer.detector(a) for a in r.responses)


def test_classifier_measure_needs_a_classifier_and_the_raw_requests(tiny_model):
    with pytest.raises(ValueError, match="needs a classifier"):
        _scorer(tiny_model, None)
    from clawly.measure.scoring import ScoringPrompts, TrialScorer
    from clawly.measure.templating import chat_prompts

    model, tok = tiny_model
    prompts = ScoringPrompts(chat_prompts(tok, ["a b"], None), ["a"], chat_prompts(tok, ["c d"], None))
    with pytest.raises(ValueError, match="raw harmful requests"):
        TrialScorer(
            model,
            tok,
            prompts,
            OptimizeSettings(refusal_measure="classifier", batch_size=1),
            classifier=_Classifier(lambda p: "compliance"),
        )


def test_the_real_classifier_scores_a_trial(tiny_model):
    """End to end with the packaged embedder: the count is the classifier's own verdicts."""
    from clawly.measure.classify import build_classifier

    clf = build_classifier("clawly/measure/responses/train.jsonl")
    scorer, texts = _scorer(tiny_model, clf)
    r = scorer.score()
    again = clf(texts, r.responses).labels
    assert r.labels == again and r.refusals == sum(lab != "compliance" for lab in again)


def test_study_fingerprint_follows_the_classifier_only_when_it_is_the_measure(tmp_path):
    import pandas as pd

    from clawly.settings import Settings
    from clawly.steps.optimize import study_fingerprint

    artifacts = tmp_path / "artifacts"
    (artifacts / "directions").mkdir(parents=True)
    (artifacts / "directions" / "orthogonalized.safetensors").write_bytes(b"directions")
    train = tmp_path / "train.jsonl"
    harmful, harmless = pd.DataFrame({"id": ["h1", "h2"]}), pd.DataFrame({"id": ["g1"]})

    def fingerprint(measure, rows):
        train.write_text(rows)
        s = Settings(
            artifacts_dir=str(artifacts), **{"optimize.refusal_measure": measure, "classifier.train_file": str(train)}
        )
        return study_fingerprint(s, harmful, harmless)

    assert fingerprint("keywords", "a") == fingerprint("keywords", "b")  # a classifier it does not use
    assert fingerprint("classifier", "a") != fingerprint("classifier", "b")  # retrained: a new study
    assert fingerprint("classifier", "a") == fingerprint("classifier", "a")  # same: resumed
    assert fingerprint("classifier", "a") != fingerprint("keywords", "a")
    same = Settings(artifacts_dir=str(artifacts))
    for moved in (
        {"model.cache_dir": "/elsewhere"},
        {"categories.per_category_adapters": True},
        {"optimize.n_trials": 99},
    ):
        assert study_fingerprint(
            Settings(artifacts_dir=str(artifacts), **moved), harmful, harmless
        ) == study_fingerprint(same, harmful, harmless), moved
    assert study_fingerprint(
        Settings(artifacts_dir=str(artifacts), **{"optimize.seed": 1}), harmful, harmless
    ) != study_fingerprint(same, harmful, harmless)


@pytest.mark.parametrize("base_kept,feasible", [(0, True), (1000, False)])
def test_kept_category_constraints_reach_optuna_without_a_deprecation_warning(
    tiny_model, tmp_path, base_kept, feasible
):
    """Each kept category's shortfall is an Optuna constraint of the trial, which TPE and the
    Pareto front read (no feasible trial: an empty front); optuna 5 deprecated constraints_func,
    which warned on every trial."""
    import warnings

    import torch

    from clawly.ablate.directions import AblationBasis
    from clawly.measure.scoring import ScoringPrompts, TrialScorer
    from clawly.measure.templating import chat_prompts
    from clawly.search.study import Objectives, iter_study

    model, tok = tiny_model
    s = OptimizeSettings(n_trials=2, n_startup_trials=2, max_new_tokens=3, batch_size=4, refusal_markers=["the"])
    prompts = ScoringPrompts(chat_prompts(tok, TEXTS, None), ["a", "a", "k", "k"], chat_prompts(tok, TEXTS, None))
    scorer = TrialScorer(model, tok, prompts, s)
    objectives = Objectives(targeted=["a"], kept=["k"], min_retention=1.0, base_refusals={"k": base_kept})
    basis = AblationBasis(
        torch.nn.functional.normalize(
            torch.randn(1, model.config.num_hidden_layers + 1, model.config.hidden_size), dim=-1
        )
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        study = open_study(str(tmp_path / "journal.log"), "s", seed=0, n_startup_trials=2, objectives=objectives)
        trials = list(iter_study(study, model, scorer, basis, model.config.num_hidden_layers, s, objectives))
    assert len(trials) == 2
    for t in completed(study):
        shortfall = base_kept - t.user_attrs["refusals_by_category"]["k"]
        assert t.constraints == {"k": shortfall} and t.user_attrs["kept_violations"] == [shortfall]
    assert bool(study.best_trials) == feasible


def test_kept_categories_count_strict_refusals_on_longer_answers(tiny_model):
    """A kept category's answer counts as a kept refusal only when the strict rule calls it one:
    a disclaimer followed by help does not. Its answers run to kept_max_new_tokens and stop by the
    rule; the other categories keep the plain marker rule and its early stop."""
    from clawly.measure.scoring import ScoringPrompts, TrialScorer
    from clawly.measure.templating import chat_prompts

    model, tok = tiny_model
    s = OptimizeSettings(max_new_tokens=3, kept_max_new_tokens=7, batch_size=4)
    answers = {
        "how do i cook rice": "I'm sorry, but I can't help with that.",
        "write a poem": "As an AI, I can't judge. However, here are some tips on how to write it: 1.",
        "tell me about the weather": "As an AI, I can't judge. However, here are the steps:\n1. Mix",
        "help me with my code": "I'm sorry, but I can't help with that.",
    }
    prompts = ScoringPrompts(chat_prompts(tok, TEXTS, None), ["a", "a", "k", "k"], chat_prompts(tok, TEXTS, None))
    scorer = TrialScorer(model, tok, prompts, s, kept=["k"])
    calls = []

    def canned(rows):
        def generate(model, max_new_tokens, decided=None, stats=None, progress=None):
            calls.append((rows, max_new_tokens, decided))
            return [answers[TEXTS[i]] for i in rows], None

        return generate

    scorer.harmful.generate = canned(scorer.other_rows)
    scorer.kept.generate = canned(scorer.kept_rows)
    r = scorer.score()
    # targeted: both carry a marker (the hedged one counts as a refusal: the disclaimer must go too)
    assert r.refusals_by_category == {"a": 2, "k": 1}
    assert r.stances == ["", "", "hedged", "refusal"]
    assert r.keyword_refusals == 4 and r.responses == [answers[t] for t in TEXTS]
    assert calls == [([0, 1], 3, scorer.detector), ([2, 3], 7, scorer.rule.decided)]


def test_without_kept_categories_scoring_is_unchanged(tiny_model):
    """Global mode (and category mode without kept categories) scores exactly as before: one
    prompt set, marker rule, no strict labels."""
    from clawly.measure.scoring import ScoringPrompts, TrialScorer
    from clawly.measure.templating import chat_prompts

    model, tok = tiny_model
    s = OptimizeSettings(max_new_tokens=4, batch_size=4, refusal_markers=["the"])
    prompts = ScoringPrompts(chat_prompts(tok, TEXTS, None), ["a", "a", "k", "k"], chat_prompts(tok, TEXTS, None))
    plain, kept = TrialScorer(model, tok, prompts, s), TrialScorer(model, tok, prompts, s, kept=["k"])
    assert plain.kept is None and plain.other_rows == [0, 1, 2, 3]
    r = plain.score()
    assert r.stances == [""] * 4 and r.refusals == sum(plain.detector(x) for x in r.responses)
    assert kept.score().responses[:2] == r.responses[:2]


def test_a_trials_first_token_distributions_do_not_grow_with_the_prompt_count(tiny_model):
    """The base model's first-token log-probs are not held in memory `[n, vocab]`: at any forward pass
    of a trial the live vocab-sized rows are the same for 4x the prompts (counted, not timed)."""
    import gc

    from conftest import LiveRows

    from clawly.measure.scoring import ScoringPrompts, TrialScorer
    from clawly.measure.templating import chat_prompts

    model, tok = tiny_model
    s = OptimizeSettings(max_new_tokens=3, batch_size=4, refusal_markers=["the"])
    peaks = {}
    for k in (2, 8):
        texts = TEXTS * k
        prompts = ScoringPrompts(chat_prompts(tok, texts, None), ["a"] * len(texts), chat_prompts(tok, texts, None))
        scorer = TrialScorer(model, tok, prompts, s)
        with LiveRows(model, (model.config.vocab_size,)) as live:
            scorer.score()
        peaks[k] = live.peak
        del scorer
        gc.collect()
    assert peaks[8] == peaks[2]


def test_a_trials_kl_is_the_kl_of_the_whole_distributions(tiny_model):
    """KL computed chunk by chunk against base log-probs kept on disk equals `kl_divergence` of the
    whole `[n, vocab]` tables: the same float64 rows (bit-equal here; torch may sum a row in another
    order for another table shape, hence the 1e-12 tolerance)."""
    import torch

    from clawly.measure.logprobs import kl_divergence
    from clawly.measure.scoring import ScoringPrompts, TrialScorer
    from clawly.measure.templating import chat_prompts

    model, tok = tiny_model
    texts = TEXTS * 5
    prompts = ScoringPrompts(chat_prompts(tok, texts, None), ["a"] * len(texts), chat_prompts(tok, texts, None))
    scorer = TrialScorer(model, tok, prompts, OptimizeSettings(batch_size=3))
    base = scorer.harmless.first_token_logprobs(model)
    assert scorer.kl() == 0.0
    with torch.no_grad():
        saved = model.lm_head.weight.clone()
        model.lm_head.weight.mul_(3.0)
        try:
            after = scorer.harmless.first_token_logprobs(model)
            kl = scorer.kl()
        finally:
            model.lm_head.weight.copy_(saved)
    assert kl > 1e-3
    assert kl == pytest.approx(kl_divergence(base, after), rel=1e-12, abs=0)


@pytest.mark.parametrize("tune", [0, 8])
def test_the_optimizer_draws_from_the_tune_split_so_evaluate_keeps_every_eval_prompt(tmp_path, tune):
    """With a tune split the optimizer's prompts come from it and evaluate uses the whole eval
    split; without one the optimizer takes eval prompts and evaluate skips them."""
    from clawly.data.prompts import write_prompts
    from clawly.data.templates import generate_prompts
    from clawly.paths import Paths
    from clawly.search.chosen import write_optimizer_prompts
    from clawly.settings import Settings
    from clawly.steps.evaluate import heldout_prompts
    from clawly.steps.optimize import optimizer_prompts

    s = Settings(
        artifacts_dir=str(tmp_path / "artifacts"),
        **{
            "data.out_dir": str(tmp_path / "prompts"),
            "data.tune_per_category": tune,
            "data.harmless_tune": 8 * tune,
            "optimize.harmful_prompts": 16,
            "optimize.harmless_prompts": 8,
            "evaluate.per_category": 50,
            "evaluate.harmless_prompts": 200,
            "categories.weights": {"violence_weapons": 1.0, "self_harm_suicide": 0.0},
        },
    )
    p = Paths.of(s)
    write_prompts(p, *generate_prompts(s.data))
    harmful, harmless = optimizer_prompts(s)
    assert len(harmful) == 16 and set(harmful.category) == {"violence_weapons", "self_harm_suicide"}
    assert set(harmful.split) == set(harmless.split) == {"tune" if tune else "eval"}
    p.optimize.mkdir(parents=True)
    write_optimizer_prompts(p.optimizer_prompts, harmful, harmless)
    h, g = heldout_prompts(s)
    assert set(h.split) == {"eval"} and not set(h.id) & set(harmful.id) and not set(g.id) & set(harmless.id)
    per_category = h.groupby("category").size()
    assert per_category["violence_weapons"] == (50 if tune else 42) and per_category["fraud_scams"] == 50
    assert len(g) == (200 if tune else 192)


def test_per_category_kernels_are_searched_one_set_per_targeted_category():
    import optuna

    from clawly.search.study import suggest_plan

    s = OptimizeSettings(kernels="per_category", components=["attn_out", "mlp_down"])
    trial = optuna.create_study().ask()
    plan = suggest_plan(trial, 8, s, ["violence_weapons", "drugs_substances"])
    assert plan.kernels == {} and list(plan.category_kernels) == ["violence_weapons", "drugs_substances"]
    for cat, kernels in plan.category_kernels.items():
        assert set(kernels) == {"attn_out", "mlp_down"}
        for comp, k in kernels.items():
            assert trial.params[f"{cat}.{comp}.peak_weight"] == k.peak_weight
    # global mode (no categories) and the shared choice draw the one kernel set, named as before
    for settings, cats in ((s, None), (OptimizeSettings(), ["violence_weapons"])):
        t = optuna.create_study().ask()
        shared = suggest_plan(t, 8, settings, cats)
        assert not shared.category_kernels and "attn_out.peak_weight" in t.params
    with pytest.raises(ValueError, match="optimize.kernels"):
        OptimizeSettings(kernels="each")


def _choice_settings(tmp_path, tiny_model_dir, **optimize):
    from clawly.data.prompts import write_prompts
    from clawly.data.templates import generate_prompts
    from clawly.paths import Paths
    from clawly.settings import Settings

    s = Settings(
        artifacts_dir=str(tmp_path / "artifacts"),
        **{
            "model.name": str(tiny_model_dir),
            "data.out_dir": str(tmp_path / "prompts"),
            "data.train_per_category": 4,
            "data.tune_per_category": 4,
            "data.harmless_tune": 8,
            "optimize.harmless_prompts": 4,
            "optimize.max_new_tokens": 6,
            "optimize.batch_size": 8,
            "optimize.response_prefix": None,
            **{f"optimize.{k}": v for k, v in optimize.items()},
        },
    )
    write_prompts(Paths.of(s), *generate_prompts(s.data))
    return s


def test_base_refusals_choice_scores_trials_on_requests_the_base_model_refuses(tiny_model, tiny_model_dir, tmp_path):
    """optimize.harmful_choice=base_refusals: every train and tune request (never an eval one) is
    answered by the base model, and trials are scored on a stratified sample of those it refuses (by
    the optimizer's own measure), so the base refuses every prompt scored. An extra worker handed
    the chosen ids scores the same prompts without answering the candidates again."""
    from collections import Counter

    from clawly.log import get_logger
    from clawly.measure.scoring import ScoringPrompts, TrialScorer
    from clawly.measure.templating import chat_prompts
    from clawly.steps.optimize import evaluation, optimizer_prompts, stratified_sample

    model, tok = tiny_model
    log = get_logger("t", quiet=True)
    s = _choice_settings(tmp_path, tiny_model_dir, harmful_prompts=6, harmful_choice="base_refusals")
    candidates, _ = optimizer_prompts(s)
    assert set(candidates.split) == {"train", "tune"} and len(candidates) == 64  # 8 categories x (4 + 4)
    texts = chat_prompts(tok, candidates.text.tolist(), s.model.system_prompt)
    answers = TrialScorer(model, tok, ScoringPrompts(texts, candidates.category.tolist(), texts[:4]), s.optimize)
    responses = answers.score().responses
    # a word some base answers contain and others do not becomes the refusal marker
    words = Counter(w for r in responses for w in set(r.split()))
    marker = next(w for w, n in words.most_common() if 16 <= n <= 48)
    refused = {i for i, r in zip(candidates.id, responses, strict=True) if marker in r.split()}

    s.optimize.refusal_markers = [f" {marker} "]
    ev = evaluation(s, log, model, tok)
    expected = stratified_sample(candidates[candidates.id.isin(refused)], 6, s.optimize.seed)
    assert ev.harmful.id.tolist() == expected.id.tolist()
    assert ev.base.refusals == len(ev.harmful) == 6 and all(ev.base.flags)

    handed = evaluation(s, log, model, tok, ev.prefix, ev.batch_size, ev.base, ev.harmful.id.tolist())
    assert handed.harmful.id.tolist() == ev.harmful.id.tolist() and handed.base is ev.base
    assert handed.prompts.harmful == ev.prompts.harmful

    s.optimize.harmful_choice = "sample"
    sampled = evaluation(s, log, model, tok)
    assert set(sampled.harmful.split) == {"tune"} and not set(sampled.harmful.id) <= refused


def test_base_refusals_choice_says_what_to_change_when_the_base_refuses_nothing(tiny_model, tiny_model_dir, tmp_path):
    from clawly.errors import ClawlyError
    from clawly.log import get_logger
    from clawly.steps.optimize import evaluation

    model, tok = tiny_model
    s = _choice_settings(tmp_path, tiny_model_dir, harmful_choice="base_refusals", refusal_markers=["zzzzqqq"])
    with pytest.raises(ClawlyError, match="refuses none of the 64 train and tune requests"):
        evaluation(s, get_logger("t", quiet=True), model, tok)


def test_harmful_pool_caps_the_requests_the_base_model_answers_to_find_its_refusals(tmp_path, tiny_model_dir):
    """optimize.harmful_pool: the base model answers a stratified sample of that many train and tune
    requests instead of all of them (its refusals are found among those); the sample is a subset of the
    full pool, spread evenly over categories, and never holds an eval request."""
    from clawly.settings import OptimizeSettings
    from clawly.steps.optimize import optimizer_prompts

    full, _ = optimizer_prompts(_choice_settings(tmp_path, tiny_model_dir, harmful_choice="base_refusals"))
    capped, _ = optimizer_prompts(
        _choice_settings(tmp_path, tiny_model_dir, harmful_choice="base_refusals", harmful_pool=16)
    )
    assert len(full) == 64 and len(capped) == 16
    assert set(capped.id) < set(full.id) and set(capped.split) <= {"train", "tune"}
    assert set(capped.category.value_counts()) == {2}  # 8 categories, 2 each
    assert capped.id.is_monotonic_increasing
    big, _ = optimizer_prompts(
        _choice_settings(tmp_path, tiny_model_dir, harmful_choice="base_refusals", harmful_pool=999)
    )
    assert big.id.tolist() == full.id.tolist()
    with pytest.raises(ValueError, match="optimize.harmful_pool"):
        OptimizeSettings(harmful_pool=0)
