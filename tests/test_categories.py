import optuna
import pytest
import torch

from clawly.ablate.categories import (
    category_directions,
    category_table,
    check_categories,
    low_retention,
    wilson_interval,
)
from clawly.ablate.directions import RefusalDirections
from clawly.errors import ClawlyError
from clawly.measure.scoring import Scores
from clawly.search.study import Objectives, choose_trial
from clawly.settings import CategorySettings


def _directions(p=3, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    core = torch.randn(p, d, generator=g)
    by_category = {c: core + 0.5 * torch.randn(p, d, generator=g) for c in ("a", "b", "k")}
    harmless = torch.randn(p, d, generator=g)
    return RefusalDirections(core, core, core, harmless, by_category, {})


def test_category_directions_follow_preset_order_and_protect_kept():
    s = CategorySettings(weights={"b": 1.0, "a": 0.5, "k": 0.0})
    cd = category_directions(_directions(), s, orthogonalize=True, protect_harmless=False)
    assert cd.names == ["b", "a"] and cd.weights == [1.0, 0.5] and cd.kept == ["k"]
    k = _directions().category_directions["k"].double()
    assert torch.einsum("mpd,pd->mp", cd.basis.directions, k).abs().max() < 1e-10
    assert (cd.basis.retained < 1).all() and set(cd.kept_cosine["a"]) == {"k"}
    off = category_directions(_directions(), s, orthogonalize=False, protect_harmless=False)
    assert torch.einsum("mpd,pd->mp", off.basis.directions, k).abs().max() > 1e-3  # not protected when off


def test_unknown_category_is_one_clear_error():
    with pytest.raises(ClawlyError, match="names category with no prompts: violence; the prompts have: a, b"):
        check_categories(CategorySettings(weights={"violence": 1.0}), ["a", "b"])


def test_low_retention_lists_probe_points_below_threshold():
    retained = torch.tensor([[1.0, 0.9, 0.1, 0.2], [1.0, 1.0, 1.0, 1.0]])
    assert low_retention(retained, ["a", "b"], 0.3) == {"a": [2, 3]}


def test_wilson_interval_contains_the_rate_and_narrows_with_n():
    lo, hi = wilson_interval(5, 10)
    assert lo < 0.5 < hi
    lo2, hi2 = wilson_interval(50, 100)
    assert hi2 - lo2 < hi - lo
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0


def test_category_table_roles_rates_and_retention():
    t = category_table(
        {"a": 10, "k": 8, "u": 5}, {"a": 6, "k": 4, "u": 2}, {"a": 1, "k": 3, "u": 0}, {"a": 1.0, "k": 0.0}
    )
    assert t["a"]["role"] == "targeted" and t["k"]["role"] == "kept" and t["u"]["role"] == "untargeted"
    assert t["k"]["retention"] == 0.75 and "retention" not in t["a"]
    assert t["a"]["base_rate"] == 0.6 and t["a"]["after_rate"] == 0.1


def _result(by_cat, kl=0.1):
    return Scores(sum(by_cat.values()), kl, by_cat, {c: 10 for c in by_cat})


def test_objectives_count_targeted_refusals_and_kept_violations():
    o = Objectives(
        targeted=["a"], kept=["k"], keep_rule="constraint", min_retention=0.8, base_refusals={"a": 6, "k": 5}
    )
    r = _result({"a": 2, "k": 3})
    assert o.values(r) == (2.0, 0.1) and o.directions == ["minimize", "minimize"] and o.constrained
    assert o.violations(r) == [pytest.approx(1.0)]  # 0.8 * 5 - 3
    o3 = Objectives(targeted=["a"], kept=["k"], keep_rule="objective", base_refusals={"k": 5})
    assert o3.values(r) == (2.0, 0.1, 3.0) and o3.directions[-1] == "maximize" and not o3.constrained
    assert Objectives().values(r) == (5.0, 0.1)  # global mode: every category counts


def test_choice_rule_prefers_trials_that_keep_kept_refusals():
    def trial(n, refusals, kl, violation):
        t = optuna.trial.create_trial(
            values=[refusals, kl], params={}, distributions={}, user_attrs={"kept_violations": [violation]}
        )
        t.number = n
        return t

    trials = [trial(0, 0, 0.1, 2.0), trial(1, 4, 0.2, -1.0), trial(2, 3, 0.3, 0.0), trial(3, 1, 0.9, 0.0)]
    assert choose_trial(trials, kl_cap=0.5).number == 2  # trial 0 has fewer refusals but loses kept ones
    assert choose_trial([trials[0], trial(4, 5, 0.1, 1.0)], kl_cap=0.5).number == 4  # least short


def test_in_global_mode_every_category_is_targeted():
    t = category_table({"a": 4, "b": 4}, {"a": 2, "b": 1}, {"a": 0, "b": 0}, {})
    assert {r["role"] for r in t.values()} == {"targeted"}
