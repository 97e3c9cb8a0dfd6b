"""Fast greedy decoding for scoring trials: shared-prefix KV cache, early stop, batch compaction.

On a CPU, a trial's cost is the number of token positions pushed through the model. Templated
prompts share a long prefix (``<|im_start|>system ... <|im_start|>user\\n``: a third of the
tokens for short requests), so the prefix's keys and values are computed once per model state
and shared by every row. Each row then stops as soon as its verdict is decided (a refusal marker
appeared, the end-of-turn token came, or the token budget ran out) and leaves the batch, so
finished rows cost nothing. ``tests/test_decoding.py`` checks every shortcut against
``transformers``' own ``generate`` and plain forward passes.

Layout of a batch: ``[prefix | left padding | suffix]``. The attention mask hides the padding and
positions continue the prefix, so each row sees exactly the tokens of its unpadded prompt.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import platform
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import DynamicLayer

from clawly.io import write_json

THINK_TAGS = {"<think>": "</think>", "<thinking>": "</thinking>"}


def common_prefix_length(rows: Sequence[Sequence[int]]) -> int:
    """Length of the longest token prefix shared by every row."""
    if not rows:
        return 0
    n = min(len(r) for r in rows)
    first = rows[0]
    for i in range(n):
        t = first[i]
        if any(r[i] != t for r in rows):
            return i
    return n


@dataclass
class DecodeStats:
    """Token positions pushed through the model (the cost on a CPU) in one call."""

    prefix_tokens: int = 0
    prompt_tokens: int = 0
    padding_tokens: int = 0
    generated_tokens: int = 0

    @property
    def total(self) -> int:
        return self.prefix_tokens + self.prompt_tokens + self.padding_tokens + self.generated_tokens


class PromptSet:
    """Templated prompts tokenized once, split into a shared prefix and per-prompt suffixes, and
    grouped into length-sorted batches. Reused for every trial (only the weights change)."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompts: Sequence[str],
        batch_size: int,
        prefix_cache: bool = True,
        sort_by_length: bool = True,
        prefill_chunk: int = 32,
    ):
        if not prompts:
            raise ValueError("no prompts to score")
        self.tokenizer = tokenizer
        ids = [tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
        # Keep at least one suffix token per prompt: its logits are the first answer token's.
        p = min(common_prefix_length(ids), min(len(r) for r in ids) - 1) if prefix_cache else 0
        self.prefix: list[int] = ids[0][:p]
        self.suffixes: list[list[int]] = [r[p:] for r in ids]
        order = list(range(len(ids)))
        if sort_by_length:
            order.sort(key=lambda i: len(self.suffixes[i]))
        self.batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        self.prefill_chunk = max(1, prefill_chunk) if sort_by_length else batch_size
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def __len__(self) -> int:
        return len(self.suffixes)

    def _prefix_cache(self, model: PreTrainedModel, stats: DecodeStats):
        if not self.prefix:
            return None
        ids = torch.tensor([self.prefix], device=model.device)
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        stats.prefix_tokens += len(self.prefix)
        return out.cache

    def _prefill_rows(self, model: PreTrainedModel, idx: list[int], prefix_cache, stats: DecodeStats):
        """One forward over `idx`'s suffixes (left-padded to the longest) on top of the prefix."""
        rows = [self.suffixes[i] for i in idx]
        width = max(len(r) for r in rows)
        p, b, dev = len(self.prefix), len(rows), model.device
        ids = torch.full((b, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((b, p + width), dtype=torch.long)
        mask[:, :p] = 1
        pos = torch.full((b, width), p, dtype=torch.long)
        for j, r in enumerate(rows):
            n = len(r)
            ids[j, width - n :] = torch.tensor(r)
            mask[j, p + width - n :] = 1
            pos[j, width - n :] = torch.arange(p, p + n)
            stats.prompt_tokens += n
            stats.padding_tokens += width - n
        cache = None
        if prefix_cache is not None:
            cache = copy.deepcopy(prefix_cache)
            cache.batch_repeat_interleave(b)
        out = model(
            input_ids=ids.to(dev),
            attention_mask=mask.to(dev),
            position_ids=pos.to(dev),
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1, :].float(), out.cache, mask.to(dev), pos[:, -1].to(dev)

    def _prefill(self, model: PreTrainedModel, idx: list[int], prefix_cache, stats: DecodeStats):
        """Prefill a decode batch in chunks of similar length (little padding), then join the
        chunks' caches into one batch, padding each after the prefix with masked zeros."""
        chunks = [idx[i : i + self.prefill_chunk] for i in range(0, len(idx), self.prefill_chunk)]
        if len(chunks) == 1:
            return self._prefill_rows(model, idx, prefix_cache, stats)
        parts = [self._prefill_rows(model, c, prefix_cache, stats) for c in chunks]
        caches = [c for _, c, _, _ in parts]
        if not all(_joinable(c) for c in caches):
            return self._prefill_rows(model, idx, prefix_cache, stats)
        p = len(self.prefix)
        width = max(m.shape[1] for _, _, m, _ in parts)

        def widen(t: torch.Tensor, dim: int) -> torch.Tensor:  # insert zeros after the prefix
            gap = width - t.shape[dim]
            if gap == 0:
                return t
            shape = list(t.shape)
            shape[dim] = gap
            head, tail = t.narrow(dim, 0, p), t.narrow(dim, p, t.shape[dim] - p)
            return torch.cat([head, t.new_zeros(shape), tail], dim)

        joined = caches[0]
        for li, layer in enumerate(joined.layers):
            layer.keys = torch.cat([widen(c.layers[li].keys, 2) for c in caches])
            layer.values = torch.cat([widen(c.layers[li].values, 2) for c in caches])
        return (
            torch.cat([lg for lg, _, _, _ in parts]),
            joined,
            torch.cat([widen(m, 1) for _, _, m, _ in parts]),
            torch.cat([q for _, _, _, q in parts]),
        )

    @torch.no_grad()
    def iter_first_token_logprobs(
        self, model: PreTrainedModel, stats: DecodeStats | None = None
    ) -> Iterator[tuple[list[int], torch.Tensor]]:
        """(prompt indices, log-probs of their first answer token `[b, vocab]` float32) chunk by chunk,
        always in the same order: memory holds one chunk whatever the prompt count."""
        stats = stats if stats is not None else DecodeStats()
        prefix_cache = self._prefix_cache(model, stats)
        for batch in self.batches:  # no decoding follows: chunks need not be joined
            for idx in (batch[i : i + self.prefill_chunk] for i in range(0, len(batch), self.prefill_chunk)):
                logits, *_ = self._prefill_rows(model, idx, prefix_cache, stats)
                yield idx, torch.log_softmax(logits, dim=-1).cpu()

    def first_token_logprobs(self, model: PreTrainedModel, stats: DecodeStats | None = None) -> torch.Tensor:
        """Log-probabilities of the first answer token, `[n, vocab]` float32, in input order."""
        out: torch.Tensor | None = None
        for idx, lp in self.iter_first_token_logprobs(model, stats):
            if out is None:
                out = lp.new_empty((len(self), lp.shape[-1]))
            out[idx] = lp
        return out  # type: ignore[return-value]

    @torch.no_grad()
    def generate(
        self,
        model: PreTrainedModel,
        max_new_tokens: int,
        decided: Callable[[str], bool] | None = None,
        stats: DecodeStats | None = None,
        compact: bool = True,
        progress: Callable | None = None,
        first_logprobs: bool = False,
    ) -> tuple[list[str], torch.Tensor | None]:
        """Greedy responses in input order, and with `first_logprobs` each prompt's first-token
        log-probs `[n, vocab]` (else None: they grow with the prompt count, a vocab row each).

        A row stops at the end-of-turn token, after `max_new_tokens`, or as soon as
        `decided(text_so_far)` is true; finished rows leave the batch (`compact`)."""
        stats = stats if stats is not None else DecodeStats()
        eos = _eos_ids(model, self.tokenizer)
        prefix_cache = self._prefix_cache(model, stats)
        texts: list[str] = [""] * len(self)
        first: torch.Tensor | None = None
        bar = progress(total=len(self), desc="generate", unit="prompt") if progress else None
        out = None
        for idx in self.batches:
            logits, cache, mask, pos = self._prefill(model, idx, prefix_cache, stats)
            if first_logprobs:
                if first is None:
                    first = torch.empty((len(self), logits.shape[-1]))
                first[idx] = torch.log_softmax(logits, dim=-1).cpu()
            active = list(idx)
            tokens: dict[int, list[int]] = {i: [] for i in idx}
            done = torch.zeros(len(idx), dtype=torch.bool)
            nxt = logits.argmax(-1)
            for step in range(max_new_tokens):
                keep = []
                for j, i in enumerate(active):
                    if done[j]:
                        continue
                    t = int(nxt[j])
                    if t in eos:
                        done[j] = True
                        continue
                    tokens[i].append(t)
                    if decided is not None and decided(self.tokenizer.decode(tokens[i], skip_special_tokens=True)):
                        done[j] = True
                        continue
                    keep.append(j)
                if not keep or step == max_new_tokens - 1:
                    break
                if compact and len(keep) < len(active):
                    sel = torch.tensor(keep, device=mask.device)
                    cache.batch_select_indices(sel)
                    mask, pos, nxt = mask[sel], pos[sel], nxt[sel]
                    active = [active[j] for j in keep]
                    done = torch.zeros(len(active), dtype=torch.bool)
                mask = torch.cat([mask, torch.ones((len(active), 1), dtype=mask.dtype, device=mask.device)], 1)
                pos = pos + 1
                out = model(
                    input_ids=nxt[:, None], attention_mask=mask, position_ids=pos[:, None], cache=cache, use_cache=True
                )
                cache = out.cache
                nxt = out.logits[:, -1, :].argmax(-1)
                stats.generated_tokens += len(active)  # finished rows ride along unless compacted
            for i in idx:
                texts[i] = self.tokenizer.decode(tokens[i], skip_special_tokens=True)
            cache = out = logits = None  # freed before the next batch's prefill: one batch's keys/values at a time
            if bar is not None:
                bar.update(len(idx))
        if bar is not None:
            bar.close()
        return texts, first


def _joinable(cache) -> bool:
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) is DynamicLayer and layer.is_initialized for layer in layers)


def _eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        e = getattr(source, "eos_token_id", None)
        if e is not None:
            ids.update([e] if isinstance(e, int) else e)
    return ids


# ---------------------------------------------------------------- response prefix


def detect_response_prefix(responses: Sequence[str]) -> str:
    """What every response starts with, to be put in the prompt so checks start where answers differ.

    A shared opening chain of thought (``<think>``) is closed empty instead, so the model answers
    straight away. Otherwise the common prefix is cut back to a whole word; '' when there is none."""
    if not responses:
        return ""
    common = os.path.commonprefix(list(responses))
    head = common.lstrip()
    for open_tag, close_tag in THINK_TAGS.items():
        if head.startswith(open_tag):
            return f"{open_tag}\n\n{close_tag}\n\n"
    if not common.strip():
        return ""
    if all(len(r) > len(common) for r in responses) and not common[-1].isspace():
        cut = max(common.rfind(" "), common.rfind("\n"))
        common = common[: cut + 1] if cut >= 0 else ""
    return common if common.strip() else ""


# ---------------------------------------------------------------- batch size


def machine_key(model: PreTrainedModel) -> str:
    """Identifies model x device x software for the batch-size cache."""
    dev = model.device
    hw = (
        torch.cuda.get_device_name(dev)
        if dev.type == "cuda"
        else f"{platform.processor() or platform.machine()}/{os.cpu_count()}cpu/{torch.get_num_threads()}threads"
    )
    cfg = model.config.to_dict()
    shape = {
        k: cfg.get(k)
        for k in (
            "model_type",
            "hidden_size",
            "num_hidden_layers",
            "intermediate_size",
            "vocab_size",
            "num_attention_heads",
            "num_key_value_heads",
        )
    }
    key = {"model": shape, "dtype": str(model.dtype), "device": hw, "torch": torch.__version__}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


@torch.no_grad()
def auto_batch_size(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    cache_file: Path | None = None,
    candidates: Sequence[int] = (8, 16, 32, 64, 128),
    steps: int = 3,
    log: Callable[[str], None] | None = None,
) -> int:
    """The batch size that decodes the most answer tokens per second, in seconds rather than minutes.

    Prefill costs the same per token at any batch size (prompts are prefilled in short chunks),
    so the choice is about decode steps: each candidate prefills a two-token suffix per row on
    the shared prefix and times `steps` greedy decode steps. A bigger size within 5% of the
    best wins (in a trial, finished answers leave the batch). Stops at the first size that runs
    out of memory or is clearly slower. Cached per model and machine."""
    key = machine_key(model)
    cached = _read_json(cache_file).get(key) if cache_file else None
    if cached:
        return int(cached["batch_size"])
    sample = list(prompts)
    best, best_rate, tried = candidates[0], 0.0, {}
    t_start = time.perf_counter()
    for b in candidates:
        ps = PromptSet(tokenizer, (sample * (b // max(len(sample), 1) + 1))[:b], b, prefill_chunk=b)
        ps.suffixes = [s[-2:] for s in ps.suffixes]  # decode cost is what is measured
        try:
            ps.generate(model, 2)  # warm-up at this shape
            t0 = time.perf_counter()
            ps.first_token_logprobs(model)
            t1 = time.perf_counter()
            ps.generate(model, 1 + steps)
            if model.device.type == "cuda":
                torch.cuda.synchronize()
            t2 = time.perf_counter()
            rate = b * steps / max((t2 - t1) - (t1 - t0), 1e-9)  # decoded rows per second
        except (RuntimeError, torch.cuda.OutOfMemoryError) as e:
            if not _is_oom(e):
                raise
            if model.device.type == "cuda":
                torch.cuda.empty_cache()
            break
        tried[b] = round(rate, 1)
        if rate >= 0.95 * best_rate:
            best, best_rate = b, max(rate, best_rate)
        elif rate < 0.9 * best_rate:
            break
    if log:
        log(f"batch size {best} in {time.perf_counter() - t_start:.0f} s (decoded tokens/s by batch size: {tried})")
    if cache_file:
        data = _read_json(cache_file)
        data[key] = {"batch_size": best, "decode_tokens_per_second": tried}
        write_json(cache_file, data)
    return best


def _read_json(path: Path | None) -> dict:
    try:
        return json.loads(Path(path).read_text()) if path else {}
    except (OSError, ValueError):
        return {}
