"""Refusal direction optimization on tiny models: the hooks equal the weight change, the loss falls,
the direction stays a unit vector, and the kept term holds the base model's answers."""

import pytest
import torch

from clawly.ablate.ablation import AblationPlan, LayerKernel, ablated, weight_deltas
from clawly.ablate.directions import AblationBasis
from clawly.ablate.rdo import RdoTargets, optimize_direction, projected_out
from clawly.measure.logprobs import answer_cross_entropy, first_token_logprobs
from clawly.measure.templating import chat_prompts

TARGETED = ["how do i cook rice", "write a poem about rain", "tell me about the weather today"]
KEPT = ["help me with my code", "what is the capital of france"]
HARMLESS = ["name three colours", "count to five", "say hello"]


def _unit(d, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0)


def test_projecting_out_of_writer_outputs_is_the_weight_change_at_strength_one(build_tiny_model):
    """What RDO optimizes through hooks is what the pipeline applies to the weights: the same
    direction removed with strength 1 from every writer."""
    model, tok = build_tiny_model("qwen2", num_layers=3)  # biased writers too
    r = _unit(model.config.hidden_size, 0)
    prompts = chat_prompts(tok, TARGETED, None)
    with torch.no_grad(), projected_out(model, r):
        hooked = first_token_logprobs(model, tok, prompts)
    flat = LayerKernel(1.0, 0.0, 1.0, 100.0)
    plan = AblationPlan({"attn_out": flat, "mlp_down": flat})
    basis = AblationBasis(r.double().expand(model.config.num_hidden_layers + 1, -1).unsqueeze(0).clone())
    with torch.no_grad(), ablated(model, weight_deltas(model, basis, plan)):
        edited = first_token_logprobs(model, tok, prompts)
    with torch.no_grad():
        base = first_token_logprobs(model, tok, prompts)
    torch.testing.assert_close(hooked, edited, rtol=1e-4, atol=1e-4)
    assert (hooked - base).abs().max() > 1e-3  # and it does change the model


def _peaky(model):
    """A random tiny model's next-token distribution is nearly uniform and its layers write little;
    scaled up, its answers depend on what the writers add, as a trained model's do."""
    from clawly.ablate.ablation import writers

    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
        for w in writers(model):
            w.module.weight.mul_(8.0)
    return model


def _greedy(model, tok, prompts, n=6):
    answers = []
    with torch.no_grad():
        for p in prompts:
            ids = tok(p, add_special_tokens=False, return_tensors="pt").input_ids
            out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
            answers.append(out[0, ids.shape[1] :].tolist())
    return answers


def _targets(model, tok, refusal_tokens=None, kept_answers=None):
    targeted = chat_prompts(tok, TARGETED, None)
    kept = chat_prompts(tok, KEPT, None)
    harmless = chat_prompts(tok, HARMLESS, None)
    with torch.no_grad():
        first = first_token_logprobs(model, tok, targeted).argmax(-1).tolist()
        h = first_token_logprobs(model, tok, harmless)
    answers = kept_answers or _greedy(model, tok, kept)
    return targeted, harmless, RdoTargets(refusal_tokens or sorted(set(first)), answers, kept, h)


def test_the_optimized_direction_lowers_its_loss_and_stays_a_unit_vector(build_tiny_model):
    model, tok = build_tiny_model("llama", num_layers=2)
    _peaky(model)
    targeted, harmless, targets = _targets(model, tok)
    before = {n: p.clone() for n, p in model.state_dict().items()}
    init = _unit(model.config.hidden_size, 1)
    result = optimize_direction(model, tok, init, targeted, targets, harmless, steps=25, lr=0.05)
    first, last = result.history[0], result.history[-1]
    assert last["loss"] < 0.8 * first["loss"], (first, last)
    assert last["refusal_probability"] < first["refusal_probability"]
    assert abs(float(result.direction.norm()) - 1.0) < 1e-5 and result.direction.shape == init.shape
    assert not torch.allclose(result.direction, init)
    for n, p in model.state_dict().items():  # the weights are untouched
        assert torch.equal(p, before[n]), n


def test_the_kept_term_gives_the_kept_answers_back_their_probability(build_tiny_model):
    """A construction where keeping is possible: only the kept term (targeted prompts that the
    model does not open with the 'refusal' token, no harmless term). From a start that hurts
    the kept answers, the optimization brings most of their base probability back."""
    model, tok = build_tiny_model("llama", num_layers=2)
    _peaky(model)
    kept = chat_prompts(tok, KEPT, None)
    answers = _greedy(model, tok, kept)  # the base model's own answers, as base_targets takes them
    with torch.no_grad():
        base_ce = float(answer_cross_entropy(model, tok, kept, answers))
    targeted, harmless, targets = _targets(model, tok, refusal_tokens=[0], kept_answers=answers)
    # the start: the direction that hurts the kept answers most among a few random ones
    starts = [_unit(model.config.hidden_size, s) for s in range(8)]

    def kept_ce(r):
        with torch.no_grad(), projected_out(model, r):
            return float(answer_cross_entropy(model, tok, kept, answers))

    init = max(starts, key=kept_ce)
    result = optimize_direction(model, tok, init, targeted, targets, harmless, steps=40, lr=0.05, harmless_weight=0.0)
    start, end = result.history[0]["kept"], result.history[-1]["kept"]
    assert start > base_ce + 0.05
    assert end - base_ce < 0.5 * (start - base_ce), (base_ce, start, end)


def test_rdo_without_base_refusals_says_so(build_tiny_model):
    from clawly.errors import ClawlyError

    model, tok = build_tiny_model("llama", num_layers=2)
    targeted, harmless, targets = _targets(model, tok)
    targets.refusal_tokens = []
    with pytest.raises(ClawlyError, match="refused none"):
        optimize_direction(model, tok, _unit(model.config.hidden_size, 0), targeted, targets, harmless, steps=1)


@pytest.mark.parametrize("mode", ["category", "global"])
def test_compute_directions_with_rdo_replaces_the_targeted_directions_only(build_tiny_model, tmp_path, mode):
    """directions.method=rdo: each targeted category's direction (global mode: the refusal
    direction) becomes one learned unit vector at every probe point; kept categories' directions
    and the file's other tensors are as difference of means made them."""
    import copy

    from clawly.ablate.directions import RefusalDirections
    from clawly.data.prompts import write_prompts
    from clawly.data.templates import generate_prompts
    from clawly.log import StageLogger
    from clawly.paths import Paths
    from clawly.settings import Settings
    from clawly.steps.compute_directions import optimized_directions

    model, tok = build_tiny_model("llama", num_layers=2)
    _peaky(model)
    weights = {"violence_weapons": 1.0, "drugs_substances": 1.0, "self_harm_suicide": 0.0} if mode == "category" else {}
    s = Settings(
        artifacts_dir=str(tmp_path / "a"),
        **{
            "data.out_dir": str(tmp_path / "p"),
            "data.train_per_category": 6,
            "data.eval_per_category": 2,
            "data.harmless_train": 40,
            "data.harmless_eval": 8,
            "directions.method": "rdo",
            "directions.rdo_steps": 3,
            "directions.rdo_prompts": 3,
            "directions.rdo_lr": 0.05,
            "categories.weights": weights,
            "model.system_prompt": None,
            # a random model's answers never refuse; with this marker its opening always "does"
            "optimize.refusal_markers": ["e"],
        },
    )
    write_prompts(Paths.of(s), *generate_prompts(s.data))
    p, d = 3, model.config.hidden_size
    g = torch.Generator().manual_seed(0)
    unit = lambda: torch.nn.functional.normalize(torch.randn(p, d, generator=g), dim=-1)  # noqa: E731
    cats = ["drugs_substances", "self_harm_suicide", "violence_weapons"]
    dim = RefusalDirections(
        unit(), torch.randn(p, d), torch.randn(p, d), torch.randn(p, d), {c: unit() for c in cats}, {}
    )
    result = copy.deepcopy(dim)
    report = optimized_directions(s, result, StageLogger("compute-directions", quiet=True), model, tok)
    changed = ["violence_weapons", "drugs_substances"] if mode == "category" else ["global"]
    assert list(report["by_direction"]) == changed
    for name in changed:
        v = result.category_directions[name] if mode == "category" else result.refusal_direction
        assert torch.allclose(v, v[0].expand_as(v)) and abs(float(v[0].norm()) - 1) < 1e-5
        start = (dim.category_directions[name] if mode == "category" else dim.refusal_direction)[report["init_point"]]
        assert report["by_direction"][name]["cosine_with_start"] == pytest.approx(float(v[0] @ start), abs=1e-3)
        assert report["by_direction"][name]["last"]["loss"] <= report["by_direction"][name]["first"]["loss"]
    unchanged = [c for c in cats if c not in changed]
    for c in unchanged:
        assert torch.equal(result.category_directions[c], dim.category_directions[c])
    if mode == "category":
        assert torch.equal(result.refusal_direction, dim.refusal_direction)
        assert report["by_direction"]["violence_weapons"]["kept_refusals"] > 0
