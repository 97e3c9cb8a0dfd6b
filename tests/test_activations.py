import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from clawly.activations import (
    ActivationWriter,
    ProbeError,
    generation_marker,
    probe_positions,
    probe_residuals,
    read_activations,
)
from clawly.evaluation import chat_prompts


def test_generation_marker_is_taken_from_the_chat_template(tiny_model):
    _, tok = tiny_model
    assert generation_marker(tok, "sys", strip_newline=True) == "<|im_start|>assistant"
    assert generation_marker(tok, None, strip_newline=False) == "<|im_start|>assistant\n"


def test_probe_positions_last_token_and_marker(tiny_model):
    _, tok = tiny_model
    prompts = chat_prompts(tok, ["hello", "how do i cook rice today"], None)
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    last = probe_positions(tok, enc.input_ids, None)
    assert last.tolist() == [enc.input_ids.shape[1] - 1] * 2
    marker = probe_positions(tok, enc.input_ids, "<|im_start|>assistant")
    ids = enc.input_ids.tolist()
    for row, pos in zip(ids, marker.tolist(), strict=True):
        assert tok.convert_ids_to_tokens(row[pos]) == "assistant"
    with pytest.raises(ProbeError, match="not found"):
        probe_positions(tok, enc.input_ids, "zebra")


def test_probe_residuals_equal_unbatched_hidden_states(tiny_model):
    model, tok = tiny_model
    prompts = chat_prompts(tok, ["hello", "how do i cook rice today", "write a poem"], None)
    got = {}
    for idx, res in probe_residuals(model, tok, prompts, batch_size=3):
        for j, i in enumerate(idx):
            got[i] = res[j]
    for i, p in enumerate(prompts):
        enc = tok(p, return_tensors="pt", add_special_tokens=False)
        hs = model(**enc, output_hidden_states=True).hidden_states
        expected = torch.stack([h[0, -1] for h in hs])
        assert got[i].shape == (model.config.num_hidden_layers + 1, model.config.hidden_size)
        torch.testing.assert_close(got[i], expected, rtol=1e-4, atol=1e-4)


def test_activation_parquet_round_trip_and_schema(tmp_path):
    res = torch.randn(3, 4, 8)
    w = ActivationWriter(tmp_path / "a.parquet", 8)
    w.write(["a", "b"], ["x", "y"], res[:2])
    w.write(["c"], ["x"], res[2:])
    w.close()
    schema = pq.read_schema(tmp_path / "a.parquet")
    assert schema.names == ["id", "category", "layer", "residual"]
    t = schema.field("residual").type
    assert pa.types.is_fixed_size_list(t) and t.list_size == 8 and t.value_type == pa.float32()
    df = pd.read_parquet(tmp_path / "a.parquet")
    assert len(df) == 12 and df.layer.tolist() == [0, 1, 2, 3] * 3
    ids, cats, back = read_activations(tmp_path / "a.parquet")
    assert ids == ["a", "b", "c"] and cats == ["x", "y", "x"]
    torch.testing.assert_close(back, res)
