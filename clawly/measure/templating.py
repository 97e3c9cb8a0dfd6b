"""Requests as the model sees them: rendered through its chat template, batched by length."""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase


def chat_prompts(
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    system_prompt: str | None | Sequence[str | None],
    response_prefix: str = "",
) -> list[str]:
    """Render user requests through the model's chat template, ready for the answer (which
    starts after `response_prefix`, e.g. an empty chain of thought). `system_prompt` is one for
    all requests, or one per request (`clawly.data.prompts.row_systems`)."""
    systems = (
        [system_prompt] * len(texts) if system_prompt is None or isinstance(system_prompt, str) else list(system_prompt)
    )
    if len(systems) != len(texts):
        raise ValueError(f"chat_prompts: {len(systems)} system prompts for {len(texts)} requests")
    out = []
    for text, system in zip(texts, systems, strict=True):
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
        out.append(
            tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + response_prefix
        )
    return out


def length_sorted_batches(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], batch_size: int, sort: bool = True
) -> list[list[int]]:
    """Indices of `prompts` in batches of similar token length (less padding); input order
    with sort=False."""
    lengths = [len(tokenizer(p, add_special_tokens=False).input_ids) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: lengths[i]) if sort else list(range(len(prompts)))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
