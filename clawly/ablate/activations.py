"""Reading the residual stream at the probe position of every prompt, for every layer.

Probe points P = layers + 1: point 0 is the input of decoder layer 0 (the embedding output, after
any embedding scale), point l + 1 the raw output of decoder layer l. These are transformers'
`hidden_states` except the last: transformers puts the final norm's output there, a different
space from the other points, so the points are read with hooks on the layers instead.

Activations (probe-activations -> compute-directions).

`artifacts/activations/{harmful,harmless}.parquet`: one row per prompt and probe point, columns id,
category, layer (the probe point, int16) and residual (fixed-size list of float32, the hidden
size), streamed batch by batch. `means.safetensors`: the float32 mean residual per set and
category (`harmful_mean.<category>`, `harmless_mean.<category>`, each `[P, d]`), with the prompt
counts and the probe settings in its metadata.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from clawly.errors import ClawlyError, reading
from clawly.io import write_safetensors
from clawly.measure.templating import length_sorted_batches
from clawly.model.architecture import decoder_layers


class ProbeError(ClawlyError, ValueError):
    """The probe position cannot be found (e.g. a marker absent from a templated prompt)."""


def generation_marker(tokenizer: PreTrainedTokenizerBase, system_prompt: str | None, strip_newline: bool) -> str:
    """The text the chat template appends to open the assistant's turn (e.g. '<|im_start|>assistant')."""
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": "PROBE"}
    ]
    closed = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    opened = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if not opened.startswith(closed) or opened == closed:
        raise ProbeError("cannot extract a probe marker from this chat template; set probe.marker explicitly")
    marker = opened[len(closed) :]
    if strip_newline:
        marker = marker.rstrip("\n")
    if not marker.strip():
        raise ProbeError("the chat template's generation prompt is blank; set probe.marker explicitly")
    return marker


def instruction_suffix(tokenizer: PreTrainedTokenizerBase, system_prompt: str | None) -> list[int]:
    """Token ids the chat template puts after the user's instruction, up to the answer (e.g.
    '<|im_end|>\\n<|im_start|>assistant\\n'): probe.position=instruction reads the token before them,
    the instruction's last token (where Zhao et al. 2025 find harmfulness, distinct from refusal)."""
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": "PROBE"}
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    suffix = text[text.rindex("PROBE") + len("PROBE") :]
    ids = tokenizer(suffix, add_special_tokens=False).input_ids
    if not ids:
        raise ProbeError("the chat template puts nothing after the instruction; use probe.position=last")
    return ids


def _last_occurrence(row: list[int], pattern: list[int]) -> int:
    """Index of the last token of the last occurrence of `pattern` in `row`, or -1."""
    n = len(pattern)
    for end in range(len(row), n - 1, -1):
        if row[end - n : end] == pattern:
            return end - 1
    return -1


def probe_positions(
    tokenizer: PreTrainedTokenizerBase, input_ids: torch.Tensor, marker: str | None, suffix: list[int] | None = None
) -> torch.Tensor:
    """Position per row `[batch]`: the last token (inputs are left-padded), the marker's last
    token, or with `suffix` (`instruction_suffix`) the token before it: the instruction's last."""
    batch, length = input_ids.shape
    if suffix is not None:
        n = len(suffix)
        for row in input_ids.tolist():
            if row[length - n :] != suffix:
                raise ProbeError(
                    "a templated prompt does not end with the chat template's post-instruction tokens "
                    "(the tokenizer merges them with the text); use probe.position=last or marker"
                )
        return torch.full((batch,), length - 1 - n, dtype=torch.long)
    if marker is None:
        return torch.full((batch,), length - 1, dtype=torch.long)
    pattern = tokenizer(marker, add_special_tokens=False).input_ids
    positions = []
    for row in input_ids.tolist():
        pos = _last_occurrence(row, pattern)
        if pos < 0:
            raise ProbeError(f"probe marker {marker!r} not found in a templated prompt; check probe.marker")
        positions.append(pos)
    return torch.tensor(positions, dtype=torch.long)


@contextlib.contextmanager
def capture_residuals(model: PreTrainedModel, positions: torch.Tensor) -> Iterator[list[torch.Tensor]]:
    """Record the residual stream of every probe point at `positions` (one per row, `[batch]`)
    during the forward passes inside the block. Yields the list the points are appended to in
    order, `[batch, d]` float32 on CPU each: the input of decoder layer 0, then each layer's output."""
    layers = decoder_layers(model)
    captured: list[torch.Tensor] = []

    def take(hidden: torch.Tensor) -> None:
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        # float32 on CPU per point: the layers of a device_map may sit on different GPUs, in half precision
        captured.append(hidden[rows, positions.to(hidden.device)].detach().to("cpu", torch.float32))

    def layer_input(module, args, kwargs) -> None:
        take(args[0] if args else kwargs["hidden_states"])

    def layer_output(module, args, output) -> None:
        take(output[0] if isinstance(output, tuple) else output)

    handles = [
        layers[0].register_forward_pre_hook(layer_input, with_kwargs=True),
        *(layer.register_forward_hook(layer_output) for layer in layers),
    ]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def probe_residuals(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    batch_size: int,
    marker: str | None = None,
    progress: Callable | None = None,
    suffix: list[int] | None = None,
) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Yield (prompt indices, residuals `[b, P, d]` float32) batch by batch, batches sorted by length."""
    bar = progress(total=len(prompts), desc="probe", unit="prompt") if progress else None
    for idx in length_sorted_batches(tokenizer, prompts, batch_size):
        enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
        pos = probe_positions(tokenizer, enc["input_ids"], marker, suffix)
        enc = {k: v.to(model.device) for k, v in enc.items()}
        with capture_residuals(model, pos) as points:
            model(**enc, use_cache=False, logits_to_keep=1)
        yield idx, torch.stack(points, dim=1)  # [b, P, d]
        if bar is not None:
            bar.update(len(idx))
    if bar is not None:
        bar.close()


class RunningMean:
    """Streaming (Welford) mean of equally-shaped tensors, in float64; memory does not grow with n."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: torch.Tensor | None = None

    def update(self, batch: torch.Tensor) -> None:
        """Add a batch `[n, ...]` of samples."""
        batch = batch.detach().to("cpu", torch.float64)
        n = batch.shape[0]
        if n == 0:
            return
        batch_mean = batch.mean(dim=0)
        if self.mean is None:
            self.mean, self.count = batch_mean, n
            return
        total = self.count + n
        self.mean += (batch_mean - self.mean) * (n / total)
        self.count = total

    def merged(self, other: RunningMean) -> RunningMean:
        """The mean over both sample sets (Chan et al.'s pairwise update)."""
        out = RunningMean()
        if self.mean is None or other.mean is None:
            src = self if other.mean is None else other
            out.count, out.mean = src.count, None if src.mean is None else src.mean.clone()
            return out
        out.count = self.count + other.count
        out.mean = self.mean + (other.mean - self.mean) * (other.count / out.count)
        return out


# ------------------------------------------------------------------ the activation files


def activation_schema(hidden: int) -> pa.Schema:
    return pa.schema(
        [
            ("id", pa.string()),
            ("category", pa.string()),
            ("layer", pa.int16()),
            ("residual", pa.list_(pa.float32(), hidden)),
        ]
    )


class ActivationWriter:
    """Streams rows (one per prompt x probe point) into a Parquet file."""

    def __init__(self, path: str | Path, hidden: int):
        self.schema = activation_schema(hidden)
        self.writer = pq.ParquetWriter(str(path), self.schema, compression="zstd")

    def write(self, ids: Sequence[str], categories: Sequence[str], residuals: torch.Tensor) -> None:
        """residuals: `[b, P, d]`."""
        b, p, d = residuals.shape
        flat = pa.array(residuals.reshape(-1).numpy(), type=pa.float32())
        table = pa.table(
            {
                "id": pa.array([i for i in ids for _ in range(p)], pa.string()),
                "category": pa.array([c for c in categories for _ in range(p)], pa.string()),
                "layer": pa.array(list(range(p)) * b, pa.int16()),
                "residual": pa.FixedSizeListArray.from_arrays(flat, d),
            },
            schema=self.schema,
        )
        self.writer.write_table(table)

    def close(self) -> None:
        self.writer.close()


def read_activations(path: str | Path) -> tuple[list[str], list[str], torch.Tensor]:
    """(ids, categories, residuals `[n, P, d]` float32) from an activations Parquet file."""
    with reading(path, "probe-activations"):
        table = pq.read_table(str(path))
        layer = table.column("layer").to_numpy()
        p = int(layer.max()) + 1
        d = table.schema.field("residual").type.list_size
        values = table.column("residual").combine_chunks().flatten().to_numpy()
        residuals = torch.from_numpy(values.reshape(-1, p, d).copy())
        ids = table.column("id").to_pylist()[::p]
        cats = table.column("category").to_pylist()[::p]
    return ids, cats, residuals


@dataclass
class ResidualMeans:
    """Mean residuals `[P, d]` by `<set>_mean.<category>`, their prompt counts, and metadata."""

    means: dict[str, torch.Tensor]
    counts: dict[str, int]
    meta: dict[str, str]


def write_means(path: Path, means: ResidualMeans) -> None:
    meta = {**means.meta, "counts": json.dumps(dict(sorted(means.counts.items())))}
    write_safetensors(path, {k: v.to(torch.float32) for k, v in sorted(means.means.items())}, meta)


def read_means(path: Path) -> ResidualMeans:
    with reading(path, "probe-activations"):
        with safe_open(str(path), "pt") as f:
            meta = dict(f.metadata())
        return ResidualMeans(load_file(str(path)), json.loads(meta.pop("counts")), meta)
