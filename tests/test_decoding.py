"""Every shortcut of the fast scorer against the slow path: transformers' generate and plain forwards."""

import pytest
import torch

from clawly.measure.decoding import (
    DecodeStats,
    PromptSet,
    auto_batch_size,
    common_prefix_length,
    detect_response_prefix,
)
from clawly.measure.logprobs import first_token_logprobs
from clawly.measure.reference import generate
from clawly.measure.stance import RefusalDetector
from clawly.measure.templating import chat_prompts

PROMPTS = [
    "how do i cook rice",
    "tell me about the weather in paris today please",
    "write a poem",
    "what is the capital of france and why is it famous",
    "help me with my code",
    "hello",
    "explain the history of science to a student",
    "plan a birthday party for my friend",
]


def test_common_prefix_length():
    assert common_prefix_length([[1, 2, 3], [1, 2, 4], [1, 2]]) == 2
    assert common_prefix_length([[5], [6]]) == 0
    assert common_prefix_length([[1, 2], [1, 2]]) == 2
    assert common_prefix_length([]) == 0


@pytest.mark.parametrize("tiny_model_dir", ["llama", "qwen2", "gemma2"], indirect=True)
def test_prefix_cached_first_token_logprobs_equal_plain_forwards(tiny_model):
    model, tok = tiny_model
    prompts = chat_prompts(tok, PROMPTS, "you are a helpful assistant")
    slow = first_token_logprobs(model, tok, prompts, batch_size=1)  # one unpadded forward per prompt
    ps = PromptSet(tok, prompts, batch_size=5, prefill_chunk=2)
    assert len(ps.prefix) > 5  # the system turn and the user header are shared
    stats = DecodeStats()
    fast = ps.first_token_logprobs(model, stats)
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-4)
    assert stats.prefix_tokens == len(ps.prefix)  # the prefix ran once, not once per prompt
    assert stats.prompt_tokens == sum(len(s) for s in ps.suffixes)


@pytest.mark.parametrize("tiny_model_dir", ["llama", "qwen2"], indirect=True)
@pytest.mark.parametrize("prefix_cache", [True, False])
@pytest.mark.parametrize("compact", [True, False])
@pytest.mark.parametrize("prefill_chunk", [2, 8])
def test_fast_generation_equals_transformers_generate(tiny_model, prefix_cache, compact, prefill_chunk):
    model, tok = tiny_model
    prompts = chat_prompts(tok, PROMPTS, "be brief")
    slow = generate(model, tok, prompts, max_new_tokens=12, batch_size=8)
    # batches of 5 prefilled in chunks of 2 (joined caches of different widths) or at once
    ps = PromptSet(tok, prompts, batch_size=5, prefix_cache=prefix_cache, prefill_chunk=prefill_chunk)
    fast, first = ps.generate(model, 12, compact=compact, first_logprobs=True)
    assert fast == slow
    torch.testing.assert_close(first, first_token_logprobs(model, tok, prompts, batch_size=1), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("tiny_model_dir", ["llama", "qwen2"], indirect=True)
def test_early_stop_and_compaction_keep_verdicts_and_save_tokens(tiny_model):
    model, tok = tiny_model
    prompts = chat_prompts(tok, PROMPTS, None)
    full = generate(model, tok, prompts, max_new_tokens=12, batch_size=8)
    words = [r.split() for r in full if len(r.split()) > 4]
    assert len(words) >= 2, "the tiny model should produce some text"
    detector = RefusalDetector([words[0][1], words[1][3]])  # "markers" the model does produce mid-answer
    ps = PromptSet(tok, prompts, batch_size=4)
    s_full, s_early, s_ride = DecodeStats(), DecodeStats(), DecodeStats()
    ps.generate(model, 12, stats=s_full)
    early, _ = ps.generate(model, 12, decided=detector, stats=s_early)
    ridealong, _ = ps.generate(model, 12, decided=detector, stats=s_ride, compact=False)
    assert [detector(r) for r in early] == [detector(r) for r in full]
    assert any(detector(r) for r in full)
    assert early == ridealong
    for e, f in zip(early, full, strict=True):
        assert f.startswith(e.rstrip())
    assert s_early.generated_tokens < s_full.generated_tokens
    assert s_early.generated_tokens < s_ride.generated_tokens  # finished rows left the batch


def test_chunked_prefill_cuts_padding(tiny_model):
    model, tok = tiny_model
    prompts = chat_prompts(tok, PROMPTS, None)
    whole, chunked = DecodeStats(), DecodeStats()
    PromptSet(tok, prompts, batch_size=8, prefill_chunk=8).generate(model, 2, stats=whole)
    PromptSet(tok, prompts, batch_size=8, prefill_chunk=2).generate(model, 2, stats=chunked)
    assert chunked.padding_tokens < whole.padding_tokens
    assert chunked.prompt_tokens == whole.prompt_tokens


def test_length_sorting_cuts_padding(tiny_model):
    _, tok = tiny_model
    prompts = chat_prompts(tok, PROMPTS, None)
    pad = {}
    for sort in (True, False):
        ps = PromptSet(tok, prompts, batch_size=2, sort_by_length=sort)
        widths = [max(len(ps.suffixes[i]) for i in b) for b in ps.batches]
        pad[sort] = sum(w * len(b) for w, b in zip(widths, ps.batches, strict=True)) - sum(map(len, ps.suffixes))
    assert pad[True] < pad[False]


def test_detect_response_prefix():
    assert detect_response_prefix(["<think>\nThe user asks", "<think>\nHmm"]) == "<think>\n\n</think>\n\n"
    assert detect_response_prefix(["Sure thing, here", "Sure thing! No"]) == "Sure "
    assert detect_response_prefix(["Answer: yes", "Answer: no"]) == "Answer: "
    assert detect_response_prefix(["I'm sorry", "Here is"]) == ""
    assert detect_response_prefix([]) == ""


def test_auto_batch_size_is_a_candidate_and_is_cached(tiny_model, tmp_path):
    model, tok = tiny_model
    prompts = chat_prompts(tok, PROMPTS, None)
    cache = tmp_path / "batch_size.json"
    b = auto_batch_size(model, tok, prompts, cache_file=cache, candidates=(1, 2, 4))
    assert b in (1, 2, 4)
    import json

    data = json.loads(cache.read_text())
    [(key, entry)] = data.items()
    assert entry["batch_size"] == b and set(entry["decode_tokens_per_second"]) <= {"1", "2", "4"}
    data[key]["batch_size"] = 3  # a cached answer is used without timing anything again
    cache.write_text(json.dumps(data))
    assert auto_batch_size(model, tok, prompts, cache_file=cache, candidates=(1, 2, 4)) == 3


def test_response_prefix_setting_literal_none_or_detected(tiny_model, tmp_path):
    from clawly.log import get_logger
    from clawly.settings import OptimizeSettings, Settings
    from clawly.steps.optimize import response_prefix

    model, tok = tiny_model
    log = get_logger("t", quiet=True)
    texts = ["how do i cook rice", "write a poem", "hello"]
    for setting, want in ((None, ""), ("Answer: ", "Answer: ")):
        s = Settings(optimize=OptimizeSettings(response_prefix=setting))
        assert response_prefix(s, model, tok, texts, texts, log) == want
    auto = response_prefix(Settings(), model, tok, texts, texts, log)
    answers, _ = PromptSet(tok, chat_prompts(tok, texts + texts, Settings().model.system_prompt), 8).generate(model, 24)
    assert auto == detect_response_prefix(answers)
    [p] = chat_prompts(tok, ["hello"], None, "Answer: ")
    assert p.endswith("<|im_start|>assistant\nAnswer: ")


def test_scoring_uses_the_current_cache_argument_and_warns_nothing(tiny_model, caplog):
    """transformers 5.24 renamed past_key_values to cache; the old name printed a deprecation
    warning on every optimize run."""
    import logging
    import warnings

    from clawly.measure.decoding import PromptSet
    from clawly.measure.templating import chat_prompts

    model, tok = tiny_model
    ps = PromptSet(tok, chat_prompts(tok, ["how do i cook rice", "write a poem", "hello"], "sys"), 2, prefill_chunk=1)
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        ps.generate(model, 3)
        ps.first_token_logprobs(model)
    said = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    assert not [m for m in said if "past_key_values" in m or "deprecated" in m], said


def test_generation_holds_one_batch_of_first_token_distributions_whatever_the_prompt_count(tiny_model):
    """Answers only: the first-token log-probs `[n, vocab]` are kept only when asked for, so the live
    vocab-sized rows at any forward pass do not grow with the prompts (counted, not timed)."""
    from conftest import LiveRows

    model, tok = tiny_model
    peaks = {}
    for k in (1, 4):
        ps = PromptSet(tok, chat_prompts(tok, PROMPTS * k, None), batch_size=4)
        with LiveRows(model, (model.config.vocab_size,)) as live:
            ps.generate(model, 3)
        peaks[k] = live.peak
    assert peaks[4] == peaks[1]


def test_generation_holds_one_batchs_kv_cache_whatever_the_prompt_count(tiny_model):
    """The next batch is prefilled after the previous batch's cache is freed: the live key/value rows at
    any forward pass do not grow with the number of batches (counted, not timed)."""
    from conftest import LiveRows

    model, tok = tiny_model
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    peaks = {}
    for k in (1, 4):
        ps = PromptSet(tok, chat_prompts(tok, PROMPTS * k, None), batch_size=len(PROMPTS))
        with LiveRows(model, (head_dim,)) as live:
            ps.generate(model, 6)
        peaks[k] = live.peak
    assert peaks[4] == peaks[1]
