import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from clawly.ablate.activations import (
    ActivationWriter,
    ProbeError,
    generation_marker,
    probe_positions,
    probe_residuals,
    read_activations,
)
from clawly.measure.templating import chat_prompts


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


@pytest.mark.parametrize("system", [None, "You are a support bot."])
def test_the_instruction_position_is_the_last_token_of_the_users_request(tiny_model, system):
    """probe.position=instruction: the token before the template's post-instruction tokens, which
    is the last token of what the user wrote (here a word no template contains)."""
    from clawly.ablate.activations import instruction_suffix

    _, tok = tiny_model
    requests = ["hello zebra", "how do i cook rice with a zebra"]
    prompts = chat_prompts(tok, requests, system)
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    suffix = instruction_suffix(tok, system)
    assert tok.decode(suffix).startswith("<|im_end|>") and "assistant" in tok.decode(suffix)
    pos = probe_positions(tok, enc.input_ids, None, suffix)
    for row, p, text in zip(enc.input_ids.tolist(), pos.tolist(), requests, strict=True):
        assert tok.decode(row[p]).strip() == tok.decode(tok(text, add_special_tokens=False).input_ids[-1]).strip()
        assert tok.decode(row[p + 1 :]) == tok.decode(suffix)
    with pytest.raises(ProbeError, match="post-instruction"):
        probe_positions(tok, enc.input_ids[:, :-1], None, suffix)


@pytest.mark.parametrize("tiny_model_dir", ["llama", "gemma2"], indirect=True)
def test_probe_points_are_the_embedding_output_and_each_raw_layer_output(tiny_model):
    """Point 0 is the input of layer 0, point l + 1 the output of layer l before any final norm.
    transformers' last `hidden_states` entry is the final norm's output instead; the reference
    for the last point is the same model with that norm replaced by the identity."""
    import copy

    model, tok = tiny_model
    prompts = chat_prompts(tok, ["hello", "how do i cook rice today", "write a poem"], None)
    got = {}
    for idx, res in probe_residuals(model, tok, prompts, batch_size=3):
        for j, i in enumerate(idx):
            got[i] = res[j]
    unnormed = copy.deepcopy(model)
    unnormed.model.norm = torch.nn.Identity()
    for i, p in enumerate(prompts):
        enc = tok(p, return_tensors="pt", add_special_tokens=False)
        hs = model(**enc, output_hidden_states=True).hidden_states
        raw_last = unnormed(**enc, output_hidden_states=True).hidden_states[-1]
        expected = torch.stack([h[0, -1] for h in hs[:-1]] + [raw_last[0, -1]])
        assert got[i].shape == (model.config.num_hidden_layers + 1, model.config.hidden_size)
        torch.testing.assert_close(got[i], expected, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(got[i][-1], hs[-1][0, -1], rtol=1e-2, atol=1e-2)  # not the normed output


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


def test_probing_holds_one_batch_of_residuals_whatever_the_prompt_count(tiny_model_dir, tmp_path):
    """The probe step streams residuals to Parquet batch by batch: the live `[., P, d]` rows at any
    forward pass are the same for 4x the prompts (counted through the garbage collector, not RSS)."""
    from conftest import LiveRows

    from clawly.log import get_logger
    from clawly.model.loading import load_model
    from clawly.settings import Settings
    from clawly.steps import generate_datasets, probe_activations

    log = get_logger("test", tmp_path / "logs", quiet=True)
    keys = {
        "data.out_dir": str(tmp_path / "prompts"),
        "data.train_per_category": 8,
        "data.eval_per_category": 1,
        "data.harmless_train": 8,
        "data.harmless_eval": 1,
        "probe.batch_size": 2,
        "model.device": "cpu",
    }
    generate_datasets.run(Settings(model=str(tiny_model_dir), **keys), log)
    model, tok = load_model(Settings(model=str(tiny_model_dir), **keys).model)
    tail = (model.config.num_hidden_layers + 1, model.config.hidden_size)
    peaks, rows = {}, {}
    for cap in (2, 8):
        s = Settings(
            model=str(tiny_model_dir),
            artifacts_dir=str(tmp_path / f"a{cap}"),
            **{**keys, "probe.max_per_category": cap},
        )
        with LiveRows(model, tail) as live:
            probe_activations.run(s, log, model, tok)
        peaks[cap] = live.peak
        rows[cap] = len(read_activations(tmp_path / f"a{cap}" / "activations" / "harmful.parquet")[0])
    assert rows[8] == 4 * rows[2]
    assert peaks[8] == peaks[2]
