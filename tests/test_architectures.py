"""Every architecture clawly supports, on tiny random models: the writers found, the direction gone
from what each layer writes (measured with hooks), exact restore, the merged model saved and loaded
again, the LoRA adapter in peft, and one clear error for what is not supported.

The table `WRITERS` is the table of tested architectures in docs/architectures.md.
"""

import json
import warnings
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_model, saved_tensors, tiny_config
from peft import PeftModel
from torch import nn
from transformers import AutoModelForCausalLM

from clawly.ablate.ablation import AblationPlan, LayerKernel, ablated, weight_deltas
from clawly.ablate.directions import AblationBasis, normalize
from clawly.ablate.lora import AdapterUnsupportedError, lora_factors, save_adapter
from clawly.model.architecture import UnsupportedArchitectureError, decoder_layers, hidden_size, num_layers, writers
from clawly.model.loading import load_model
from clawly.save import export as ex
from clawly.settings import ExportSettings, ModelSettings, Settings

FUSED_OUT_FIRST, FUSED_IN_FIRST = "4 fused experts [E, d, d_in]", "4 fused experts [E, d_in, d]"
PLAIN = [("attn_out", "self_attn.o_proj", "Linear"), ("mlp_down", "mlp.down_proj", "Linear")]
# arch -> (model class, where the layers are, layer 0's writers: component, path in the layer, kind)
WRITERS = {
    "llama": ("LlamaForCausalLM", "model.layers", PLAIN),
    "qwen2": ("Qwen2ForCausalLM", "model.layers", PLAIN),
    "qwen3": ("Qwen3ForCausalLM", "model.layers", PLAIN),
    "mistral": ("MistralForCausalLM", "model.layers", PLAIN),
    "gemma2": ("Gemma2ForCausalLM", "model.layers", PLAIN),
    "gemma3_text": ("Gemma3ForCausalLM", "model.layers", PLAIN),
    "phi3": ("Phi3ForCausalLM", "model.layers", PLAIN),
    "olmo2": ("Olmo2ForCausalLM", "model.layers", PLAIN),
    "gpt2": (
        "GPT2LMHeadModel",
        "transformer.h",
        [("attn_out", "attn.c_proj", "Conv1D"), ("mlp_down", "mlp.c_proj", "Conv1D")],
    ),
    "mixtral": (
        "MixtralForCausalLM",
        "model.layers",
        [PLAIN[0], ("mlp_down", "mlp.experts.down_proj", FUSED_OUT_FIRST)],
    ),
    "qwen2_moe": (
        "Qwen2MoeForCausalLM",
        "model.layers",
        [
            PLAIN[0],
            ("mlp_down", "mlp.experts.down_proj", FUSED_OUT_FIRST),
            ("mlp_down", "mlp.shared_expert.down_proj", "Linear"),
        ],
    ),
    "qwen3_moe": (
        "Qwen3MoeForCausalLM",
        "model.layers",
        [PLAIN[0], ("mlp_down", "mlp.experts.down_proj", FUSED_OUT_FIRST)],
    ),
    "gpt_oss": ("GptOssForCausalLM", "model.layers", [PLAIN[0], ("mlp_down", "mlp.experts.down_proj", FUSED_IN_FIRST)]),
    "separate_experts": (
        "MixtralForCausalLM",
        "model.layers",
        [PLAIN[0], *[("mlp_down", f"mlp.experts.{e}.down_proj", "Linear") for e in range(4)]],
    ),
    "gemma3": ("Gemma3ForConditionalGeneration", "model.language_model.layers", PLAIN),
}
BIASED = {"gpt2", "gpt_oss"}  # writers with a bias (gpt-oss: attention [d], experts [E, d])
POST_NORM = {"gemma2", "gemma3_text", "olmo2", "gemma3"}  # an RMS norm between writer and residual stream
ARCHS = list(WRITERS)


# --- tiny models ---------------------------------------------------------------------------------


class ExpertMLP(nn.Module):
    """One expert as its own module, the layout of older transformers and many custom models."""

    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor) -> None:
        super().__init__()
        inter, hidden = down.shape[1], down.shape[0]
        self.gate_proj, self.up_proj = nn.Linear(hidden, inter, bias=False), nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)
        with torch.no_grad():
            self.gate_proj.weight.copy_(gate_up[:inter])
            self.up_proj.weight.copy_(gate_up[inter:])
            self.down_proj.weight.copy_(down)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class SeparateExperts(nn.ModuleList):
    """A ModuleList of ExpertMLP with the fused experts' call signature and the same weights."""

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden)
        for e, expert in enumerate(self):
            token, slot = torch.where(top_k_index == e)
            out.index_add_(0, token, expert(hidden[token]) * top_k_weights[token, slot, None])
        return out


def separate_experts(model: nn.Module) -> nn.Module:
    """Replace every fused Mixtral expert stack by the equivalent SeparateExperts."""
    for layer in model.model.layers:
        fused = layer.mlp.experts
        layer.mlp.experts = SeparateExperts(
            [ExpertMLP(fused.gate_up_proj[e].detach(), fused.down_proj[e].detach()) for e in range(fused.num_experts)]
        )
    return model


def tiny(arch: str, num_layers: int = 2, dtype: torch.dtype = torch.float32, tie: bool = False) -> nn.Module:
    """A tiny random model of `arch` with non-trivial norm gains (a gain of 1 hides the post-norm case)."""
    model, _ = build_tiny_model("mixtral" if arch == "separate_experts" else arch, num_layers, tie=tie)
    if arch == "separate_experts":
        model = separate_experts(model)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.dim() == 1:
                p.add_(0.5 * torch.randn(p.shape, generator=g))
    if dtype == torch.float64 and model._can_set_experts_implementation():
        model.set_experts_implementation("eager")  # transformers' batched expert kernels take no float64
    return model.to(dtype).eval()


def directions(model: nn.Module, m: int = 1, seed: int = 0) -> torch.Tensor:
    """Random unit directions `[m, layers + 1, d]` float64."""
    g = torch.Generator().manual_seed(seed)
    return normalize(torch.randn(m, num_layers(model) + 1, hidden_size(model), generator=g, dtype=torch.float64))


def full_plan(weight: float = 1.0) -> AblationPlan:
    k = LayerKernel(peak_weight=weight, peak_position=0.0, floor_weight=weight, reach=100.0)
    return AblationPlan(kernels={"attn_out": k, "mlp_down": k})


def ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(5, 300, (3, 9), generator=torch.Generator().manual_seed(seed))


# --- (1) the writers found -----------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_the_writers_of_every_layer_are_found_with_their_layout(arch):
    model = tiny(arch)
    cls, layers_path, expected = WRITERS[arch]
    assert type(model).__name__ == cls
    assert decoder_layers(model) is model.get_submodule(layers_path)
    found = writers(model)
    for i in range(num_layers(model)):
        prefix = f"{layers_path}.{i}."
        mine = [w for w in found if w.layer == i]
        assert [(w.component, w.name.removeprefix(prefix), w.kind) for w in mine] == expected
        assert all((w.bias is not None) == (arch in BIASED) for w in mine if w.component == "attn_out")
        assert all((w.gain is not None) == (arch in POST_NORM) for w in mine)
        for w in mine:  # every writer writes hidden wide, in the orientation it claims
            d = w.weight.shape[-1] if w.transposed else w.weight.shape[-2]
            assert d == hidden_size(model) == 32, w.name
    if arch == "gpt_oss":
        stack = next(w for w in found if w.experts)
        assert stack.bias is model.model.layers[0].mlp.experts.down_proj_bias and stack.bias.shape == (4, 32)


@pytest.mark.parametrize("arch", ARCHS)
def test_writer_inputs_are_read_on_every_architecture_with_module_writers(arch):
    """probe-writers' forward (one logits position, right padding) runs on each architecture, and
    every writer module sees every real position; fused expert stacks get the one clear error."""
    from clawly.ablate.edits import InputEditError, read_inputs

    model = tiny(arch)
    fused = any(w.experts is not None for w in writers(model))
    texts = [[5, 6, 7, 8], [9, 10, 11, 12, 13, 14]]

    class Words:  # token ids as text: the tiny models have no tokenizer
        pad_token_id = 0

        def __call__(self, text, add_special_tokens=False):
            return type("Enc", (), {"input_ids": [int(t) for t in text.split()]})()

    if fused:
        with pytest.raises(InputEditError, match="edit.method=projection"):
            read_inputs(model, Words(), [" ".join(map(str, t)) for t in texts], rank=64)
        return
    spectra = read_inputs(model, Words(), [" ".join(map(str, t)) for t in texts], rank=64, batch_size=2)
    assert set(spectra) == {w.name for w in writers(model)}
    dense = {n: sp for n, sp in spectra.items() if ".experts." not in n}
    assert all(sp.count == 10 and sp.trace > 0 for sp in dense.values())
    routed = {n: sp for n, sp in spectra.items() if ".experts." in n}  # each expert its routed tokens
    for layer in range(num_layers(model)) if routed else ():
        seen = sum(sp.count for n, sp in routed.items() if f".{layer}.mlp." in n)
        assert seen == 10 * model.config.num_experts_per_tok


class SquareExperts(nn.Module):
    """Fused experts with a square down projection `[E, d, d]`, stored output-first or input-first,
    and no `is_transposed` flag saying which."""

    def __init__(self, experts: int, hidden: int, input_first: bool) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.input_first = input_first
        self.gate_up_proj = nn.Parameter(0.2 * torch.randn(experts, 2 * hidden, hidden, generator=g))
        self.down_proj = nn.Parameter(0.2 * torch.randn(experts, hidden, hidden, generator=g))

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden)
        for e in range(self.down_proj.shape[0]):
            token, slot = torch.where(top_k_index == e)
            gate, up = nn.functional.linear(hidden[token], self.gate_up_proj[e]).chunk(2, dim=-1)
            h = nn.functional.silu(gate) * up
            y = h @ self.down_proj[e] if self.input_first else nn.functional.linear(h, self.down_proj[e])
            out.index_add_(0, token, y * top_k_weights[token, slot, None])
        return out


@pytest.mark.parametrize("input_first", [False, True])
def test_a_square_expert_stack_is_oriented_by_the_probe(input_first):
    """A [4, 32, 32] stack: the shape cannot tell, and the class has no flag. The probe reads the
    orientation off the MLP's behaviour and leaves the weights as they were."""
    model = tiny("mixtral")
    for layer in model.model.layers:
        layer.mlp.experts = SquareExperts(4, 32, input_first)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stacks = [w for w in writers(model) if w.experts]
    assert [(w.kind, w.transposed) for w in stacks] == [
        (FUSED_IN_FIRST if input_first else FUSED_OUT_FIRST, input_first)
    ] * 2
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    model.double()  # and the ablation, in that orientation, removes the direction from the MLP's write
    q = directions(model)
    with ablated(model, weight_deltas(model, AblationBasis(q), full_plan())):
        writes = layer_writes(model)
    for i, write in enumerate(writes):
        assert (write["mlp_down"] @ q[0, i + 1]).abs().max() < 1e-10 * write["mlp_down"].norm(dim=-1).max()


@pytest.mark.parametrize("arch", ["qwen2_moe", "gpt_oss"])
def test_the_probe_agrees_with_transformers_own_square_stacks(arch):
    """Qwen2-MoE's [4, 32, 32] stack is output-first, gpt-oss's input-first (transformers says so
    with is_transposed, which its batched experts kernels follow)."""
    model = tiny(arch)
    stack = next(w for w in writers(model) if w.experts and w.layer == 0)
    assert stack.weight.shape == (4, 32, 32)
    assert stack.transposed is (arch == "gpt_oss") is model.model.layers[0].mlp.experts.is_transposed


# --- (2) the direction is gone from what every layer writes --------------------------------------


def _write_modules(layer: nn.Module) -> dict[str, nn.Module]:
    """The module whose output each component adds to the residual stream."""
    if hasattr(layer, "post_feedforward_layernorm"):  # Gemma 2/3, OLMo 2: the post-writer norms
        return {"attn_out": layer.post_attention_layernorm, "mlp_down": layer.post_feedforward_layernorm}
    return {"attn_out": getattr(layer, "self_attn", None) or layer.attn, "mlp_down": layer.mlp}


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def layer_writes(model: nn.Module) -> list[dict[str, torch.Tensor]]:
    """Per layer, what each component and the whole layer add to the residual stream, on `ids()`."""
    writes = [{} for _ in decoder_layers(model)]
    hooks = []
    for i, layer in enumerate(decoder_layers(model)):
        for component, module in _write_modules(layer).items():
            hooks.append(
                module.register_forward_hook(
                    lambda m, a, out, i=i, c=component: writes[i].__setitem__(c, _first(out).detach())
                )
            )
        hooks.append(
            layer.register_forward_pre_hook(
                lambda m, a, kw, i=i: writes[i].__setitem__("input", (a[0] if a else kw["hidden_states"]).detach()),
                with_kwargs=True,
            )
        )
        hooks.append(
            layer.register_forward_hook(
                lambda m, a, out, i=i: writes[i].__setitem__("layer", _first(out).detach() - writes[i]["input"])
            )
        )
    try:
        with torch.no_grad():
            model(ids())
    finally:
        for h in hooks:
            h.remove()
    return writes


@pytest.mark.parametrize("arch", ARCHS)
def test_ablation_removes_the_direction_from_every_layer_write_and_restores_bit_for_bit(arch):
    """Float64 model, so the increments are exact: the component of each write along the layer's
    direction is ~0 at full strength (routing, expert biases and post-norms included; Gemma's and
    OLMo 2's norms compute in float32, hence 1e-7 and not 1e-12)."""
    model = tiny(arch, dtype=torch.float64)
    q = directions(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    base = layer_writes(model)
    deltas = weight_deltas(model, AblationBasis(q), full_plan())
    assert set(deltas) == {w.name for w in writers(model)}
    with ablated(model, deltas):
        after = layer_writes(model)
    for i, (was, now) in enumerate(zip(base, after, strict=True)):
        r = q[0, i + 1]
        for key in ("attn_out", "mlp_down", "layer"):
            assert (was[key] @ r).abs().max() > 1e-3 * was[key].norm(dim=-1).max()  # there was something
            along = (now[key] @ r).abs().max() / now[key].norm(dim=-1).max()
            assert along < 1e-7, f"layer {i} {key}: {along:.1e} of the write still lies along the direction"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch", ARCHS)
def test_the_weights_come_back_bit_for_bit_in_half_and_single_precision(arch, dtype):
    model = tiny(arch, dtype=dtype)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    deltas = weight_deltas(model, AblationBasis(directions(model, m=2)), full_plan(0.7))
    with ablated(model, deltas):
        changed = [k for k, v in model.state_dict().items() if not torch.equal(before[k], v)]
    names = {id(p): n for n, p in model.named_parameters()}
    written = [p for w in writers(model) for p in (w.weight, w.bias) if p is not None]
    assert sorted(changed) == sorted(names[id(p)] for p in written)  # every writer's weight and bias, no more
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss", "separate_experts"])
def test_two_directions_at_partial_strength_scale_every_experts_write(arch):
    """Category mode, MLP writers only: two directions at strengths 1 and 0.4; layer 0's MLP (whose
    input the change leaves alone) keeps 60% of its write along the second and none along the first."""
    model = tiny(arch, dtype=torch.float64)
    basis = AblationBasis(directions(model, m=2))
    base = layer_writes(model)
    plan = AblationPlan(kernels={"mlp_down": full_plan().kernels["mlp_down"]})
    with ablated(model, weight_deltas(model, basis, plan, torch.tensor([1.0, 0.4]))):
        after = layer_writes(model)
    first, second = basis.directions[:, 1]  # layer 0's orthonormal pair
    now, was = after[0]["mlp_down"], base[0]["mlp_down"]
    assert (now @ first).abs().max() < 1e-12 * now.norm(dim=-1).max()
    torch.testing.assert_close(now @ second, 0.6 * (was @ second), rtol=1e-6, atol=1e-10)
    for i in range(1, num_layers(model)):
        now = after[i]["mlp_down"]
        assert (now @ basis.directions[0, i + 1]).abs().max() < 1e-12 * now.norm(dim=-1).max()


def test_separate_module_experts_change_exactly_as_the_fused_stack():
    """The same Mixtral with its experts fused or as a ModuleList of MLPs gives the same logits,
    before and after the ablation: each expert's change is the same either way."""
    fused, separate = tiny("mixtral"), tiny("separate_experts")
    q = AblationBasis(directions(fused))
    with torch.no_grad():
        torch.testing.assert_close(separate(ids()).logits, fused(ids()).logits, rtol=1e-5, atol=1e-5)
        with (
            ablated(fused, weight_deltas(fused, q, full_plan())),
            ablated(separate, weight_deltas(separate, q, full_plan())),
        ):
            torch.testing.assert_close(separate(ids()).logits, fused(ids()).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
def test_norm_preserving_ablation_keeps_every_experts_column_norms(arch):
    model = tiny(arch)
    stack = next(w for w in writers(model) if w.experts)
    norms = stack.weight.norm(dim=-1 if stack.transposed else -2).clone()  # per expert, per input feature
    deltas = weight_deltas(
        model, AblationBasis(directions(model)), AblationPlan(full_plan().kernels, norm_preserve=True)
    )
    assert deltas[stack.name].dense.shape == (4, 32, stack.weight.shape[-1 if not stack.transposed else -2])
    with ablated(model, deltas):
        torch.testing.assert_close(stack.weight.norm(dim=-1 if stack.transposed else -2), norms, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ["gpt2", "qwen2_moe", "gpt_oss", "separate_experts"])
def test_rdo_hooks_on_the_writers_equal_the_weight_change(arch):
    """directions.method=rdo projects the direction out of every writer module's output with hooks:
    a Conv1D's, every separate expert's, a fused experts module's (its output is the routed sum of
    the experts' writes, biases included). That equals the weight change at strength 1."""
    from clawly.ablate.rdo import projected_out

    model = tiny(arch, dtype=torch.float64)
    r = directions(model)[0, 1]
    basis = AblationBasis(r.expand(num_layers(model) + 1, -1).unsqueeze(0).clone())
    with torch.no_grad():
        with projected_out(model, r):
            hooked = model(ids()).logits
        with ablated(model, weight_deltas(model, basis, full_plan())):
            edited = model(ids()).logits
        assert (hooked - model(ids()).logits).abs().max() > 1e-4
    torch.testing.assert_close(hooked, edited, rtol=1e-9, atol=1e-9)


# --- (3) the merged model, saved by clawly and loaded again ---------------------------------------


def _saved_model(model, tokenizer, out: Path, deltas) -> torch.Tensor:
    """Save the model with `deltas` merged as clawly's export does; its logits in memory."""
    with ablated(model, deltas), torch.no_grad():
        expected = model(ids()).logits
        ex.write_model(model, tokenizer, out, Settings(), out)
    return expected


@pytest.mark.parametrize("arch", [a for a in ARCHS if a != "separate_experts"])
def test_the_merged_model_saved_and_loaded_again_gives_the_same_logits(arch, make_tiny_model, tmp_path):
    source = make_tiny_model(arch)
    model, tokenizer = load_model(ModelSettings(name=str(source), device="cpu"))
    change = ex.saved_change(model, AblationBasis(directions(model)), full_plan(), None, ExportSettings())
    expected = _saved_model(model, tokenizer, tmp_path / "model", change.model_deltas)
    with torch.no_grad(), ablated(model, change.deltas):  # the trial's own float64 change, rounded once
        torch.testing.assert_close(model(ids()).logits, expected, rtol=1e-4, atol=1e-4)
    again, _ = load_model(ModelSettings(name=str(tmp_path / "model"), device="cpu"))
    assert type(again).__name__ == WRITERS[arch][0]
    with torch.no_grad():
        torch.testing.assert_close(again(ids()).logits, expected, rtol=0, atol=0)


def test_the_multimodal_wrapper_loads_through_clawly_with_a_stage_log(make_tiny_model, tmp_path):
    """Its config keeps the layer count in text_config; the load event reads it there."""
    from clawly.log import StageLogger

    model, _ = load_model(
        ModelSettings(name=str(make_tiny_model("gemma3")), device="cpu"), StageLogger("test", tmp_path)
    )
    assert type(model).__name__ == "Gemma3ForConditionalGeneration" and num_layers(model) == 2
    event = json.loads((tmp_path / "test.jsonl").read_text().splitlines()[-1])
    assert event["event"] == "model_loaded" and event["layers"] == 2


def test_separate_module_experts_are_saved_and_loaded_again_exactly(tmp_path):
    model = tiny("separate_experts")
    _, tokenizer = build_tiny_model("mixtral")
    deltas = weight_deltas(model, AblationBasis(directions(model)), full_plan())
    expected = _saved_model(model, tokenizer, tmp_path / "model", deltas)
    again = tiny("separate_experts")
    again.load_state_dict(saved_tensors(tmp_path / "model"))
    with torch.no_grad():
        torch.testing.assert_close(again(ids()).logits, expected, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_tied_embeddings_stay_tied_through_a_trial_the_export_and_loading(arch, make_tiny_model, tmp_path):
    source = make_tiny_model(arch, tie=True)
    model, tokenizer = load_model(ModelSettings(name=str(source), device="cpu"))

    def tied(m):
        return m.get_output_embeddings().weight.data_ptr() == m.get_input_embeddings().weight.data_ptr()

    assert tied(model)
    embedding = model.get_input_embeddings().weight.clone()
    deltas = weight_deltas(model, AblationBasis(directions(model)), full_plan())
    with ablated(model, deltas):
        assert tied(model) and torch.equal(model.get_input_embeddings().weight, embedding)
        ex.write_model(model, tokenizer, tmp_path / "model", Settings(), source)
    assert tied(model)
    saved = saved_tensors(tmp_path / "model")
    assert [k for k in saved if "embed_tokens" in k or "lm_head" in k] == [
        k for k in saved if "embed_tokens" in k
    ]  # the tied pair is saved once
    again, _ = load_model(ModelSettings(name=str(tmp_path / "model"), device="cpu"))
    assert tied(again) and torch.equal(again.get_input_embeddings().weight, embedding)


# --- (4) the LoRA adapter in peft ---------------------------------------------------------------


def _adapter_logits(model_dir: Path, adapter_dir: Path) -> torch.Tensor:
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), str(adapter_dir)).eval()
    with torch.no_grad():
        return peft_model(ids()).logits


@pytest.mark.parametrize("arch", [a for a in ARCHS if a not in ("separate_experts", "gpt_oss")])
def test_the_lora_adapter_loads_in_peft_and_matches_the_merged_model(arch, make_tiny_model, tmp_path):
    """Two directions (rank 2 per writer, and per expert); peft merges the adapter into the same
    weights clawly's merged model holds, bit for bit."""
    source = make_tiny_model(arch)
    model = AutoModelForCausalLM.from_pretrained(source).eval()
    factors = lora_factors(weight_deltas(model, AblationBasis(directions(model, m=2)), full_plan()))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing printed on saving
        save_adapter(model, factors, tmp_path / "lora", base_model_name_or_path=str(source))
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    fused = sorted(n for n, f in factors.items() if f.on_parameter)
    assert sorted(config["target_parameters"] or []) == fused
    assert bool(fused) == (arch in ("mixtral", "qwen2_moe", "qwen3_moe"))
    assert all(not hasattr(m, "lora_A") for m in model.modules())  # the LoRA layers came out again
    with ablated(model, ex.merged_deltas(factors)), torch.no_grad():
        expected = model(ids()).logits
        merged = {k: v.clone() for k, v in model.state_dict().items()}
    torch.testing.assert_close(_adapter_logits(source, tmp_path / "lora"), expected, rtol=1e-4, atol=1e-4)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(source), str(tmp_path / "lora"))
    by_peft = peft_model.merge_and_unload().state_dict()
    assert [k for k in merged if not torch.equal(merged[k], by_peft[k])] == []


def test_separate_module_experts_are_each_a_lora_module(tmp_path):
    model = tiny("separate_experts")
    factors = lora_factors(weight_deltas(model, AblationBasis(directions(model)), full_plan()))
    assert not any(f.on_parameter for f in factors.values())
    save_adapter(model, factors, tmp_path / "lora")
    with ablated(model, ex.merged_deltas(factors)), torch.no_grad():
        expected = model(ids()).logits
    peft_model = PeftModel.from_pretrained(tiny("separate_experts"), str(tmp_path / "lora")).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids()).logits, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_peft_merges_a_fused_expert_adapter_into_the_weights_clawly_merges(dtype, make_tiny_model, tmp_path):
    """The merge stage merges with peft, the API with `merged_deltas`: the same bytes, half precision too."""
    source = make_tiny_model("mixtral")
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype).eval()
    factors = lora_factors(weight_deltas(model, AblationBasis(directions(model, m=2)), full_plan()))
    save_adapter(model, factors, tmp_path / "lora")
    with ablated(model, ex.merged_deltas(factors)):
        merged = {k: v.clone() for k, v in model.state_dict().items()}
    base = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    by_peft = PeftModel.from_pretrained(base, str(tmp_path / "lora")).merge_and_unload().state_dict()
    assert [k for k in merged if not torch.equal(merged[k], by_peft[k])] == []


@pytest.mark.parametrize("arch", ["qwen2_moe", "qwen3_moe"])
def test_a_norm_preserving_change_of_fused_experts_is_an_svd_adapter_with_one_rank_per_stack(
    arch, make_tiny_model, tmp_path
):
    """Full rank per expert: every expert's SVD is cut at one rank (peft keeps one per parameter); at
    full energy the adapter is the change, and stacks of different ranks go through rank_pattern."""
    source = make_tiny_model(arch)
    model = AutoModelForCausalLM.from_pretrained(source).eval()
    plan = AblationPlan(full_plan().kernels, norm_preserve=True)
    deltas = weight_deltas(model, AblationBasis(directions(model)), plan)
    factors = lora_factors(deltas, energy=1.0, max_rank=64)
    stack = factors["model.layers.0.mlp.experts.down_proj"]
    assert stack.experts == 4 and stack.relative_error < 1e-6 and stack.b.shape[0] == 4
    assert len({f.rank for f in factors.values()}) > 1  # so rank_pattern carries some of them
    save_adapter(model, factors, tmp_path / "lora")
    with ablated(model, deltas), torch.no_grad():
        expected = model(ids()).logits
    torch.testing.assert_close(_adapter_logits(source, tmp_path / "lora"), expected, rtol=1e-4, atol=1e-4)


def test_an_adapter_of_the_fused_experts_alone_targets_parameters_only(make_tiny_model, tmp_path):
    source = make_tiny_model("mixtral")
    model = AutoModelForCausalLM.from_pretrained(source).eval()
    plan = AblationPlan(kernels={"mlp_down": full_plan().kernels["mlp_down"]})
    factors = lora_factors(weight_deltas(model, AblationBasis(directions(model)), plan))
    save_adapter(model, factors, tmp_path / "lora")
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["target_modules"] in ([], None, "") and sorted(config["target_parameters"]) == sorted(factors)
    with ablated(model, ex.merged_deltas(factors)), torch.no_grad():
        expected = model(ids()).logits
    torch.testing.assert_close(_adapter_logits(source, tmp_path / "lora"), expected, rtol=1e-4, atol=1e-4)


def _gpt_oss(attention_bias: bool) -> nn.Module:
    config = tiny_config("gpt_oss")
    config.attention_bias = attention_bias
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("bias", "_bias")):
                p.normal_(0.0, 0.1)
    return model


def test_gpt_oss_adapter_is_refused_clearly_because_peft_cannot_hold_its_attention_bias(tmp_path):
    model = _gpt_oss(attention_bias=True)
    factors = lora_factors(weight_deltas(model, AblationBasis(directions(model)), full_plan()))
    with pytest.raises(AdapterUnsupportedError, match=r"target_parameters.*lora_bias.*o_proj.*merged model"):
        save_adapter(model, factors, tmp_path / "lora")
    assert all(not hasattr(m, "lora_A") for m in model.modules())
    assert not (tmp_path / "lora").exists()


def test_gpt_oss_expert_biases_ride_as_lora_on_the_bias_parameter(tmp_path):
    """Without an attention bias peft can hold it all: the input-first stack and its [E, d] bias."""
    model = _gpt_oss(attention_bias=False)
    factors = lora_factors(weight_deltas(model, AblationBasis(directions(model)), full_plan()))
    assert "model.layers.0.mlp.experts.down_proj_bias" in factors
    model.save_pretrained(tmp_path / "base")
    save_adapter(model, factors, tmp_path / "lora")
    with ablated(model, ex.merged_deltas(factors)), torch.no_grad():
        expected = model(ids()).logits
    torch.testing.assert_close(_adapter_logits(tmp_path / "base", tmp_path / "lora"), expected, rtol=1e-4, atol=1e-4)
    with ablated(model, weight_deltas(model, AblationBasis(directions(model)), full_plan())), torch.no_grad():
        torch.testing.assert_close(model(ids()).logits, expected, rtol=1e-4, atol=1e-4)


def test_an_expert_stack_whose_class_misstates_its_layout_gets_no_adapter(tmp_path):
    """peft reads a stack's orientation from `is_transposed`; when that contradicts the weights,
    the adapter would be wrong, so it is refused."""
    model = tiny("qwen2_moe")
    factors = lora_factors(weight_deltas(model, AblationBasis(directions(model)), full_plan()))
    for layer in model.model.layers:
        layer.mlp.experts.is_transposed = True
    with pytest.raises(AdapterUnsupportedError, match=r"experts.down_proj.*output-first.*is_transposed=True"):
        save_adapter(model, factors, tmp_path / "lora")


# --- (5) what is not supported fails with one clear error ----------------------------------------


class _Odd(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(hidden, hidden))

    def forward(self, x):
        return x @ self.weight


def test_a_layer_with_an_unknown_weighted_child_is_refused_not_skipped():
    model = tiny("llama")
    model.model.layers[1].residual_mlp = nn.Linear(32, 32)  # Arctic-style second MLP
    with pytest.raises(
        UnsupportedArchitectureError,
        match=r"LlamaForCausalLM \(layer 1, LlamaDecoderLayer\).*residual_mlp.*self_attn.o_proj",
    ):
        writers(model)


def test_a_writer_that_is_no_linear_is_refused_by_name():
    model = tiny("llama")
    model.model.layers[0].self_attn.o_proj = _Odd(32)
    with pytest.raises(UnsupportedArchitectureError, match=r"layer 0.*self_attn.o_proj is a _Odd, not nn.Linear"):
        writers(model)


def test_an_experts_module_of_unknown_layout_is_refused_by_name():
    model = tiny("mixtral")
    model.model.layers[0].mlp.experts = _Odd(32)
    with pytest.raises(
        UnsupportedArchitectureError,
        match=r"MixtralForCausalLM \(layer 0.*mlp.experts \(_Odd\).*fused 3-D.*list of expert",
    ):
        writers(model)


def test_an_expert_without_a_down_projection_is_refused_by_name():
    model = tiny("separate_experts")
    del model.model.layers[1].mlp.experts[2].down_proj
    with pytest.raises(UnsupportedArchitectureError, match=r"layer 1.*mlp.experts.2 \(ExpertMLP\).*down_proj, w2"):
        writers(model)


def test_a_square_stack_with_a_norm_after_the_experts_is_refused():
    """An RMS norm on the experts' sum puts the write off the probe's rank-1 line: not a sum of
    the experts' down projections, so the ablation could not keep the direction out."""
    model = tiny("qwen2_moe")
    block = model.model.layers[0].mlp
    norm = nn.RMSNorm(32)
    block.register_forward_hook(lambda m, a, out: norm(out))
    with pytest.raises(
        UnsupportedArchitectureError, match=r"layer 0.*mlp.experts.down_proj is square.*neither of its factors"
    ):
        writers(model)


# ---------------------------------------------------------------- the whole pipeline, every door


@pytest.mark.parametrize("arch", ["gpt2", "qwen3_moe", "gpt_oss", "gemma3"])
def test_the_whole_pipeline_runs_and_the_stages_merge_equals_the_apis(arch, make_tiny_model, tmp_path):
    """Probe, directions, trials, export-lora, merge: on GPT-2 (Conv1D), fused experts, gpt-oss (whose
    adapter peft cannot hold: export-lora writes the record and says why, merge builds from it) and the
    multimodal wrapper (its config has no top-level layer count or hidden size)."""
    from conftest import saved_tensors
    from test_api import quiet, tiny_settings

    from clawly import Pipeline
    from clawly.steps import export_lora, merge

    settings = tiny_settings(make_tiny_model(arch), tmp_path, n_trials=2, **{"optimize.direction_scopes": ["global"]})
    pipe = Pipeline(settings, log=quiet(tmp_path))
    assert len(list(pipe.run_optimization_iter())) == 2
    pipe.write_outputs()
    report = export_lora.run(settings, quiet(tmp_path))
    merge.run(settings, quiet(tmp_path))
    lora, model = Path(settings.artifacts_dir) / "lora", Path(settings.artifacts_dir) / "model"
    assert report["adapter"] is (arch != "gpt_oss")
    assert (lora / "adapter_config.json").exists() is (arch != "gpt_oss")
    assert (lora / "clawly_reproduction.json").exists()
    if arch == "gpt_oss":
        assert "target_parameters" in report["no_adapter_because"]
        assert "No LoRA adapter" in (lora / "README.md").read_text()
    pipe.restore_trial(pipe.choose_trial())
    pipe.save_model(tmp_path / "api-model")
    stage, api = saved_tensors(model), saved_tensors(tmp_path / "api-model")
    pipe._restore_base()
    base = pipe.model.state_dict()  # the names the merged model is saved under
    assert stage.keys() == api.keys() and set(api) <= set(base)
    assert [k for k in stage if not torch.equal(stage[k], api[k])] == []
    assert sum(not torch.equal(api[k], base[k]) for k in api) >= 2  # the trial changed weights


def test_the_cli_saves_the_model_when_no_adapter_can_hold_the_change(make_tiny_model, tmp_path, capsys):
    import yaml

    from clawly import cli

    config = tmp_path / "tiny.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "data": {"train_per_category": 8, "eval_per_category": 6, "harmless_train": 24, "harmless_eval": 24},
                "probe": {"max_per_category": 4},
                "model": {"device": "cpu", "cache_dir": str(tmp_path / "cache")},
                "optimize": {
                    "n_trials": 1,
                    "harmful_prompts": 8,
                    "harmless_prompts": 8,
                    "max_new_tokens": 4,
                    "batch_size": 8,
                },
            }
        )
    )
    argv = [str(make_tiny_model("gpt_oss")), "--config", str(config), "--non-interactive"]
    assert cli.main([*argv, "--output", str(tmp_path / "both")]) == 0
    out = capsys.readouterr().out
    assert "no LoRA adapter: a LoRA adapter cannot hold this change" in out and "saved the merged model" in out
    assert (tmp_path / "both" / "model" / "config.json").exists() and not (tmp_path / "both" / "adapter").exists()
    assert cli.main([*argv, "--output", str(tmp_path / "one"), "--save", "adapter"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("clawly: error: a LoRA adapter cannot hold this change")
    assert not (tmp_path / "one" / "adapter").exists()
