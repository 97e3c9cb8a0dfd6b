"""Log-probabilities by plain forwards, and KL divergence (accumulated in float64).

One implementation of each: `left_padded` batches (the tokenizer's own padding, positions from
the attention mask), `first_token_logprobs` of the first answer token and `answer_logprobs` along a
given answer, teacher-forced. None of them turns gradients off: the reference measures wrap them in
`torch.no_grad()`, refusal direction optimization and distillation train through them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from clawly.measure.templating import length_sorted_batches


def left_padded(tokenizer: PreTrainedTokenizerBase, rows: Sequence[Sequence[int]], device) -> dict:
    """Token id rows left-padded to the longest (the tokenizer's pad token), with the attention mask
    and position ids counted from each row's first real token."""
    batch = tokenizer.pad(
        {"input_ids": [list(r) for r in rows]}, padding=True, padding_side="left", return_tensors="pt"
    )
    mask = batch["attention_mask"]
    return {
        "input_ids": batch["input_ids"].to(device),
        "attention_mask": mask.to(device),
        "position_ids": (mask.cumsum(-1) - 1).clamp(min=0).to(device),
    }


def _ids(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str]) -> list[list[int]]:
    return [tokenizer(p, add_special_tokens=False).input_ids for p in prompts]


def first_token_logprobs(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], batch_size: int | None = None
) -> torch.Tensor:
    """Log-probabilities of the first answer token after each templated prompt, `[n, vocab]` float32
    in input order: left-padded batches of similar length (`batch_size`; all at once without one)."""
    batches = length_sorted_batches(tokenizer, prompts, batch_size) if batch_size else [list(range(len(prompts)))]
    rows: list[torch.Tensor | None] = [None] * len(prompts)
    ids = _ids(tokenizer, prompts)
    for idx in batches:
        batch = left_padded(tokenizer, [ids[i] for i in idx], model.device)
        logits = model(**batch, use_cache=False, logits_to_keep=1).logits[:, -1, :]
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        for j, i in enumerate(idx):
            rows[i] = logprobs[j]
    return torch.stack(rows)  # type: ignore[arg-type]


def answer_logprobs(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], answers: Sequence[Sequence[int]]
) -> list[torch.Tensor]:
    """Log-probs `[len(answer), vocab]` float32 at each position of each given answer after its
    templated prompt (position i holds the distribution of answer token i), teacher-forced."""
    rows = [p + list(a) for p, a in zip(_ids(tokenizer, prompts), answers, strict=True)]
    batch = left_padded(tokenizer, rows, model.device)
    logits = model(**batch, use_cache=False).logits
    width = batch["input_ids"].shape[1]
    return [torch.log_softmax(logits[i, width - len(a) - 1 : width - 1].float(), dim=-1) for i, a in enumerate(answers)]


def answer_cross_entropy(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], answers: Sequence[Sequence[int]]
) -> torch.Tensor:
    """Mean over answers of the mean cross-entropy of each answer's tokens (teacher-forced)."""
    logprobs = answer_logprobs(model, tokenizer, prompts, answers)
    return torch.stack(
        [
            -lp.gather(1, torch.tensor(list(a), device=lp.device)[:, None]).mean()
            for lp, a in zip(logprobs, answers, strict=True)
        ]
    ).mean()


def kl_rows(base_logprobs: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """KL(base || new) in nats per row, float64, from log-probs `[..., vocab]`."""
    p = base_logprobs.to(torch.float64)
    q = logprobs.to(torch.float64)
    return (p.exp() * (p - q)).sum(-1)


def kl_divergence(base_logprobs: torch.Tensor, logprobs: torch.Tensor) -> float:
    """Mean over rows of KL(base || new) in nats, accumulated in float64."""
    return float(kl_rows(base_logprobs, logprobs).mean())
