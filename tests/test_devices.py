"""Devices and precisions: half-precision and bitsandbytes 4-bit models through probe, trial, export and merge.

What runs on CPU runs here: bfloat16 models, and 4-bit models quantized by bitsandbytes' CPU backend (the
`quant` extra). Loading through `load_model` with CUDA, `device_map` and 4-bit is marked `gpu`.
"""

from pathlib import Path

import pytest
import torch
from conftest import saved_tensors
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from clawly import Pipeline, Settings
from clawly.ablate.ablation import AblationPlan, LayerKernel, ablated, weight_deltas
from clawly.ablate.activations import capture_residuals, probe_residuals
from clawly.ablate.directions import AblationBasis
from clawly.log import get_logger
from clawly.model.architecture import writers
from clawly.steps import export_lora, merge

TINY = {
    "data.train_per_category": 8,
    "data.eval_per_category": 6,
    "data.harmless_train": 24,
    "data.harmless_eval": 24,
    "probe.max_per_category": 4,
    "probe.batch_size": 8,
    "n_trials": 2,
    "n_startup_trials": 2,
    "harmful_prompts": 8,
    "optimize.harmless_prompts": 8,
    "optimize.max_new_tokens": 4,
    "optimize.batch_size": 8,
    "model.device": "cpu",
}
PLAN = AblationPlan(kernels={"attn_out": LayerKernel(1.0, 1.0, 0.5, 2.0), "mlp_down": LayerKernel(0.8, 0.0, 0.5, 2.0)})


def tiny_settings(model_dir: Path, tmp: Path, **keys) -> Settings:
    return Settings(
        model=str(model_dir),
        artifacts_dir=str(tmp / "artifacts"),
        **{"data.out_dir": str(tmp / "prompts"), "model.cache_dir": str(tmp / "cache"), **TINY, **keys},
    )


def quiet(tmp: Path):
    return get_logger("test", tmp / "logs", quiet=True)


def quantized(model_dir: Path, cpu_kernel: bool = False):
    """The tiny model loaded 4-bit (nf4, float32 compute) by transformers, as load_model asks for it on CUDA.

    bitsandbytes' AVX512-BF16 CPU kernel repacks a weight on its first forward and computes with bfloat16
    block scales, so its outputs differ from the dequantized weight's in the 3rd decimal; it is off unless
    `cpu_kernel`, so the tests can compare with the dequantized weights exactly."""
    pytest.importorskip("bitsandbytes", reason="4-bit needs the quant extra")
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_type="nf4")
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=config, dtype=torch.float32).eval()
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = module.support_avx512bf16_for_cpu and cpu_kernel
    return model


def tiny_4bit_dir(make_tiny_model) -> Path:
    return make_tiny_model("llama", hidden=64)  # bitsandbytes' CPU path needs rows of at least one 64-block


def dequantized_copy(model_dir: Path, quant) -> torch.nn.Module:
    """The float32 model with every 4-bit weight replaced by its dequantized value: what the 4-bit model computes."""
    from bitsandbytes.functional import dequantize_4bit

    dense = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, module in quant.named_modules():
            state = getattr(getattr(module, "weight", None), "quant_state", None)
            if state is not None:
                dense.get_submodule(name).weight.copy_(dequantize_4bit(module.weight.data, state))
    return dense


def random_basis(model, seed: int = 0) -> AblationBasis:
    """One orthonormal direction per probe point `[1, P, d]`."""
    layers, hidden = model.config.num_hidden_layers, model.config.hidden_size
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(1, layers + 1, hidden, generator=g, dtype=torch.float64)
    return AblationBasis(v / v.norm(dim=-1, keepdim=True))


def logits(model, tokenizer, text: str = "how do i bake bread ?") -> torch.Tensor:
    with torch.no_grad():
        return model(tokenizer(text, return_tensors="pt").input_ids).logits.float()


# ---------------------------------------------------------------- half precision


def test_residuals_of_a_bfloat16_model_are_gathered_in_float32_on_cpu(make_tiny_model, build_tiny_model):
    from clawly.model.loading import load_tokenizer

    model_dir = make_tiny_model("llama")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    tokenizer = load_tokenizer(model_dir)
    with capture_residuals(model, torch.tensor([0])) as points, torch.no_grad():
        model(tokenizer("hello", return_tensors="pt").input_ids)
    assert len(points) == 3 and {(p.dtype, p.device.type) for p in points} == {(torch.float32, "cpu")}
    ((_, residuals),) = probe_residuals(model, tokenizer, ["how do i bake bread ?"], batch_size=4)
    reference, _ = build_tiny_model("llama")
    ((_, exact),) = probe_residuals(reference, tokenizer, ["how do i bake bread ?"], batch_size=4)
    assert residuals.dtype == torch.float32 and residuals.shape == exact.shape
    assert torch.allclose(residuals, exact, rtol=0.05, atol=0.05)


def test_bfloat16_probe_trial_and_export_give_an_adapter_close_to_the_float32_one(make_tiny_model, tmp_path):
    adapters = {}
    for dtype in ("float32", "bfloat16"):
        tmp = tmp_path / dtype
        pipe = Pipeline(tiny_settings(make_tiny_model("llama"), tmp, **{"model.dtype": dtype}), log=quiet(tmp))
        pipe.load_model()
        assert pipe.model.dtype == getattr(torch, dtype)
        assert pipe.compute_refusal_directions().directions.dtype in (torch.float32, torch.float64)
        pipe.restore_trial(PLAN)
        pipe.save_adapter(tmp / "adapter")
        adapters[dtype] = load_file(str(tmp / "adapter" / "adapter_model.safetensors"))
    full, half = adapters["float32"], adapters["bfloat16"]
    assert full.keys() == half.keys() and {t.dtype for t in half.values()} == {torch.float32}
    for key in full:  # B A is the comparable change (a direction's sign is free in each factor)
        if "lora_A" in key:
            b_key = key.replace("lora_A", "lora_B")
            change, close = full[b_key] @ full[key], half[b_key] @ half[key]
            assert (close - change).norm() <= 0.1 * change.norm(), key


# ---------------------------------------------------------------- bitsandbytes 4-bit on CPU


def test_writers_of_a_4bit_model_are_found_with_their_shape_and_weight_as_computed(make_tiny_model):
    from bitsandbytes.functional import dequantize_4bit

    from clawly.model.architecture import dense_weight

    quant = quantized(tiny_4bit_dir(make_tiny_model))
    found = writers(quant)
    assert len(found) == 4 and all(type(w.module).__name__ == "Linear4bit" for w in found)
    for w in found:
        expected = dequantize_4bit(w.weight.data, w.weight.quant_state)
        assert torch.equal(dense_weight(w.weight), expected) and expected.shape[0] == 64


def test_a_4bit_weight_repacked_by_the_cpu_kernel_is_refused_not_misread(make_tiny_model, tiny_model):
    from clawly.model.architecture import UnsupportedArchitectureError, dense_weight

    quant = quantized(tiny_4bit_dir(make_tiny_model), cpu_kernel=True)
    logits(quant, tiny_model[1])  # a forward without grad: bitsandbytes repacks CPU weights for its kernel
    repacked = [w for w in writers(quant) if getattr(w.weight.quant_state, "packing_format_for_cpu", False)]
    if not repacked:
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes did not repack")
    with pytest.raises(UnsupportedArchitectureError, match="CPU kernel"):
        dense_weight(repacked[0].weight)


def test_4bit_weight_change_is_computed_in_float64_from_the_dequantized_weights(make_tiny_model):
    model_dir = tiny_4bit_dir(make_tiny_model)
    quant = quantized(model_dir)
    dense = dequantized_copy(model_dir, quant)
    basis = random_basis(quant)
    from_quant, from_dense = weight_deltas(quant, basis, PLAN), weight_deltas(dense, basis, PLAN)
    assert from_quant.keys() == from_dense.keys() and len(from_quant) == 4
    for name, delta in from_quant.items():
        assert delta.a.dtype == torch.float64
        assert torch.allclose(delta.matrix(), from_dense[name].matrix(), atol=1e-12)


def test_4bit_trial_through_hooks_equals_the_change_applied_to_the_dequantized_weights(make_tiny_model, tiny_model):
    tokenizer = tiny_model[1]
    model_dir = tiny_4bit_dir(make_tiny_model)
    quant = quantized(model_dir)
    dense = dequantized_copy(model_dir, quant)
    basis = random_basis(quant)
    before = logits(quant, tokenizer)
    assert torch.allclose(before, logits(dense, tokenizer), atol=1e-4)  # the reference computes what 4-bit does
    packed = {n: p.detach().clone() for n, p in quant.state_dict().items() if isinstance(p, torch.Tensor)}
    with ablated(quant, weight_deltas(quant, basis, PLAN)):
        trial = logits(quant, tokenizer)
    with ablated(dense, weight_deltas(dense, basis, PLAN)):
        expected = logits(dense, tokenizer)
    assert not torch.allclose(trial, before, atol=1e-3)  # the trial changed the model
    assert torch.allclose(trial, expected, atol=1e-4)
    assert torch.equal(logits(quant, tokenizer), before)  # and is undone
    after = quant.state_dict()
    assert all(torch.equal(after[n], p) for n, p in packed.items())  # the packed weights were never touched


def test_4bit_adapter_is_float32_from_the_dequantized_weights_and_leaves_the_model_4bit(make_tiny_model, tmp_path):
    from clawly.save import export as ex
    from clawly.settings import ExportSettings

    model_dir = tiny_4bit_dir(make_tiny_model)
    quant = quantized(model_dir)
    dense = dequantized_copy(model_dir, quant)
    basis = random_basis(quant)
    change = ex.saved_change(quant, basis, PLAN, None, ExportSettings())
    ex.write_adapter(quant, change.factors, tmp_path / "q", str(model_dir))
    reference = ex.saved_change(dense, basis, PLAN, None, ExportSettings())
    ex.write_adapter(dense, reference.factors, tmp_path / "dense", str(model_dir))
    got, want = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("q", "dense"))
    assert got.keys() == want.keys() and {t.dtype for t in got.values()} == {torch.float32}
    assert all(torch.allclose(got[k], want[k], atol=1e-6) for k in got)
    assert all(type(w.module).__name__ == "Linear4bit" for w in writers(quant))  # peft's layers came out again


def test_a_4bit_pipeline_saves_the_change_merged_into_full_precision_weights(make_tiny_model, tmp_path):
    model_dir = tiny_4bit_dir(make_tiny_model)
    quant = quantized(model_dir)
    pipe = Pipeline(tiny_settings(model_dir, tmp_path), log=quiet(tmp_path))
    full_model, pipe.tokenizer = pipe.load_model()
    pipe.model = quant  # as load_model gives it on CUDA with model.load_in_4bit
    pipe.restore_trial(PLAN)
    pipe.save_model(tmp_path / "model")
    saved, base = saved_tensors(tmp_path / "model"), saved_tensors(model_dir)
    assert saved.keys() == base.keys()
    assert {t.dtype for t in saved.values()} == {torch.float32}
    assert {k: t.shape for k, t in saved.items()} == {k: t.shape for k, t in base.items()}
    with ablated(full_model, pipe._deltas):  # the same adapter change, added to the full-precision base
        expected = {k: v.detach().clone() for k, v in full_model.state_dict().items()}
    assert [k for k in saved if not torch.equal(saved[k], expected[k])] == []
    assert sum(not torch.equal(saved[k], base[k]) for k in saved) == 4


def test_merge_of_a_4bit_run_loads_the_base_in_full_precision(make_tiny_model, tmp_path, monkeypatch):
    model_dir = make_tiny_model("llama")
    settings = tiny_settings(model_dir, tmp_path)
    pipe = Pipeline(settings, log=quiet(tmp_path))
    list(pipe.run_optimization_iter())
    pipe.write_outputs()
    export_lora.run(settings, quiet(tmp_path))
    merge.run(settings, quiet(tmp_path))
    full = saved_tensors(Path(settings.artifacts_dir) / "model")
    loaded = []
    real = merge.load_model

    def record(model_settings, *args):
        loaded.append(model_settings)
        return real(model_settings, *args)

    monkeypatch.setattr(merge, "load_model", record)
    four_bit = Settings(**{**settings.to_dict(), "model": {**settings.to_dict()["model"], "load_in_4bit": True}})
    merge.run(four_bit, quiet(tmp_path))  # on CPU load_model refuses 4-bit: merge must not ask for it
    assert [s.load_in_4bit for s in loaded] == [False]
    again = saved_tensors(Path(settings.artifacts_dir) / "model")
    assert [k for k in full if not torch.equal(full[k], again[k])] == []


def test_saving_a_4bit_model_as_is_is_refused(make_tiny_model, tmp_path):
    from clawly.errors import ClawlyError
    from clawly.save import export as ex

    model_dir = tiny_4bit_dir(make_tiny_model)
    settings = tiny_settings(model_dir, tmp_path)
    quant = quantized(model_dir)
    with pytest.raises(ClawlyError, match="4-bit"):
        ex.write_model(quant, None, tmp_path / "out", settings, model_dir)


# ---------------------------------------------------------------- CUDA


@pytest.mark.gpu
@pytest.mark.parametrize(
    "keys",
    [{"model.dtype": "bfloat16"}, {"model.dtype": "float16"}, {"model.load_in_4bit": True}],
    ids=["bf16", "fp16", "4bit"],
)
def test_on_cuda_probe_trial_export_and_save_give_a_full_precision_model(make_tiny_model, tmp_path, keys):
    model_dir = tiny_4bit_dir(make_tiny_model)
    pipe = Pipeline(tiny_settings(model_dir, tmp_path, **{"model.device": "cuda", **keys}), log=quiet(tmp_path))
    model, tokenizer = pipe.load_model()
    assert model.device.type == "cuda" and hasattr(model, "hf_device_map")
    assert all(type(w.module).__name__ == "Linear4bit" for w in writers(model)) == bool(keys.get("model.load_in_4bit"))
    directions = pipe.compute_refusal_directions()
    assert directions.directions.device.type == "cpu" and directions.directions.is_floating_point()
    pipe.restore_trial(PLAN)
    scored = pipe.score()
    assert scored.kl_divergence is not None and scored.kl_divergence >= 0
    pipe.save_adapter(tmp_path / "adapter")
    assert {t.dtype for t in load_file(str(tmp_path / "adapter" / "adapter_model.safetensors")).values()} == {
        torch.float32
    }
    pipe.save_model(tmp_path / "model")
    saved, base = saved_tensors(tmp_path / "model"), saved_tensors(model_dir)
    assert saved.keys() == base.keys() and all(saved[k].shape == base[k].shape for k in saved)
    assert all(saved[k].is_floating_point() for k in saved)
    assert sum(not torch.equal(saved[k].float(), base[k].float()) for k in saved) >= 4


@pytest.mark.gpu
def test_residuals_from_layers_on_two_gpus_are_gathered_on_cpu(make_tiny_model):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    from clawly.model.loading import load_tokenizer

    model_dir = make_tiny_model("llama")
    device_map = {
        "model.embed_tokens": 0,
        "model.rotary_emb": 0,
        "model.layers.0": 0,
        "model.layers.1": 1,
        "model.norm": 1,
        "lm_head": 1,
    }
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, device_map=device_map).eval()
    tokenizer = load_tokenizer(model_dir)
    ((_, residuals),) = probe_residuals(model, tokenizer, ["how do i bake bread ?"], batch_size=4)
    assert residuals.dtype == torch.float32 and residuals.device.type == "cpu" and residuals.shape[1] == 3
    deltas = weight_deltas(model, random_basis(model), PLAN)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with ablated(model, deltas):
        model(tokenizer("hello", return_tensors="pt").input_ids.to(model.device))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
