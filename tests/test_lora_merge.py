import json
import warnings

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from clawly.ablate.ablation import AblationPlan, LayerKernel, ablated, weight_deltas
from clawly.ablate.directions import AblationBasis, normalize
from clawly.ablate.lora import lora_factors, save_adapter, svd_compress
from clawly.model.checkpoint import INDEX_NAME, plan_shards, save_sharded, source_weight_map
from clawly.settings import parse_size


def _load(path):
    return AutoModelForCausalLM.from_pretrained(path).eval()


def _plan(norm_preserve=False):
    kernels = {"attn_out": LayerKernel(1.2, 1.0, 0.4, 1.5), "mlp_down": LayerKernel(0.9, 0.5, 0.2, 2.0)}
    return AblationPlan(kernels=kernels, direction_index=None, norm_preserve=norm_preserve)


def _directions(model, m=1):
    g = torch.Generator().manual_seed(3)
    return AblationBasis(
        normalize(
            torch.randn(
                m, model.config.num_hidden_layers + 1, model.config.hidden_size, generator=g, dtype=torch.float64
            )
        )
    )


def _ids(model):
    return torch.randint(3, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2", "opt", "gpt_neox"])
def test_lora_adapter_equals_dense_change_and_loads_in_peft(make_tiny_model, tmp_path, arch):
    path = make_tiny_model(arch)
    model = _load(path)
    directions = _directions(model)
    deltas = weight_deltas(model, directions, _plan())
    ids = _ids(model)
    with ablated(model, deltas):
        expected = model(ids).logits
    factors = lora_factors(deltas)
    for name, f in factors.items():
        torch.testing.assert_close(f.b @ f.a, deltas[name].matrix(), rtol=0, atol=1e-12)
        assert f.rank == 1 and f.relative_error == 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning is printed on saving (deprecations, peft's shape check)
        save_adapter(_load(path), factors, tmp_path / "lora", base_model_name_or_path=str(path))
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and sorted(config["target_modules"]) == sorted(deltas)
    tensors = load_file(str(tmp_path / "lora" / "adapter_model.safetensors"))
    biased = arch in ("opt", "gpt_neox")  # the bias change rides in lora_B's bias (peft lora_bias)
    assert all((d.bias is not None) == biased for d in deltas.values())
    assert len(tensors) == (3 if biased else 2) * len(deltas) and config["lora_bias"] == biased
    peft_model = PeftModel.from_pretrained(_load(path), str(tmp_path / "lora")).eval()
    torch.testing.assert_close(peft_model(ids).logits, expected, rtol=1e-4, atol=1e-4)
    merged = peft_model.merge_and_unload()
    torch.testing.assert_close(merged(ids).logits, expected, rtol=1e-4, atol=1e-4)


def test_norm_preserving_change_is_compressed_by_svd_with_reported_error(make_tiny_model, tmp_path):
    model = _load(make_tiny_model("llama"))
    deltas = weight_deltas(model, _directions(model), _plan(norm_preserve=True))
    exact = lora_factors(deltas, energy=1.0, max_rank=1000)
    for name, f in exact.items():
        torch.testing.assert_close(f.b @ f.a, deltas[name].dense, rtol=0, atol=1e-7)
        assert f.relative_error < 1e-6
    rough = lora_factors(deltas, energy=0.5, max_rank=1000)
    for name, f in rough.items():
        err = ((f.b @ f.a - deltas[name].dense).norm() / deltas[name].dense.norm()).item()
        assert abs(err - f.relative_error) < 1e-9
        assert f.rank <= exact[name].rank


def test_svd_rank_follows_energy_and_max_rank():
    u = torch.linalg.qr(torch.randn(20, 20, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(12, 12, dtype=torch.float64))[0]
    s = torch.tensor([10.0, 5.0, 1.0, 0.1] + [0.0] * 8, dtype=torch.float64)
    delta = u[:, :12] @ torch.diag(s) @ v.t()
    assert svd_compress(delta, energy=0.79, max_rank=10).rank == 1  # 100/126.01 = 0.794
    assert svd_compress(delta, energy=0.99, max_rank=10).rank == 2
    assert svd_compress(delta, energy=1.0, max_rank=10).rank == 4
    assert svd_compress(delta, energy=1.0, max_rank=3).rank == 3
    f = svd_compress(delta, energy=0.99, max_rank=10)
    assert abs(f.relative_error - (1.0**2 + 0.1**2) ** 0.5 / 126.01**0.5) < 1e-9


def test_sharded_save_round_trips_with_index(make_tiny_model, tmp_path):
    path = make_tiny_model("llama", tie=True)
    model = _load(path)
    files = save_sharded(model.state_dict(), tmp_path / "out", max_shard_size="20KB")
    assert len(files) > 1
    index = json.loads((tmp_path / "out" / INDEX_NAME).read_text())
    assert set(index["weight_map"].values()) == set(files)
    assert "lm_head.weight" not in index["weight_map"]  # tied to the embeddings: saved once
    model.config.save_pretrained(tmp_path / "out")
    again = _load(tmp_path / "out")
    ids = _ids(model)
    torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=0, atol=0)
    # a sharded source keeps its sharding
    wm = source_weight_map(tmp_path / "out")
    files2 = save_sharded(again.state_dict(), tmp_path / "out2", max_shard_size="10GB", weight_map=wm)
    assert files2 == files
    assert json.loads((tmp_path / "out2" / INDEX_NAME).read_text())["weight_map"] == index["weight_map"]


def test_single_shard_has_no_index_and_sizes_parse(tmp_path):
    sd = {"a": torch.zeros(4), "b": torch.ones(2, 2)}
    assert save_sharded(sd, tmp_path, "1GB") == ["model.safetensors"]
    assert not (tmp_path / INDEX_NAME).exists()
    assert parse_size("500MB") == 500 * 10**6 and parse_size("2GiB") == 2 * 2**30
    with pytest.raises(ValueError):
        parse_size("lots")
    assert plan_shards(sd, 16) == {"model-00001-of-00002.safetensors": ["a"], "model-00002-of-00002.safetensors": ["b"]}


def test_per_category_adapters_add_up_to_the_combined_adapter(make_tiny_model, tmp_path):
    path = make_tiny_model("llama")
    model = _load(path)
    q = _directions(model, m=2)
    strengths = torch.tensor([1.0, 0.6], dtype=torch.float64)
    ids = _ids(model)
    total = weight_deltas(model, q, _plan(), strengths)
    with ablated(model, total):
        expected = model(ids).logits
    for f in lora_factors(total).values():
        assert f.rank == 2  # rank = number of ablated directions, written exactly
    for i, name in enumerate(["violence", "drugs"]):
        alone = torch.zeros(2, dtype=torch.float64)
        alone[i] = strengths[i]
        one = weight_deltas(model, q, _plan(), alone)
        save_adapter(model, lora_factors(one), tmp_path / name)
    assert all(type(m).__name__ != "Linear" or not hasattr(m, "lora_A") for m in model.modules())  # unloaded
    peft_model = PeftModel.from_pretrained(_load(path), str(tmp_path / "violence"), adapter_name="violence")
    peft_model.load_adapter(str(tmp_path / "drugs"), adapter_name="drugs")
    peft_model.add_weighted_adapter(["violence", "drugs"], [1.0, 1.0], "both", combination_type="cat")
    peft_model.set_adapter("both")
    torch.testing.assert_close(peft_model(ids).logits, expected, rtol=1e-4, atol=1e-4)


def test_tensors_a_sharded_source_does_not_name_are_sharded_by_size(make_tiny_model, tmp_path):
    """transformers 5 fuses a MoE checkpoint's per-expert tensors on loading (Qwen3-MoE on the hub
    has `experts.0.down_proj.weight`, the model `experts.down_proj`): the source's shard map names
    none of them, and they must not all pile into its last shard."""
    source = tmp_path / "source"
    AutoModelForCausalLM.from_pretrained(make_tiny_model("qwen3_moe")).save_pretrained(source, max_shard_size="8KB")
    wm = source_weight_map(source)
    assert "model.layers.0.mlp.experts.0.down_proj.weight" in wm  # saved per expert, as on the hub
    model = _load(source)
    state = model.state_dict()
    assert "model.layers.0.mlp.experts.down_proj" in state  # fused in memory
    files = save_sharded(state, tmp_path / "out", max_shard_size="8KB", weight_map=wm)
    where = json.loads((tmp_path / "out" / INDEX_NAME).read_text())["weight_map"]
    assert len({where[k] for k in where if ".experts." in k}) > 1  # spread out, not all in the last shard
    largest = max(t.numel() * t.element_size() for t in state.values())
    assert max((tmp_path / "out" / f).stat().st_size for f in files) < max(parse_size("8KB"), largest) + 4096
    model.config.save_pretrained(tmp_path / "out")
    torch.testing.assert_close(_load(tmp_path / "out")(_ids(model)).logits, model(_ids(model)).logits, rtol=0, atol=0)
