import pytest
import torch

from clawly.measure.logprobs import first_token_logprobs, kl_divergence
from clawly.measure.reference import generate
from clawly.measure.stance import RefusalDetector
from clawly.measure.templating import chat_prompts, length_sorted_batches

PROMPTS = [
    "how do i cook rice",
    "tell me about the weather in paris today please",
    "write a poem",
    "what is the capital of france and why is it famous",
    "help me with my code",
    "hello",
]


def test_keyword_detector_is_case_insensitive_and_handles_curly_quotes():
    d = RefusalDetector()
    assert d("I’M SORRY, but I can’t help with that.")
    assert d("As an AI, I won't do this")
    assert not d("Sure! Here is a recipe for rice.")
    assert RefusalDetector(["nope"])("Nope.") and not RefusalDetector(["nope"])("I'm sorry")
    with pytest.raises(ValueError, match="empty"):
        RefusalDetector(["  "])


def test_chat_prompts_put_the_system_prompt_and_open_the_answer(tiny_model):
    _, tok = tiny_model
    [p] = chat_prompts(tok, ["hello"], "be brief")
    assert p.startswith("<|im_start|>system\nbe brief<|im_end|>") and p.endswith("<|im_start|>assistant\n")
    [q] = chat_prompts(tok, ["hello"], None)
    assert "system" not in q


def test_length_sorted_batches_cover_every_prompt_once(tiny_model):
    _, tok = tiny_model
    batches = length_sorted_batches(tok, PROMPTS, 4)
    assert sorted(i for b in batches for i in b) == list(range(len(PROMPTS)))
    lengths = [len(tok(PROMPTS[i]).input_ids) for b in batches for i in b]
    assert lengths == sorted(lengths)


def test_early_stop_gives_the_same_verdicts_as_full_generation(tiny_model):
    model, tok = tiny_model
    prompts = chat_prompts(tok, PROMPTS, None)
    full = generate(model, tok, prompts, max_new_tokens=10, batch_size=4)
    # markers the random model actually produces mid-answer, so some answers are "refusals"
    words = [r.split() for r in full if len(r.split()) > 3]
    assert words, "the tiny model should produce some text"
    detector = RefusalDetector([w[2] for w in words[:2]])
    from clawly.measure.decoding import PromptSet

    early, _ = PromptSet(tok, prompts, 4).generate(model, 10, decided=detector)
    flags = [detector(r) for r in early]
    assert flags == [detector(r) for r in full]
    assert any(flags)
    for e, f in zip(early, full, strict=True):
        assert f.startswith(e.rstrip())  # an early-stopped answer is a prefix of the full one
    assert sum(len(e) for e in early) < sum(len(f) for f in full)


def test_first_token_logprobs_do_not_depend_on_batching_or_padding(tiny_model):
    model, tok = tiny_model
    prompts = chat_prompts(tok, PROMPTS, "sys")
    one = first_token_logprobs(model, tok, prompts, batch_size=1)
    many = first_token_logprobs(model, tok, prompts, batch_size=6)
    assert one.shape == (len(PROMPTS), model.config.vocab_size)
    torch.testing.assert_close(one, many, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(one.exp().sum(-1), torch.ones(len(PROMPTS)), rtol=1e-5, atol=1e-5)


def test_kl_divergence_is_zero_for_equal_and_agrees_with_torch_kl_div():
    g = torch.Generator().manual_seed(0)
    p = torch.log_softmax(3 * torch.randn(5, 11, generator=g), -1)
    q = torch.log_softmax(3 * torch.randn(5, 11, generator=g), -1)
    assert kl_divergence(p, p) == 0.0
    # KL(base || new): kl_div takes the new log-probs as input and the base as target
    expected = torch.nn.functional.kl_div(q.double(), p.double(), reduction="batchmean", log_target=True)
    assert abs(kl_divergence(p, q) - float(expected)) < 1e-12 and kl_divergence(p, q) > 0
    assert abs(kl_divergence(p, q) - kl_divergence(q, p)) > 1e-3  # the direction matters


def test_base_logprobs_come_back_exactly_chunk_by_chunk():
    """The base distributions live in a temporary file (numpy.memmap of each chunk): every chunk
    reads back bit for bit, in any order, whatever their sizes."""
    from clawly.measure.scoring import LogprobFile

    torch.manual_seed(0)
    chunks = [torch.randn(3, 1000), torch.randn(1, 1000), torch.randn(7, 1000) * 1e-30, torch.randn(2, 1000)]
    file = LogprobFile()
    for c in chunks:
        file.append(c)
    assert len(file) == 4
    for k in (2, 0, 3, 1):
        assert torch.equal(file.read(k), chunks[k])
