"""Input-conditional edits (clawly.ablate.edits): the null-space and least-squares forms of a
writer's change, the streamed second moments they are built from, and the whole path through the
trials, the adapter, the merged model and the reproduction record on a tiny model."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from test_api import quiet, tiny_settings
from transformers import AutoModelForCausalLM

from clawly import Pipeline
from clawly.ablate.ablation import AblationPlan, LayerKernel, ablated, weight_deltas
from clawly.ablate.directions import AblationBasis
from clawly.ablate.edits import (
    SecondMoment,
    Spectrum,
    WriterInputs,
    edit_rows,
    read_inputs,
    read_writer_inputs,
    write_writer_inputs,
)
from clawly.ablate.lora import lora_factors
from clawly.measure.templating import chat_prompts
from clawly.model.architecture import writers
from clawly.model.loading import load_model
from clawly.settings import ModelSettings


def spectrum(rows: torch.Tensor, rank: int | None = None) -> Spectrum:
    m = SecondMoment(rows.shape[1], rank or rows.shape[1])
    m.update(rows)
    return Spectrum(*m.spectrum(), m.trace, m.count)


# ------------------------------------------------------------------ the math on one writer


def test_a_null_space_edit_leaves_kept_inputs_alone_and_removes_q_from_inputs_outside_their_span():
    torch.manual_seed(0)
    d, d_in = 12, 16
    w = torch.randn(d, d_in, dtype=torch.float64)
    q = torch.nn.functional.normalize(torch.randn(d, dtype=torch.float64), dim=0)
    kept = torch.randn(40, 5, dtype=torch.float64) @ torch.randn(5, d_in, dtype=torch.float64)  # a 5-dim span
    basis, _ = torch.linalg.qr(kept.t())  # [d_in, 5]
    outside = torch.randn(3, d_in, dtype=torch.float64)
    outside = outside - outside @ basis[:, :5] @ basis[:, :5].t()  # targeted inputs orthogonal to it
    a = q[None] @ w  # [1, d_in]: the read row qᵀ W
    edited = edit_rows({"method": "nullspace", "energy": 1.0}, a, spectrum(kept), None)
    delta = -q[:, None] @ edited  # ΔW = -q (qᵀ W P), strength 1
    assert torch.allclose((w + delta) @ kept.t(), w @ kept.t(), atol=1e-10)  # kept writes: unchanged
    assert torch.allclose(q @ ((w + delta) @ outside.t()), torch.zeros(3, dtype=torch.float64), atol=1e-10)
    untouched = torch.eye(d, dtype=torch.float64) - q[:, None] @ q[None]
    assert torch.allclose(untouched @ (w + delta) @ outside.t(), untouched @ w @ outside.t(), atol=1e-10)


def test_the_null_space_keeps_the_share_of_energy_asked_for():
    torch.manual_seed(1)
    scales = torch.tensor([10.0, 5.0, 2.0, 1.0, 0.5, 0.1], dtype=torch.float64)
    rows = torch.randn(400, 6, dtype=torch.float64) * scales
    s = spectrum(rows)
    shares = torch.cumsum(s.energy, 0) / s.trace
    for share in (0.5, 0.8, 0.95, 0.999):
        r = s.rank_for(share)
        assert shares[r - 1] >= share and (r == 1 or shares[r - 2] < share)
    assert s.rank_for(1.0) == 6


def test_least_squares_satisfies_its_normal_equations():
    torch.manual_seed(2)
    d, d_in = 10, 14
    w = torch.randn(d, d_in, dtype=torch.float64)
    q = torch.nn.functional.normalize(torch.randn(2, d, dtype=torch.float64), dim=1)  # two directions
    targeted, kept = torch.randn(50, d_in, dtype=torch.float64), torch.randn(30, d_in, dtype=torch.float64) * 2
    st, sk = spectrum(targeted), spectrum(kept)
    ridge = 0.05
    a = q @ w
    edited = edit_rows({"method": "least_squares", "ridge": ridge}, a, sk, st)
    ct, ck = targeted.t() @ targeted / 50, kept.t() @ kept / 30
    lam = ridge * (ct.trace() + ck.trace()) / d_in
    # ΔW = -qᵀ·edited; the normal equations of min E_t‖ΔW x + q qᵀ W x‖² + E_k‖ΔW x‖² + λ‖ΔW‖²
    delta = -q.t() @ edited
    lhs = delta @ (ct + ck + lam * torch.eye(d_in, dtype=torch.float64))
    assert torch.allclose(lhs, -q.t() @ q @ w @ ct, atol=1e-9)
    assert torch.linalg.matrix_rank(delta) == 2  # rank 1 per direction: the adapter holds it exactly


def test_a_sketch_finds_the_top_of_the_spectrum_and_keeps_the_exact_trace():
    torch.manual_seed(3)
    d, r = 80, 12
    top = torch.linalg.qr(torch.randn(d, 6, dtype=torch.float64))[0]  # 6 strong directions, then noise
    rows = (
        torch.randn(3000, 6, dtype=torch.float64) * torch.tensor([20.0, 15, 10, 8, 6, 5])
    ) @ top.t() + 0.3 * torch.randn(3000, d, dtype=torch.float64)
    sketch, exact = spectrum(rows, rank=r), spectrum(rows)
    assert not SecondMoment(d, r).exact and sketch.basis.shape == (r, d)
    assert sketch.trace == pytest.approx(exact.trace, rel=1e-12) and sketch.count == exact.count == 3000
    # the sketch's top 6 directions span the exact top 6 (cosines of the principal angles near 1)
    angles = torch.linalg.svdvals(sketch.basis[:6] @ exact.basis[:6].t())
    assert angles.min() > 0.999
    assert torch.allclose(sketch.energy[:6], exact.energy[:6], rtol=0.01)


def test_writer_inputs_survive_their_file(tmp_path):
    torch.manual_seed(4)
    inputs = WriterInputs({"w1": spectrum(torch.randn(20, 8))}, {"w1": spectrum(torch.randn(9, 8))}, {"method": "x"})
    write_writer_inputs(tmp_path / "inputs.safetensors", inputs)
    back = read_writer_inputs(tmp_path / "inputs.safetensors")
    assert back.meta == {"method": "x"}
    for part in ("kept", "targeted"):
        a, b = getattr(inputs, part)["w1"], getattr(back, part)["w1"]
        assert torch.allclose(a.basis, b.basis, atol=1e-6) and torch.equal(a.energy, b.energy)
        assert (a.trace, a.count) == (b.trace, b.count)


# ------------------------------------------------------------------ on a model


def conversation(tokenizer, text: str) -> str:
    return chat_prompts(tokenizer, [text], "You help.")[0] + " sure"


def test_reading_writer_inputs_computes_vocabulary_logits_for_no_more_than_one_position_a_row(make_tiny_model):
    """probe-writers reads every position's writer inputs, but the LM head's logits are of no use to it:
    `[b, t, vocab]` float32 was the largest tensor of the stage on the default model (16 x 120 positions
    x 151,936 = 1.2 GB). The inputs read are the same either way."""
    model, tokenizer = load_model(ModelSettings(name=str(make_tiny_model("llama")), device="cpu"))
    texts = [conversation(tokenizer, t) for t in ("how do i bake bread ?", "write a poem about the sea", "hi")]
    shapes = []
    head = model.get_output_embeddings().register_forward_hook(lambda m, a, out: shapes.append(tuple(out.shape)))
    try:
        spectra = read_inputs(model, tokenizer, texts, rank=512, batch_size=2)
    finally:
        head.remove()
    assert shapes and all(s[0] * s[1] <= 2 for s in shapes), shapes  # one position per row of a batch of 2
    lengths = [len(tokenizer(t, add_special_tokens=False).input_ids) for t in texts]
    for name, sp in spectra.items():
        assert sp.count == sum(lengths), name  # every real position of every conversation, no padding
    # the same second moments as a plain forward per conversation, without the hook's batching
    one = read_inputs(model, tokenizer, texts[:1], rank=512, batch_size=1)
    ids = tokenizer(texts[0], return_tensors="pt", add_special_tokens=False).input_ids
    w = next(iter(writers(model)))
    seen = []
    h = w.module.register_forward_pre_hook(lambda m, a: seen.append(a[0][0].double()))
    with torch.no_grad():
        model(ids)
    h.remove()
    exact = seen[0].t() @ seen[0]
    sp = one[w.name]
    assert torch.allclose((sp.basis.t() * sp.energy) @ sp.basis, exact, atol=1e-8)


def test_with_an_exact_kept_span_the_whole_forward_on_kept_inputs_is_unchanged(make_tiny_model):
    """Every writer's output on kept inputs is unchanged, so the residual stream and the logits on the
    kept conversation are too (to float precision), while another request's change."""
    model, tokenizer = load_model(ModelSettings(name=str(make_tiny_model("llama")), device="cpu"))
    kept_text = conversation(tokenizer, "how do i bake bread ?")
    other_text = conversation(tokenizer, "how do i build a bomb ?")
    kept = read_inputs(model, tokenizer, [kept_text], rank=512)
    n = len(tokenizer(kept_text, add_special_tokens=False).input_ids)
    widths = {w.name: w.weight.shape[1] for w in writers(model)}
    assert all(n < d for d in widths.values())  # fewer positions than input dims: a proper subspace
    inputs = WriterInputs(kept, kept, {})
    torch.manual_seed(5)
    hidden = model.config.hidden_size
    q = torch.nn.functional.normalize(torch.randn(1, 3, hidden, dtype=torch.float64), dim=-1)  # [m, P, d]
    basis = AblationBasis(q)
    kernel = LayerKernel(1.0, 0.5, 1.0, 2.0)
    plan = AblationPlan({"attn_out": kernel, "mlp_down": kernel}, edit={"method": "nullspace", "energy": 1.0})
    deltas = weight_deltas(model, basis, plan, inputs=inputs)
    assert set(deltas) == set(widths)

    def logits(text: str) -> torch.Tensor:
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
        with torch.no_grad():
            return model(ids).logits

    before = {t: logits(t) for t in (kept_text, other_text)}
    with ablated(model, deltas):
        after = {t: logits(t) for t in (kept_text, other_text)}
    assert torch.allclose(after[kept_text], before[kept_text], atol=1e-5)
    assert not torch.allclose(after[other_text], before[other_text], atol=1e-3)
    # plain ablation with the same plan changes the kept conversation too
    plain = weight_deltas(model, basis, AblationPlan({"attn_out": kernel, "mlp_down": kernel}))
    with ablated(model, plain):
        assert not torch.allclose(logits(kept_text), before[kept_text], atol=1e-3)
    # the LoRA factors are the change itself: rank 1 per writer, B A = ΔW exactly
    factors = lora_factors(deltas)
    for name, f in factors.items():
        assert f.rank == 1 and f.relative_error == 0
        assert torch.allclose(f.b @ f.a, deltas[name].matrix(), atol=1e-12)


@pytest.mark.parametrize("method", ["nullspace", "least_squares"])
def test_an_input_conditional_run_trials_exports_and_reproduces_what_it_scored(make_tiny_model, tmp_path, method):
    """probe-writers, the trials (the edit's parameter searched), the adapter that peft loads and
    merges into the saved model's weights, the export report, and `reproduce` from the record."""
    model_dir = make_tiny_model("llama")
    settings = tiny_settings(
        model_dir,
        tmp_path,
        n_trials=2,
        **{
            "categories.weights": {"violence_weapons": 1.0, "drugs_substances": 1.0, "self_harm_suicide": 0.0},
            "edit.method": method,
            "edit.kept_prompts": 4,
            "edit.targeted_prompts": 4,
            "edit.answer_tokens": 4,
            "edit.rank": 16,
        },
    )
    pipe = Pipeline(settings, log=quiet(tmp_path))
    trials = list(pipe.run_optimization_iter())
    assert len(trials) == 2
    param = "keep_energy" if method == "nullspace" else "ridge"
    assert all(param in t.parameters and t.plan.edit["method"] == method for t in trials)
    assert pipe.inputs is not None and len(pipe.inputs.kept) == 4  # 2 layers x 2 writers
    sketched = next(s for name, s in pipe.inputs.kept.items() if "down_proj" in name)
    assert sketched.basis.shape[0] <= 16 and sketched.count > 16  # 64-wide inputs: a rank-16 sketch
    pipe.write_outputs()
    chosen = pipe.choose_trial()
    pipe.restore_trial(chosen)
    adapter, merged = pipe.save_adapter(tmp_path / "adapter"), pipe.save_model(tmp_path / "model")
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    by_peft = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload().state_dict()
    saved = AutoModelForCausalLM.from_pretrained(merged).state_dict()
    assert all(torch.equal(by_peft[k], saved[k]) for k in saved)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 2  # two targeted directions, rank 1 each
    record = json.loads((adapter / "clawly_reproduction.json").read_text())
    assert record["edit"]["method"] == method and (adapter / record["edit"]["file"]).is_file()
    again = Pipeline.reproduce(adapter / "clawly_reproduction.json", tmp_path / "again", quiet(tmp_path))
    assert (again / "adapter_model.safetensors").read_bytes() == (adapter / "adapter_model.safetensors").read_bytes()
    pipe.close()


# ------------------------------------------------------------------ selective distillation


def test_distillation_lowers_its_loss_and_the_trained_adapter_is_what_peft_merges(make_tiny_model, tmp_path):
    """A global trial's exact LoRA, trained towards the global model's answers on targeted requests
    and the base model's on kept ones: the loss falls; the adapter loads in peft and merges to the
    saved model; the record reproduces it; the export report says it was distilled."""
    from clawly.steps import export_lora, merge

    model_dir = make_tiny_model("llama")
    settings = tiny_settings(
        model_dir,
        tmp_path,
        n_trials=2,
        **{
            "categories.weights": {"violence_weapons": 1.0, "self_harm_suicide": 0.0},
            "distill.steps": 12,
            "distill.rank": 3,
            "distill.lr": 0.01,
            "distill.batch_size": 4,
            "distill.targeted_prompts": 4,
            "distill.kept_prompts": 4,
            "distill.harmless_prompts": 4,
            "distill.answer_tokens": 6,
            "distill.kl_tokens": 3,
        },
    )
    pipe = Pipeline(settings, log=quiet(tmp_path))
    list(pipe.run_optimization_iter())
    pipe.restore_trial(pipe.choose_trial())
    pipe.distill()
    report = json.loads((tmp_path / "artifacts" / "reports" / "distill.json").read_text())
    assert report["last"]["loss"] < report["first"]["loss"]  # same draw of requests at both ends
    adapter, merged = pipe.save_adapter(tmp_path / "adapter"), pipe.save_model(tmp_path / "model")
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 3
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    by_peft = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload().state_dict()
    saved = AutoModelForCausalLM.from_pretrained(merged).state_dict()
    assert all(torch.equal(by_peft[k], saved[k]) for k in saved)
    # the merged model is the one the pipeline holds (what a score() or chat now sees)
    held = pipe.model.state_dict()
    assert all(torch.equal(held[k], saved[k]) for k in saved)
    record = json.loads((adapter / "clawly_reproduction.json").read_text())
    assert record["distilled"]["steps"] == 12
    again = Pipeline.reproduce(adapter / "clawly_reproduction.json", tmp_path / "again", quiet(tmp_path))
    assert (again / "adapter_model.safetensors").read_bytes() == (adapter / "adapter_model.safetensors").read_bytes()
    # the stages: export-lora exports the distilled factors, merge merges them
    export_lora.run(settings, quiet(tmp_path))
    merge.run(settings, quiet(tmp_path))
    staged = AutoModelForCausalLM.from_pretrained(tmp_path / "artifacts" / "model").state_dict()
    assert all(torch.equal(staged[k], saved[k]) for k in saved)
    assert json.loads((tmp_path / "artifacts" / "reports" / "export.json").read_text())["distilled"] is True
    pipe.close()


def test_the_least_squares_factors_kept_across_trials_give_every_ridge_its_own_dense_solution():
    """A writer's least-squares factors are built once and reused for every trial's ridge: each ridge's
    rows equal the dense A C_t (C_t + C_k + λI)⁻¹, in whichever order the ridges come."""
    torch.manual_seed(4)
    d_in = 12
    targeted, kept = torch.randn(40, d_in, dtype=torch.float64), torch.randn(25, d_in, dtype=torch.float64) * 3
    st, sk = spectrum(targeted), spectrum(kept)
    inputs = WriterInputs({"w": sk}, {"w": st}, {})
    ct, ck = targeted.t() @ targeted / 40, kept.t() @ kept / 25
    a = torch.randn(2, d_in, dtype=torch.float64)
    for ridge in (0.3, 0.001, 0.05, 0.3):
        lam = ridge * (ct.trace() + ck.trace()) / d_in
        dense = a @ ct @ torch.linalg.inv(ct + ck + lam * torch.eye(d_in, dtype=torch.float64))
        torch.testing.assert_close(inputs.apply({"method": "least_squares", "ridge": ridge}, "w", a), dense)
    assert list(inputs._solvers) == ["w"]  # built once
