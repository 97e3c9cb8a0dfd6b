"""Refusals the user asks for: the instructed category's system prompts reach every stage that
renders its requests; global mode leaves it out of the refusal direction and the optimizer's
prompts; category mode protects it when the preset lists it at 0."""

import pandas as pd
import pytest
import torch
from test_api import quiet, tiny_settings

from clawly import Pipeline
from clawly.ablate.activations import probe_residuals, read_activations
from clawly.ablate.directions import read_refusal_directions, refusal_directions
from clawly.data.prompts import instructed_categories, read_prompts, row_systems
from clawly.measure.templating import chat_prompts
from clawly.paths import Paths
from clawly.save.export import prompts_fingerprint

TOLD = "instructed_refusal"


def test_chat_prompts_render_each_requests_own_system_prompt(tiny_model):
    _, tok = tiny_model
    out = chat_prompts(tok, ["one ?", "two ?", "three ?"], ["you talk of trains .", None, "you talk of boats ."])
    assert "trains" in out[0] and "boats" not in out[0]
    assert "system" not in out[1] and "boats" in out[2]
    assert out[1] == chat_prompts(tok, ["two ?"], None)[0]
    with pytest.raises(ValueError, match="2 system prompts for 3 requests"):
        chat_prompts(tok, ["a", "b", "c"], ["x", "y"])


def test_row_systems_fall_back_to_the_runs_system_prompt_and_old_tables_read_without_one():
    frame = pd.DataFrame({"text": ["a", "b"], "category": ["x", "told"], "system": ["", "only trains"]})
    assert row_systems(frame, "default") == ["default", "only trains"]
    assert instructed_categories(frame) == {"told"}
    old = frame.drop(columns="system")
    assert row_systems(old, "default") == ["default", "default"] and instructed_categories(old) == set()


@pytest.fixture(scope="module")
def global_pipe(tmp_path_factory, make_tiny_model):
    tmp = tmp_path_factory.mktemp("instructed-global")
    pipe = Pipeline(tiny_settings(make_tiny_model("llama"), tmp), log=quiet(tmp))
    pipe.compute_refusal_directions()
    return pipe


def test_instructed_requests_are_probed_with_their_own_system_prompt(global_pipe):
    pipe = global_pipe
    p = Paths.of(pipe.settings)
    harmful, _ = read_prompts(p)
    ids, cats, res = read_activations(p.harmful_activations)
    row = harmful.set_index("id").loc[next(i for i, c in zip(ids, cats, strict=True) if c == TOLD)]
    assert row.system
    model, tok = pipe.load_model()

    def residuals(system):
        prompt = chat_prompts(tok, [row.text], system)
        return next(probe_residuals(model, tok, prompt, 1))[1][0]

    stored = res[ids.index(row.name)]
    torch.testing.assert_close(stored, residuals(row.system), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(stored, residuals(pipe.settings.model.system_prompt), atol=1e-4)


def test_the_global_direction_leaves_the_instructed_category_out(global_pipe):
    p = Paths.of(global_pipe.settings)
    _, cats, res = read_activations(p.harmful_activations)
    d = read_refusal_directions(p.directions)
    safety = torch.tensor([c != TOLD for c in cats])
    assert 0 < int(safety.sum()) < len(cats)
    torch.testing.assert_close(d.harmful_mean.double(), res[safety].double().mean(0), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(d.harmful_mean.double(), res.double().mean(0), atol=1e-4)
    # it still has a direction of its own, so that a preset can protect it
    told = refusal_directions(
        res[~safety].double().mean(0), d.harmless_mean.double(), global_pipe.settings.directions.projected
    )
    torch.testing.assert_close(d.category_directions[TOLD].double(), told, rtol=1e-4, atol=1e-5)


def test_global_mode_never_scores_the_instructed_category(global_pipe):
    search = global_pipe.start_search()
    assert len(search.harmful) and TOLD not in set(search.harmful.category)


def test_category_mode_protects_it_with_its_system_prompts(make_tiny_model, tmp_path):
    weights = {"violence_weapons": 1.0, TOLD: 0.0}
    pipe = Pipeline(
        tiny_settings(make_tiny_model("llama"), tmp_path, **{"categories.weights": weights, "harmful_prompts": 12}),
        log=quiet(tmp_path),
    )
    search = pipe.start_search()
    assert search.ablation.mode == "category" and search.ablation.kept == [TOLD]
    rows = search.harmful.reset_index(drop=True)
    told = rows.index[rows.category == TOLD].tolist()
    assert told and search.scorer.kept_rows == told  # scored as a kept category, by the strict rule
    # the removed direction is orthogonal to the instructed category's own direction
    kept = read_refusal_directions(Paths.of(pipe.settings).directions).category_directions[TOLD].double()
    assert torch.einsum("mpd,pd->mp", search.ablation.directions.double(), kept).abs().max() < 1e-6
    for i in told:  # rendered with the row's own system prompt, not the run's
        assert rows.system[i] and rows.system[i] in search.prompts.harmful[i]
        assert pipe.settings.model.system_prompt not in search.prompts.harmful[i]
    for i in rows.index[rows.category != TOLD]:
        assert pipe.settings.model.system_prompt in search.prompts.harmful[i]


def test_the_reproduction_fingerprint_covers_the_rows_system_prompts():
    frame = pd.DataFrame(
        {
            "id": ["a", "b"],
            "text": ["x", "y"],
            "category": ["c", "told"],
            "split": ["train"] * 2,
            "system": ["", "only trains"],
        }
    )
    other = frame.assign(system=["", "only boats"])
    assert prompts_fingerprint(frame) != prompts_fingerprint(other)
    # tables where no row has its own system prompt keep the fingerprint they had before the column
    plain = frame.assign(system="")
    assert prompts_fingerprint(plain) == prompts_fingerprint(plain.drop(columns="system"))
