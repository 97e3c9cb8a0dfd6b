"""Scoring a model state: first-token KL divergence on harmless prompts, refusals on harmful ones.

`TrialScorer` tokenizes and batches the prompts once and computes the base model's first-token
distributions once, kept on disk (`LogprobFile`: in memory they grow with the prompt count, 0.6 MB
a prompt for a 151k vocabulary); each call only runs the model, compares one chunk at a time with
the base, and generates through `clawly.measure.decoding`'s fast scorer (shared-prefix cache, early stop at
the first refusal marker, batch compaction). Refusals are keyword hits, or with
`optimize.refusal_measure=classifier` the answers the response classifier does not call compliance.

Kept categories (category mode) are counted the other way round, so that a disclaimer cannot pass
for a kept refusal: their answers run to `optimize.kept_max_new_tokens` and count only when the
strict rule (`clawly.measure.stance`) calls them a refusal, a marker in the opening with no help after it
(with the classifier: its refusals that the rule does not call hedged). On targeted categories a
hedged answer still counts as a refusal: the search must remove the disclaimer too.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from clawly.measure.decoding import DecodeStats, PromptSet
from clawly.measure.logprobs import kl_rows
from clawly.measure.stance import RefusalDetector, StrictKeywordRule, combine
from clawly.settings import OptimizeSettings


@dataclass
class ScoringPrompts:
    """Templated prompts the optimizer scores trials on."""

    harmful: list[str]
    harmful_categories: list[str]
    harmless: list[str]
    harmful_requests: list[str] = field(default_factory=list)  # the raw requests (for the classifier)


@dataclass
class Scores:
    """What a model state scored: refusals (by the measure) in all and per category, KL."""

    refusals: int
    kl: float
    refusals_by_category: dict[str, int]
    prompts_by_category: dict[str, int]
    responses: list[str] = field(repr=False, default_factory=list)
    tokens: int = 0  # token positions pushed through the model (the cost on a CPU)
    keyword_refusals: int = 0
    labels: list[str] = field(repr=False, default_factory=list)  # classifier labels (refusal_measure=classifier)
    stances: list[str] = field(repr=False, default_factory=list)  # strict-rule labels ('' for non-kept prompts)
    flags: list[bool] = field(repr=False, default_factory=list)  # per prompt: counted as a refusal


class LogprobFile:
    """Log-probs `[b, vocab]` float32, chunk after chunk, in an unlinked temporary file, each chunk
    written and read back through a `numpy.memmap` of its own bytes only: memory holds one chunk
    whatever the prompt count (a map of the whole file would keep every written page resident)."""

    def __init__(self) -> None:
        self.file = tempfile.TemporaryFile()
        self.chunks: list[tuple[int, tuple[int, ...]]] = []  # (byte offset, shape)
        self.size = 0

    def append(self, logprobs: torch.Tensor) -> None:
        data = logprobs.detach().to("cpu", torch.float32).contiguous().numpy()
        self.file.truncate(self.size + data.nbytes)
        chunk = np.memmap(self.file, dtype=np.float32, mode="r+", offset=self.size, shape=data.shape)
        chunk[:] = data
        chunk.flush()
        del chunk
        self.chunks.append((self.size, data.shape))
        self.size += data.nbytes

    def __len__(self) -> int:
        return len(self.chunks)

    def read(self, k: int) -> torch.Tensor:
        """The k-th chunk appended."""
        offset, shape = self.chunks[k]
        chunk = np.memmap(self.file, dtype=np.float32, mode="r", offset=offset, shape=shape)
        out = torch.from_numpy(np.array(chunk))
        del chunk
        return out


class TrialScorer:
    """Scores a model state against cached base first-token distributions.

    The prompts are tokenized, split at their shared prefix and batched once; each call only
    runs the model."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        prompts: ScoringPrompts,
        settings: OptimizeSettings,
        progress: Callable | None = None,
        batch_size: int | None = None,
        classifier=None,
        kept: Sequence[str] = (),
    ):
        """kept: categories whose refusals are kept (category mode), counted by the strict rule."""
        self.model, self.tokenizer, self.prompts, self.settings = model, tokenizer, prompts, settings
        self.detector = RefusalDetector(settings.refusal_markers or None)
        self.rule = StrictKeywordRule(self.detector)
        self.classifier = classifier
        if settings.refusal_measure == "classifier":
            if classifier is None:
                raise ValueError("optimize.refusal_measure=classifier needs a classifier (clawly.measure.classify)")
            if len(prompts.harmful_requests) != len(prompts.harmful):
                raise ValueError("optimize.refusal_measure=classifier needs the raw harmful requests")
        self.progress = progress
        bs = batch_size if batch_size is not None else settings.batch_size
        if not isinstance(bs, int):
            raise ValueError(f"batch size {bs!r}: resolve 'auto' with clawly.measure.decoding.auto_batch_size first")
        self.batch_size = bs
        cats = prompts.harmful_categories
        self.kept_rows = [i for i, c in enumerate(cats) if c in set(kept)]
        self.other_rows = [i for i, c in enumerate(cats) if c not in set(kept)]
        self.harmful = PromptSet(
            tokenizer, [prompts.harmful[i] for i in self.other_rows], bs, prefix_cache=settings.prefix_cache
        )
        self.kept = (
            PromptSet(tokenizer, [prompts.harmful[i] for i in self.kept_rows], bs, prefix_cache=settings.prefix_cache)
            if self.kept_rows
            else None
        )
        self.harmless = PromptSet(tokenizer, prompts.harmless, bs, prefix_cache=settings.prefix_cache)
        self.base_logprobs = LogprobFile()  # in the order iter_first_token_logprobs yields, every call
        for _, lp in self.harmless.iter_first_token_logprobs(model):
            self.base_logprobs.append(lp)
        self.stats = DecodeStats()

    def kl(self) -> float:
        """First-token KL divergence from the base model on the harmless prompts (cheap: no generation),
        one chunk at a time against the base log-probs on disk: the same float64 rows as
        `kl_divergence` of the whole tables."""
        rows = torch.empty(len(self.harmless), dtype=torch.float64)  # [n] KL per prompt
        for k, (idx, lp) in enumerate(self.harmless.iter_first_token_logprobs(self.model, self.stats)):
            rows[idx] = kl_rows(self.base_logprobs.read(k), lp)
        return float(rows.mean())

    def refusals(self, kl: float) -> Scores:
        """Generate answers to the harmful prompts and count refusals: keyword ones, or with the
        classifier every answer it does not call compliance (answers then run to the budget:
        a marker alone does not decide the classifier's verdict). Kept categories' answers run to
        optimize.kept_max_new_tokens and count strict refusals only."""
        use_classifier = self.settings.refusal_measure == "classifier"
        n = len(self.prompts.harmful)
        responses = [""] * n
        if self.other_rows:
            answers, _ = self.harmful.generate(
                self.model,
                self.settings.max_new_tokens,
                decided=None if use_classifier else self.detector,
                stats=self.stats,
                progress=self.progress,
            )
            for i, a in zip(self.other_rows, answers, strict=True):
                responses[i] = a
        if self.kept is not None:
            # stop once the rule's verdict cannot change (compliance or hedged); with the classifier, never
            answers, _ = self.kept.generate(
                self.model,
                self.settings.kept_max_new_tokens,
                decided=None if use_classifier else self.rule.decided,
                stats=self.stats,
                progress=self.progress,
            )
            for i, a in zip(self.kept_rows, answers, strict=True):
                responses[i] = a
        keyword = [self.detector(r) for r in responses]
        stances = [""] * n
        for i in self.kept_rows:
            stances[i] = self.rule(responses[i])
        labels: list[str] = []
        if use_classifier:
            labels = self.classifier(self.prompts.harmful_requests, responses).labels
            flags = [lab != "compliance" for lab in labels]
            kept_labels = combine([labels[i] for i in self.kept_rows], [stances[i] for i in self.kept_rows])
            for i, lab in zip(self.kept_rows, kept_labels, strict=True):
                flags[i] = lab == "refusal"
        else:
            flags = list(keyword)
            for i in self.kept_rows:
                flags[i] = stances[i] == "refusal"
        by_cat: dict[str, int] = {}
        n_cat: dict[str, int] = {}
        for flag, cat in zip(flags, self.prompts.harmful_categories, strict=True):
            by_cat[cat] = by_cat.get(cat, 0) + int(flag)
            n_cat[cat] = n_cat.get(cat, 0) + 1
        return Scores(
            sum(flags), kl, by_cat, n_cat, responses, self.stats.total, sum(keyword), labels, stances, list(flags)
        )

    def score(self) -> Scores:
        """Score the model as it is now (call inside `ablated(...)` for a trial)."""
        self.stats = DecodeStats()
        return self.refusals(self.kl())
