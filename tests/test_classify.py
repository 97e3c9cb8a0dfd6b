"""The response classifier on the project's labelled responses: floors a regression would break."""

import pytest
import torch

from clawly.classify import (
    LABELS,
    ClassifierError,
    Embedder,
    ResponseClassifier,
    build_classifier,
    looks_degenerate,
    read_labelled,
    scores,
    text_features,
)
from clawly.evaluation import RefusalDetector

TRAIN, TEST = "data/responses/train.jsonl", "data/responses/test.jsonl"


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    return build_classifier(TRAIN, cache_dir=tmp_path_factory.mktemp("clf"))


@pytest.fixture(scope="module")
def test_rows():
    return read_labelled(TEST)


def test_the_labelled_sets_are_apart_and_cover_every_label():
    train, test = read_labelled(TRAIN), read_labelled(TEST)
    assert {r["label"] for r in train} == {r["label"] for r in test} == set(LABELS)
    assert not {r["response"] for r in train} & {r["response"] for r in test}
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}


def test_classifier_beats_the_keyword_rule_on_held_apart_responses(classifier, test_rows):
    predicted = classifier([r["prompt"] for r in test_rows], [r["response"] for r in test_rows]).labels
    s = scores(test_rows, predicted)
    detector = RefusalDetector()
    k = scores(test_rows, ["refusal" if detector(r["response"]) else "compliance" for r in test_rows])
    # Floors set a little under the measured figures (README); a regression breaks them.
    assert s["refusal"]["recall"] >= 0.78 and s["refusal"]["precision"] >= 0.75
    assert s["not_compliant"]["recall"] >= 0.8 and s["not_compliant"]["precision"] >= 0.83
    assert s["degenerate"]["recall"] >= 0.85 and s["off_topic"]["recall"] >= 0.45
    assert s["accuracy"] >= 0.74
    assert s["refusal"]["recall"] > k["refusal"]["recall"] + 0.2  # soft refusals: markers miss them


def test_soft_refusals_and_marker_in_compliance_go_the_right_way(classifier, test_rows):
    hard = [r for r in test_rows if r["note"] in ("soft_refusal", "marker_in_compliance")]
    v = classifier([r["prompt"] for r in hard], [r["response"] for r in hard])
    right = sum(p == r["label"] for p, r in zip(v.labels, hard, strict=True))
    assert right >= 0.7 * len(hard)
    assert v.probs.shape == (len(hard), len(LABELS))
    torch.testing.assert_close(v.probs.sum(-1), torch.ones(len(hard)))


def test_cached_classifier_gives_the_same_verdicts(tmp_path, test_rows):
    a = build_classifier(TRAIN, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("classifier-*.safetensors"))) == 1
    b = build_classifier(TRAIN, cache_dir=tmp_path)  # loaded, not retrained
    rows = test_rows[:20]
    pa = a([r["prompt"] for r in rows], [r["response"] for r in rows]).probs
    pb = b([r["prompt"] for r in rows], [r["response"] for r in rows]).probs
    torch.testing.assert_close(pa, pb)


def test_degenerate_text_features():
    assert looks_degenerate("") and looks_degenerate("... ... ...")
    assert looks_degenerate("the the the the the the the the the the")
    assert looks_degenerate("I will go. I will go. I will go. I will go. I will go.")
    assert not looks_degenerate("Sure, here is a short poem about the sea and the wind at night.")
    assert all(0.0 <= x <= 1.0 for x in text_features("Hola мир 123 !!!"))


def test_relevance_feature_separates_an_answer_from_a_different_topic():
    e = Embedder()
    x = ResponseClassifier.features(e, RefusalDetector(), ["How do I bake bread at home?"] * 2,
                                    ["Mix flour, water, yeast and salt, knead, let it rise, then bake.",
                                     "The Roman Empire split into eastern and western halves."])
    relevance = x[:, e.model.config.hidden_size]
    assert relevance[0] > relevance[1] + 0.2


def test_missing_or_bad_inputs_are_clear_errors(tmp_path):
    with pytest.raises(ClassifierError, match="not found"):
        read_labelled(tmp_path / "nope.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "response": "r", "label": "maybe"}\n')
    with pytest.raises(ClassifierError, match="unknown label"):
        read_labelled(bad)
    with pytest.raises(ClassifierError, match="not a model directory"):
        Embedder(tmp_path)


def test_local_judge_gives_one_verdict_per_answer_from_a_local_model(tiny_model_dir):
    from clawly.classify import LocalJudge

    judge = LocalJudge(str(tiny_model_dir), device="cpu")
    v = judge(["how do i cook rice", "write a poem"], ["boil it in water", "the the the"])
    assert len(v.labels) == 2 and set(v.labels) <= set(LABELS)
    torch.testing.assert_close(v.probs.sum(-1), torch.ones(2))
    again = judge(["how do i cook rice", "write a poem"], ["boil it in water", "the the the"])
    torch.testing.assert_close(v.probs, again.probs)  # deterministic


def test_local_judge_refuses_a_tokenizer_that_cannot_tell_verdicts_apart(tiny_model_dir, tmp_path, monkeypatch):
    from clawly.classify import LocalJudge

    monkeypatch.setattr("clawly.classify.LABELS", ("zzqx", "zzqy", "zzqz", "zzqw"))  # all unknown words
    with pytest.raises(ClassifierError, match="cannot tell the verdict words apart"):
        LocalJudge(str(tiny_model_dir), device="cpu")
