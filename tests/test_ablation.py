import pytest
import torch
from transformers import AutoModelForCausalLM

from clawly.ablate.ablation import AblationPlan, LayerKernel, ablated, ablation_kernel, weight_deltas, writers
from clawly.ablate.directions import AblationBasis, normalize


def _load(path):
    return AutoModelForCausalLM.from_pretrained(path).eval()


def _random_directions(model, m=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    p, d = model.config.num_hidden_layers + 1, model.config.hidden_size
    return normalize(torch.randn(m, p, d, generator=g, dtype=torch.float64))


def _basis(model, m=1, seed=0):
    return AblationBasis(_random_directions(model, m, seed))


def _flat_plan(weight=1.0, index=None, norm_preserve=False):
    k = LayerKernel(peak_weight=weight, peak_position=0.0, floor_weight=weight, reach=100.0)
    return AblationPlan(kernels={"attn_out": k, "mlp_down": k}, direction_index=index, norm_preserve=norm_preserve)


def test_kernel_peaks_at_position_falls_linearly_and_is_zero_beyond_reach():
    k = ablation_kernel(10, LayerKernel(peak_weight=1.5, peak_position=4.0, floor_weight=0.5, reach=2.0))
    expected = torch.tensor([0, 0, 0.5, 1.0, 1.5, 1.0, 0.5, 0, 0, 0], dtype=torch.float64)
    torch.testing.assert_close(k, expected)
    # fractional peak: symmetric around 4.5
    k2 = ablation_kernel(10, LayerKernel(1.0, 4.5, 0.0, 3.0))
    torch.testing.assert_close(k2[4], k2[5])
    assert k2.argmax() in (4, 5) and k2[0] == 0 and k2[9] == 0


def test_ablation_removes_direction_component_from_every_writer_output(make_tiny_model):
    model = _load(make_tiny_model("llama"))
    directions = _random_directions(model)
    x = torch.randn(5, 1000, dtype=torch.float64)
    with ablated(model, weight_deltas(model, AblationBasis(directions), _flat_plan())):
        for wr in writers(model):
            w = wr.module.weight.double()
            y = x[:, : w.shape[1]] @ w.t()  # [5, d]
            r = directions[0, wr.layer + 1]
            assert y.matmul(r).abs().max() < 1e-5, wr.name
    assert len(writers(model)) == 2 * model.config.num_hidden_layers


def test_ablated_restores_weights_bit_identically_even_on_error(make_tiny_model):
    model = _load(make_tiny_model("qwen2"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    deltas = weight_deltas(model, _basis(model), _flat_plan(1.3, index=1.5))
    try:
        with ablated(model, deltas):
            assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_zero_weight_changes_nothing(make_tiny_model):
    model = _load(make_tiny_model("llama"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    deltas = weight_deltas(model, _basis(model), _flat_plan(0.0))
    assert deltas == {}
    with ablated(model, deltas):
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_partial_weight_scales_the_removed_component(make_tiny_model):
    model = _load(make_tiny_model("llama"))
    directions = _random_directions(model)
    wr = writers(model)[0]
    r = directions[0, wr.layer + 1]
    x = torch.randn(7, wr.module.weight.shape[1], dtype=torch.float64)
    before = (x @ wr.module.weight.double().t()) @ r
    with ablated(model, weight_deltas(model, AblationBasis(directions), _flat_plan(0.25))):
        after = (x @ wr.module.weight.double().t()) @ r
    torch.testing.assert_close(after, 0.75 * before, rtol=1e-4, atol=1e-5)


def test_norm_preserving_ablation_keeps_column_norms(make_tiny_model):
    model = _load(make_tiny_model("llama"))
    norms = {wr.name: wr.module.weight.norm(dim=0).clone() for wr in writers(model)}
    deltas = weight_deltas(model, _basis(model), _flat_plan(norm_preserve=True))
    assert all(d.dense is not None for d in deltas.values())
    with ablated(model, deltas):
        for wr in writers(model):
            torch.testing.assert_close(wr.module.weight.norm(dim=0), norms[wr.name], rtol=1e-5, atol=1e-6)


def test_a_fractional_global_index_ablates_the_blend_of_the_two_neighbouring_directions(make_tiny_model):
    model = _load(make_tiny_model("llama", num_layers=4))
    directions = _random_directions(model)
    deltas = weight_deltas(model, AblationBasis(directions), _flat_plan(index=1.25))
    blend = 0.75 * directions[0, 1] + 0.25 * directions[0, 2]
    r = blend / blend.norm()
    assert len(deltas) == 2 * 4
    for delta in deltas.values():
        b = delta.b[:, 0]
        torch.testing.assert_close(b / b.norm(), -r, rtol=1e-6, atol=1e-8)


def _unit(v):
    return v / v.norm()


@pytest.mark.parametrize("index", [None, 2.0, 2.5, 3.75])
def test_kept_direction_component_is_unchanged_after_ablating_orthogonalized_targets(make_tiny_model, index):
    """At a fractional index too: the kept direction there is the blend of its two neighbours, and the
    first (weight 1) target there is its own blend made orthogonal to it (Gram-Schmidt by hand)."""
    model = _load(make_tiny_model("llama", num_layers=4))
    kept = _random_directions(model, m=1, seed=2)
    # the targets share a large component with the kept direction, as real categories do
    targets = normalize(_random_directions(model, m=2, seed=1) + 2.0 * kept)
    basis = AblationBasis(targets, kept)

    def at(v, layer):  # a probe point's vector, or the blend at the fractional index
        if index is None:
            return v[layer + 1]
        lo, frac = int(index), index - int(index)
        return _unit((1 - frac) * _unit(v[lo]) + frac * _unit(v[min(lo + 1, v.shape[0] - 1)]))

    x = torch.randn(9, 1000, dtype=torch.float64)
    before = {wr.name: x[:, : wr.module.weight.shape[1]] @ wr.module.weight.double().t() for wr in writers(model)}
    with ablated(model, weight_deltas(model, basis, _flat_plan(1.0, index=index), torch.tensor([1.0, 0.7]))):
        for wr in writers(model):
            after = x[:, : wr.module.weight.shape[1]] @ wr.module.weight.double().t()
            k = at(kept[0], wr.layer)
            t = at(targets[0], wr.layer)
            removed = _unit(t - (t @ k) * k)
            torch.testing.assert_close(after @ k, before[wr.name] @ k, rtol=1e-5, atol=1e-5)
            assert (after @ removed).abs().max() < 1e-4  # the weight-1 target is gone
            assert not torch.allclose(after, before[wr.name])


def test_the_basis_at_a_fractional_index_is_orthonormal_and_orthogonal_to_the_protected_blend():
    g = torch.Generator().manual_seed(5)
    protected = torch.randn(2, 4, 12, generator=g, dtype=torch.float64)
    removed = torch.randn(3, 4, 12, generator=g, dtype=torch.float64) + protected[:1]
    basis = AblationBasis(removed, protected)
    q = basis.at_index(1.6)
    torch.testing.assert_close(q @ q.t(), torch.eye(3, dtype=torch.float64), rtol=0, atol=1e-12)
    blend = 0.4 * protected[:, 1] / protected[:, 1].norm(dim=-1, keepdim=True) + 0.6 * protected[:, 2] / protected[
        :, 2
    ].norm(dim=-1, keepdim=True)
    assert (q @ blend.t()).abs().max() < 1e-12
    torch.testing.assert_close(basis.at_index(2.0), basis.directions[:, 2], rtol=0, atol=1e-12)


def test_a_zero_category_weight_contributes_nothing(make_tiny_model):
    model = _load(make_tiny_model("llama"))
    q = _random_directions(model, m=2, seed=4)
    both = weight_deltas(model, AblationBasis(q), _flat_plan(), torch.tensor([1.0, 0.0]))
    first = weight_deltas(model, AblationBasis(q[:1]), _flat_plan(), torch.tensor([1.0]))
    assert both.keys() == first.keys()
    for name in both:
        assert torch.equal(both[name].matrix(), first[name].matrix())
    assert weight_deltas(model, AblationBasis(q), _flat_plan(), torch.zeros(2)) == {}


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gemma3_text", "olmo2"])
def test_what_enters_the_residual_stream_loses_the_direction(build_tiny_model, arch):
    """Gemma 2/3 and OLMo 2 normalize each writer's output before adding it to the residual stream; the norm's
    gain would bring the removed component back unless the ablation accounts for it. Non-trivial
    gains (random norm weights) make the difference visible."""
    model, _ = build_tiny_model(arch, num_layers=2)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(p + 0.5 * torch.randn(p.shape, generator=g))
    directions = _random_directions(model)
    deltas = weight_deltas(model, AblationBasis(directions), _flat_plan())
    writes = []  # (layer, what the writer adds to the residual stream)
    hooks = []
    for i, layer in enumerate(model.model.layers):
        post = {
            "attn_out": getattr(layer, "post_attention_layernorm", None),
            "mlp_down": getattr(layer, "post_feedforward_layernorm", None),
        }
        if post["mlp_down"] is None:  # pre-norm: the writers' outputs are added as they are
            post = {"attn_out": layer.self_attn.o_proj, "mlp_down": layer.mlp.down_proj}
        for module in post.values():
            hooks.append(module.register_forward_hook(lambda m, a, out, i=i: writes.append((i, out.detach()))))
    ids = torch.randint(5, model.config.vocab_size, (3, 7), generator=g)
    with ablated(model, deltas), torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    assert len(writes) == 4
    for layer, out in writes:
        r = directions[0, layer + 1].float()
        along = (out @ r).abs().max() / out.norm(dim=-1).max()
        assert along < 1e-5, f"layer {layer}: {along:.2e} of the write still lies along the direction"


@pytest.mark.parametrize("arch", ["opt", "gpt_neox"])
def test_a_biased_writer_loses_the_direction_from_its_bias_too(build_tiny_model, arch):
    model, _ = build_tiny_model(arch, num_layers=2)
    g = torch.Generator().manual_seed(8)
    assert all(wr.module.bias.abs().max() > 0.01 for wr in writers(model))
    directions = _random_directions(model)
    deltas = weight_deltas(model, AblationBasis(directions), _flat_plan())
    assert all(d.bias is not None for d in deltas.values())
    outputs = {}
    hooks = [
        wr.module.register_forward_hook(lambda m, a, out, wr=wr: outputs.setdefault(wr.name, out.detach()))
        for wr in writers(model)
    ]
    ids = torch.randint(5, model.config.vocab_size, (3, 7), generator=g)
    with ablated(model, deltas), torch.no_grad():
        model(ids)
        for wr in writers(model):
            r = directions[0, wr.layer + 1].float()
            assert abs(float(wr.module.bias @ r)) < 1e-5 * float(wr.module.bias.norm())
            out = outputs[wr.name]
            assert (out @ r).abs().max() < 1e-5 * out.norm(dim=-1).max(), wr.name
    for h in hooks:
        h.remove()


def test_a_post_layer_norm_model_is_refused_by_name(build_tiny_model):
    from clawly.model.architecture import UnsupportedArchitectureError

    model, _ = build_tiny_model("opt", num_layers=2)
    model.config.do_layer_norm_before = False  # OPT-350m: the norm comes after the residual add
    with pytest.raises(UnsupportedArchitectureError, match="OPTForCausalLM.*normalizes the residual stream"):
        writers(model)


def _kernel(weight, position=1.0, reach=2.0):
    return LayerKernel(weight, position, 0.5 * weight, reach)


def _deltas_close(a, b):
    assert set(a) == set(b)
    for name in a:
        torch.testing.assert_close(a[name].matrix(), b[name].matrix(), rtol=0, atol=1e-12)


def test_per_category_kernels_equal_the_shared_kernel_when_they_agree(make_tiny_model):
    model = _load(make_tiny_model("llama", num_layers=4))
    basis = _basis(model, m=2)
    shared = AblationPlan(
        {"attn_out": _kernel(1.2), "mlp_down": _kernel(0.8, 2.0)},
        direction_index=1.5,
        category_weights={"a": 1.0, "b": 0.6},
    )
    own = AblationPlan(
        {},
        direction_index=1.5,
        category_weights={"a": 1.0, "b": 0.6},
        category_kernels={c: dict(shared.kernels) for c in ("a", "b")},
    )
    strengths = torch.tensor([1.0, 0.6])
    _deltas_close(weight_deltas(model, basis, own, strengths), weight_deltas(model, basis, shared, strengths))


def test_each_category_is_ablated_by_its_own_kernel(make_tiny_model):
    """Category b with a zero kernel ablates nothing of b: the change is a's alone; and a's change
    where only b's kernel reaches is zero."""
    model = _load(make_tiny_model("llama", num_layers=4))
    basis = _basis(model, m=2)
    a_kernel, b_kernel = _kernel(1.0, position=0.0, reach=1.0), _kernel(1.0, position=3.0, reach=1.0)
    both = AblationPlan(
        {},
        category_weights={"a": 1.0, "b": 1.0},
        category_kernels={"a": {"attn_out": a_kernel}, "b": {"attn_out": b_kernel}},
    )
    only_a = AblationPlan({"attn_out": a_kernel})
    deltas = weight_deltas(model, basis, both)
    alone = weight_deltas(model, basis, only_a, torch.tensor([1.0, 0.0]))
    layers = {wr.name: wr.layer for wr in writers(model)}
    touched = {layers[n] for n in deltas}
    assert touched == {0, 1, 2, 3}  # a reaches layers 0-1, b layers 2-3
    for name, d in deltas.items():
        if layers[name] <= 1:
            torch.testing.assert_close(d.matrix(), alone[name].matrix(), rtol=0, atol=1e-12)
        else:
            q = basis.directions[:, layers[name] + 1]  # per-layer directions: the layer's output
            assert (q[0] @ d.matrix()).abs().max() < 1e-10  # nothing of a is removed there
            assert (q[1] @ d.matrix()).abs().max() > 1e-3
    # the plan survives its record
    assert AblationPlan.from_dict(both.to_dict()) == both
    with pytest.raises(ValueError, match="per-category kernels"):
        weight_deltas(model, basis, AblationPlan({}, category_weights={"a": 1.0}, category_kernels={"a": {}}))


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
@pytest.mark.parametrize("norm_preserve", [False, True])
def test_a_fused_expert_stack_changed_one_expert_at_a_time_gets_the_same_bytes(
    build_tiny_model, monkeypatch, arch, norm_preserve
):
    """A real stack is changed in chunks of experts (bounded float64 temporaries); a tiny one fits one
    chunk. Chunks of one expert give the same weights, bit for bit."""
    import clawly.ablate.ablation as ablation_module

    model, _ = build_tiny_model(arch, num_layers=2)
    plan = _flat_plan(0.8, norm_preserve=norm_preserve)
    deltas = weight_deltas(model, _basis(model, m=2), plan)
    with ablated(model, deltas):
        whole = {k: v.clone() for k, v in model.state_dict().items()}
    monkeypatch.setattr(ablation_module, "_CHUNK", 1)
    chunked = weight_deltas(model, _basis(model, m=2), plan)
    for name, d in deltas.items():
        assert torch.equal(d.matrix(), chunked[name].matrix()), name
    with ablated(model, chunked):
        assert all(torch.equal(whole[k], v) for k, v in model.state_dict().items())
