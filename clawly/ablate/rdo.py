"""Refusal direction optimization: learn a category's direction by gradient descent on behaviour.

Difference-of-means directions are nearly shared across categories, so ablating one category's
direction removes refusals of the others too. Following Wollschläger et al. (ICML 2025,
arXiv 2502.17420), the direction r (a unit vector, one for every layer) is instead learned: with r
projected out of every residual-stream writer's output (what the weight change does with strength
1 at every layer),

- targeted prompts stop opening with a refusal: ``-log(1 - p(refusal opening token))`` at the first
  answer position, the refusal tokens being the first tokens of the base model's own refusals;
- kept prompts keep the base model's refusal: cross-entropy on the base model's own refusal
  tokens (its greedy answer, teacher-forced);
- harmless prompts keep their distribution: KL(base || ablated) of the first answer token.

r starts at the difference-of-means direction and is parametrized as v / |v| (always unit).
The result replaces the category's direction at every probe point, so the directions file keeps
its format and everything downstream (orthogonalization, trials, export) works unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from clawly.ablate.ablation import writers
from clawly.ablate.descent import descend
from clawly.errors import ClawlyError
from clawly.measure.decoding import PromptSet
from clawly.measure.logprobs import answer_cross_entropy, first_token_logprobs, kl_rows
from clawly.measure.stance import StrictKeywordRule


@dataclass
class RdoTargets:
    """What the base model did, which the losses refer to."""

    refusal_tokens: list[int]  # first tokens of the base model's refusals
    kept_answers: list[list[int]]  # base answer tokens of each kept prompt that it refused
    kept_prompts: list[str]  # those prompts (templated)
    harmless_logprobs: torch.Tensor  # [n, vocab] base first-token log-probs of the harmless prompts


@dataclass
class RdoResult:
    direction: torch.Tensor  # [d] unit, float32
    history: list[dict] = field(default_factory=list)  # per step: total and each term


@contextlib.contextmanager
def projected_out(model: PreTrainedModel, direction: torch.Tensor) -> Iterator[None]:
    """Project `direction` (unit, `[d]`, may require grad) out of every writer's output."""
    found = writers(model)
    if any(w.gain is not None for w in found):
        raise ClawlyError(
            "directions.method=rdo: this architecture normalizes writer outputs before the "
            "residual stream (Gemma 2/3, OLMo 2), which the optimization does not model yet; "
            "use directions.method=dim"
        )

    def hook(module, args, output):
        r = direction.to(output.device, output.dtype)  # a device_map may put layers on several GPUs
        return output - (output @ r).unsqueeze(-1) * r

    handles = [w.module.register_forward_hook(hook) for w in found]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def base_targets(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    harmful: Sequence[str],
    kept: Sequence[str],
    harmless: Sequence[str],
    rule: StrictKeywordRule,
    answer_tokens: int = 24,
    kept_tokens: int = 12,
    batch_size: int = 16,
) -> RdoTargets:
    """The base model's refusal opening tokens (over targeted and kept prompts), its refusal
    answers to kept prompts, and its harmless first-token distribution."""
    prompts = list(harmful) + list(kept)
    ps = PromptSet(tokenizer, prompts, batch_size, prefix_cache=False)
    texts, _ = ps.generate(model, answer_tokens)
    refusing = [i for i, t in enumerate(texts) if rule(t) == "refusal"]
    ids = [tokenizer(texts[i], add_special_tokens=False).input_ids for i in refusing]
    refusal_tokens = sorted({x[0] for x in ids if x})
    kept_rows = [(prompts[i], x[:kept_tokens]) for i, x in zip(refusing, ids, strict=True) if i >= len(harmful) and x]
    return RdoTargets(
        refusal_tokens,
        [a for _, a in kept_rows],
        [p for p, _ in kept_rows],
        first_token_logprobs(model, tokenizer, harmless),
    )


def optimize_direction(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    init: torch.Tensor,
    targeted: Sequence[str],
    targets: RdoTargets,
    harmless: Sequence[str],
    steps: int = 30,
    lr: float = 0.01,
    kept_weight: float = 1.0,
    harmless_weight: float = 1.0,
    progress: Callable | None = None,
) -> RdoResult:
    """Learn a unit direction from `init` (`[d]`): targeted prompts stop opening with refusal
    tokens, kept prompts keep the base refusals, harmless prompts keep their first-token
    distribution (losses in the module docstring). Model weights are not changed."""
    if not targets.refusal_tokens:
        raise ClawlyError(
            "directions.method=rdo: the base model refused none of the prompts, so there is no "
            "refusal to learn a direction from"
        )
    for p in model.parameters():
        p.requires_grad_(False)
    v = init.detach().to(torch.float32).clone().to(model.device).requires_grad_(True)
    refusal = torch.tensor(targets.refusal_tokens, device=model.device)
    zero = torch.zeros((), device=model.device)

    def losses(step: int) -> dict[str, torch.Tensor]:
        with projected_out(model, v / v.norm()):
            lp = first_token_logprobs(model, tokenizer, targeted)
            p_refuse = lp[:, refusal].logsumexp(-1).exp().clamp(max=1 - 1e-6)
            target_loss = -torch.log1p(-p_refuse).mean()
            kept_loss = (
                answer_cross_entropy(model, tokenizer, targets.kept_prompts, targets.kept_answers)
                if targets.kept_prompts and kept_weight
                else zero
            )
            kl = (
                kl_rows(targets.harmless_logprobs, first_token_logprobs(model, tokenizer, harmless)).mean()
                if harmless_weight
                else zero
            )
        return {
            "loss": target_loss + kept_weight * kept_loss + harmless_weight * kl,
            "targeted": target_loss,
            "kept": kept_loss,
            "harmless_kl": kl,
            "refusal_probability": p_refuse.mean(),
        }

    history = descend([v], steps, lr, losses, "rdo", progress)
    return RdoResult((v / v.norm()).detach().float().cpu(), history)
