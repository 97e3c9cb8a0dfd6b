"""Property-based tests (hypothesis): the ablation math on any inputs, and loaders on any bytes.

The math: the ablated directions are orthonormal and orthogonal to the protected span at every
probe point and at any fractional index; a full-strength ablation leaves no component of them in
any writer's output, and doing it twice changes nothing more (a projection); the layer kernel stays
within its bounds and is zero beyond its reach; the LoRA factors multiply back to the weight change.
The loaders: a prompt file of any content, a config of any shape, either loads or is one
ClawlyError, never another exception.
"""

from __future__ import annotations

import json
import string

import pytest
import torch
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from clawly.ablate.ablation import AblationPlan, LayerKernel, ablated, ablation_kernel, weight_deltas
from clawly.ablate.directions import AblationBasis
from clawly.ablate.lora import lora_factors, svd_compress
from clawly.cli import read_config
from clawly.data.templates import load_prompt_file
from clawly.errors import ClawlyError
from clawly.settings import Settings

D, P = 32, 3  # the tiny llama's hidden size and probe points (2 layers + 1)
SLOW = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

vectors = st.lists(st.floats(-1e3, 1e3, allow_nan=False, width=32), min_size=D, max_size=D)


def stacked(rows: list[list[list[float]]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def directions_of(m: int, k: int):
    """(removed `[m, P, d]`, protected `[k, P, d]`) whose removed vectors stand clear of the protected span."""
    return st.tuples(
        st.lists(st.lists(vectors, min_size=P, max_size=P), min_size=m, max_size=m),
        st.lists(st.lists(vectors, min_size=P, max_size=P), min_size=k, max_size=k),
    )


def well_posed(removed: torch.Tensor, protected: torch.Tensor) -> bool:
    """Each removed vector keeps a tenth of its length outside the protected span, and they stay independent
    there (else there is nothing, or no second direction, left to ablate)."""
    for p in range(P):
        v = removed[:, p]
        if protected.shape[0]:
            q, _ = torch.linalg.qr(protected[:, p].t())
            v = v - (v @ q) @ q.t()
        sv = torch.linalg.svdvals(v)
        if removed[:, p].norm(dim=-1).min() < 1e-3 or sv.min() < 0.1 * removed[:, p].norm(dim=-1).max():
            return False
    return True


@settings(max_examples=60, deadline=None)
@given(directions_of(2, 2), st.floats(0.0, P - 1.0))
def test_ablated_directions_are_orthonormal_and_orthogonal_to_the_protected_span(inputs, index):
    removed, protected = (stacked(x) for x in inputs)
    assume(well_posed(removed, protected))
    basis = AblationBasis(removed, protected)
    for q, kept in [(basis.directions[:, p], protected[:, p]) for p in range(P)] + [(basis.at_index(index), None)]:
        torch.testing.assert_close(q @ q.t(), torch.eye(2, dtype=torch.float64), atol=1e-9, rtol=0)
        if kept is not None:
            assert (q @ kept.t()).abs().max() <= 1e-9 * kept.norm(dim=-1).max().clamp_min(1)


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 48),
    st.floats(0, 3),
    st.floats(-5, 60, allow_subnormal=False),
    st.floats(0, 3),
    st.floats(0, 60, allow_subnormal=False),
)
def test_the_layer_kernel_stays_within_its_bounds_and_ends_at_its_reach(layers, peak, position, floor, reach):
    w = ablation_kernel(layers, LayerKernel(peak, position, floor, reach))
    assert w.shape == (layers,) and torch.isfinite(w).all()
    low, high = min(0.0, peak, floor), max(peak, floor)
    assert (w >= low - 1e-12).all() and (w <= high + 1e-12).all()
    distance = (torch.arange(layers, dtype=torch.float64) - position).abs()
    assert (w[distance > reach] == 0).all()
    if reach > 0:
        assert torch.allclose(w[distance <= reach], peak + (floor - peak) * (distance[distance <= reach] / reach))


@pytest.fixture(scope="module")
def llama(make_tiny_model):
    from clawly.model.loading import load_model
    from clawly.settings import ModelSettings

    return load_model(ModelSettings(name=str(make_tiny_model("llama")), device="cpu"))[0]


def writers_of(model) -> dict[str, torch.Tensor]:
    return {
        n: m.weight.detach().double().clone() for n, m in model.named_modules() if n.endswith(("o_proj", "down_proj"))
    }


@SLOW
@given(directions_of(2, 1), st.floats(0.0, P - 1.0), st.booleans())
def test_a_full_ablation_leaves_no_component_and_is_a_projection(llama, inputs, index, per_layer):
    """At strength 1 every writer's output loses the ablated directions (q^T W' = 0); ablating the
    ablated weights again changes nothing (the delta is zero): P(P W) = P W."""
    removed, protected = (stacked(x) for x in inputs)
    assume(well_posed(removed, protected))
    basis = AblationBasis(removed, protected)
    everywhere = LayerKernel(1.0, 0.0, 1.0, 10.0)
    plan = AblationPlan(
        kernels={"attn_out": everywhere, "mlp_down": everywhere}, direction_index=None if per_layer else index
    )
    deltas = weight_deltas(llama, basis, plan)
    with ablated(llama, deltas):
        after = writers_of(llama)
        for name, w in after.items():
            layer = int(name.split(".")[2])
            q = basis.directions[:, layer + 1] if per_layer else basis.at_index(index)  # [m, d]
            assert (q @ w).abs().max() <= 1e-5 * w.abs().max()  # float32 weights: rounding only
        again = weight_deltas(llama, basis, plan)
        for name, delta in again.items():
            assert delta.matrix().abs().max() <= 1e-5 * after[name].abs().max()


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6), st.integers(8, 40), st.integers(8, 40), st.integers(0, 2**31 - 1))
def test_lora_factors_multiply_back_to_the_change(rank, rows, cols, seed):
    from clawly.ablate.ablation import WeightDelta

    g = torch.Generator().manual_seed(seed)
    b, a = (
        torch.randn(rows, rank, generator=g, dtype=torch.float64),
        torch.randn(rank, cols, generator=g, dtype=torch.float64),
    )
    low = lora_factors({"w": WeightDelta(b=b, a=a)})["w"]
    torch.testing.assert_close(low.b @ low.a, b @ a, atol=0, rtol=0)  # exact: the factors themselves
    dense = svd_compress(b @ a, energy=1.0, max_rank=64)  # a dense change of this rank: exact up to rounding
    assert dense.rank <= rank and dense.relative_error <= 1e-10
    torch.testing.assert_close(dense.b @ dense.a, b @ a, atol=1e-9 * (b @ a).abs().max().item(), rtol=0)


# ---------------------------------------------------------------- loaders on anything

prompt_texts = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=60)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.sampled_from([".txt", ".csv", ".jsonl", ".parquet"]),
    st.one_of(
        st.binary(max_size=300),
        st.lists(prompt_texts, max_size=8).map(lambda rows: "\n".join(rows).encode()),
        st.lists(
            st.tuples(
                prompt_texts,
                st.sampled_from(["", "a", "violence_weapons"]),
                st.sampled_from(["", "train", "eval", "tune", "test"]),
            ),
            max_size=8,
        ).map(lambda rows: ("text,category,split\n" + "\n".join(f'"{t}",{c},{s}' for t, c, s in rows)).encode()),
        st.lists(
            st.dictionaries(
                st.sampled_from(["text", "prompt", "category", "split", "system", "x"]),
                st.one_of(prompt_texts, st.integers(), st.none()),
                max_size=4,
            ),
            max_size=6,
        ).map(lambda rows: "\n".join(json.dumps(r) for r in rows).encode()),
    ),
)
def test_any_prompt_file_loads_or_is_one_dataset_error(tmp_path, suffix, content):
    path = tmp_path / f"prompts{suffix}"
    path.write_bytes(content)
    try:
        frame = load_prompt_file(path, "custom")
    except ClawlyError as e:
        assert str(path) in str(e) and "\n" not in str(e)
        return
    assert list(frame.columns) == ["text", "category", "split", "system"] and len(frame) > 0
    assert frame.text.map(lambda t: isinstance(t, str) and t.strip() == t and t != "").all()
    assert set(frame.split.dropna()) <= {"train", "eval", "tune"}


yaml_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-5, 500),
        st.floats(-2, 2),
        st.text(string.ascii_letters + "._-", max_size=12),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.text(string.ascii_lowercase + "_.", min_size=1, max_size=16), inner, max_size=3),
    ),
    max_leaves=12,
)
keys = st.sampled_from(
    [
        "optimize",
        "model",
        "categories",
        "data",
        "probe",
        "n_trials",
        "optimize.n_trials",
        "kl_cap",
        "weights",
        "categories.weights",
        "batch_size",
        "nonsense",
        "artifacts_dir",
        "research.png_points",
        "optimize.components",
        "merge.max_shard_size",
    ]
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(keys, yaml_values, max_size=4))
def test_any_config_is_settings_or_one_settings_error(tmp_path, values):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(values))
    try:
        settings_ = Settings(**read_config(str(path)))
    except ClawlyError as e:
        assert "\n" not in str(e)
        return
    assert Settings.from_dict(settings_.to_dict()) == settings_


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=200))
def test_any_bytes_as_a_config_file_is_settings_or_one_error(tmp_path, content):
    path = tmp_path / "config.yaml"
    path.write_bytes(content)
    try:
        Settings(**read_config(str(path)))
    except ClawlyError as e:
        assert "\n" not in str(e)
