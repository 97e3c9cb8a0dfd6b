"""Saving weights as safetensors shards with a `model.safetensors.index.json`, the HF layout."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from clawly.settings import parse_size

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


def source_weight_map(model_dir: str | Path) -> dict[str, str] | None:
    """Tensor name -> shard file of a sharded source checkpoint, or None when it is not sharded."""
    index = Path(model_dir) / INDEX_NAME
    if not index.is_file():
        return None
    return dict(json.loads(index.read_text())["weight_map"])


def dedupe_shared(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop tensors that share storage with an earlier one (tied embeddings); safetensors refuses them."""
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    out = {}
    for name, t in state_dict.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:
            continue
        seen.add(key)
        out[name] = t
    return out


def plan_shards(
    state_dict: dict[str, torch.Tensor], max_shard_bytes: int, weight_map: dict[str, str] | None = None
) -> dict[str, list[str]]:
    """Shard file -> tensor names. With `weight_map` (a sharded source), tensors keep their shard;
    names the source did not have go to the last shard, unless they would overfill it (transformers 5
    fuses a MoE checkpoint's per-expert tensors on loading, so the source names none of the experts):
    then, as without a source, fill shards in order."""
    unknown = sum(t.numel() * t.element_size() for n, t in state_dict.items() if n not in (weight_map or {}))
    if weight_map and unknown <= max_shard_bytes:
        files = sorted(set(weight_map.values()))
        shards: dict[str, list[str]] = {f: [] for f in files}
        for name in state_dict:
            shards[weight_map.get(name, files[-1])].append(name)
        return {f: names for f, names in shards.items() if names}
    groups: list[list[str]] = [[]]
    size = 0
    for name, t in state_dict.items():
        nbytes = t.numel() * t.element_size()
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    if len(groups) == 1:
        return {WEIGHTS_NAME: groups[0]}
    n = len(groups)
    return {f"model-{i + 1:05d}-of-{n:05d}.safetensors": g for i, g in enumerate(groups)}


def save_sharded(
    state_dict: dict[str, torch.Tensor],
    out_dir: str | Path,
    max_shard_size: str | int = "2GB",
    weight_map: dict[str, str] | None = None,
    metadata: dict[str, str] | None = None,
) -> list[str]:
    """Write safetensors shards (and the index when there is more than one file). Returns file names."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state_dict = {k: v.detach().contiguous().cpu() for k, v in dedupe_shared(state_dict).items()}
    shards = plan_shards(state_dict, parse_size(max_shard_size), weight_map)
    meta = {"format": "pt", **(metadata or {})}
    for file, names in shards.items():
        # save_file streams to disk (a shard can be gigabytes); one metadata key keeps its bytes stable
        save_file({n: state_dict[n] for n in names}, str(out_dir / file), metadata=meta)
    if len(shards) > 1 or weight_map:
        total = sum(t.numel() * t.element_size() for t in state_dict.values())
        index = {
            "metadata": {"total_size": total},
            "weight_map": {n: f for f, names in shards.items() for n in sorted(names)},
        }
        (out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return sorted(shards)
