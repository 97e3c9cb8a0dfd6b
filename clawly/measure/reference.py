"""The reference measures the fast scorer (`clawly.measure.decoding`) is tested against: greedy
answers by `transformers`' own `generate`, and first-token log-probabilities by plain forwards.

(`clawly.measure.logprobs.first_token_logprobs` is the reference of the first-token log-probs.)

The keyword rule (`clawly.measure.stance.RefusalDetector`) is what it is: a marker list. It misses
soft refusals and counts a response as compliant even when it is gibberish or off-topic, so figures
from it are reported as "keyword refusals", never as compliance.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList

from clawly.measure.templating import length_sorted_batches


def _encode(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], device: torch.device) -> dict:
    enc = tokenizer(list(prompts), return_tensors="pt", padding=True, add_special_tokens=False)
    return {k: v.to(device) for k, v in enc.items()}


class _StopWhenDecided(StoppingCriteria):
    """Finish each sequence as soon as `decided(text)` is true for its generated text."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_len: int, decided: Callable[[str], bool]):
        self.tokenizer, self.prompt_len, self.decided = tokenizer, prompt_len, decided

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_len :], skip_special_tokens=True)
        return torch.tensor([self.decided(t) for t in texts], device=input_ids.device)


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int,
    batch_size: int,
    decided: Callable[[str], bool] | None = None,
    progress: Callable | None = None,
    sort_by_length: bool = True,
) -> list[str]:
    """Greedy responses to templated prompts, in input order, by `transformers`' own `generate`
    (the reference the fast scorer in `clawly.measure.decoding` is tested against).

    With `decided`, a sequence stops as soon as its text so far is decided (e.g. a refusal
    marker appeared): identical verdicts to generating in full, fewer tokens.
    """
    responses: list[str] = [""] * len(prompts)
    batches = length_sorted_batches(tokenizer, prompts, batch_size, sort_by_length)
    bar = progress(total=len(prompts), desc="generate", unit="prompt") if progress else None
    for idx in batches:
        enc = _encode(tokenizer, [prompts[i] for i in idx], model.device)
        prompt_len = enc["input_ids"].shape[1]
        stopping = StoppingCriteriaList([_StopWhenDecided(tokenizer, prompt_len, decided)]) if decided else None
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            stopping_criteria=stopping,
            pad_token_id=tokenizer.pad_token_id,
        )
        texts = tokenizer.batch_decode(out[:, prompt_len:], skip_special_tokens=True)
        for i, text in zip(idx, texts, strict=True):
            responses[i] = text
        if bar is not None:
            bar.update(len(idx))
    if bar is not None:
        bar.close()
    return responses
