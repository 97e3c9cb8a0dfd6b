"""The weight change as a PEFT LoRA adapter: W' = W + B A (scaling 1), loadable by `peft`.

Low-rank changes (plain ablation, rank = number of ablated directions) are written exactly.
Dense changes (norm-preserving ablation) are compressed by truncated SVD: the rank keeps the
given share of squared singular values (energy), and the relative Frobenius error is reported.
A bias change (writers with a bias: OPT, GPT-NeoX) is lora_B's bias (peft's `lora_bias`), which
peft adds to the output and, on merge, to the base bias.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from clawly.ablation import WeightDelta


@dataclass
class LoraFactors:
    b: torch.Tensor  # [d_out, r]
    a: torch.Tensor  # [r, d_in]
    relative_error: float  # ||B A - delta||_F / ||delta||_F (0 for exact low-rank changes)
    bias: torch.Tensor | None = None  # [d_out] the bias change, exact

    @property
    def rank(self) -> int:
        return self.b.shape[1]


def svd_compress(delta: torch.Tensor, energy: float, max_rank: int) -> LoraFactors:
    """Smallest rank r <= max_rank whose singular values keep `energy` of sum(s^2)."""
    u, s, vh = torch.linalg.svd(delta.to(torch.float64), full_matrices=False)
    total = (s**2).sum()
    if total == 0:
        return LoraFactors(torch.zeros(delta.shape[0], 1, dtype=torch.float64),
                           torch.zeros(1, delta.shape[1], dtype=torch.float64), 0.0)
    kept = torch.cumsum(s**2, 0) / total
    rank = int(torch.searchsorted(kept, torch.tensor(energy, dtype=kept.dtype) - 1e-12).item()) + 1
    rank = max(1, min(rank, max_rank, s.numel()))
    b = u[:, :rank] * s[:rank]
    a = vh[:rank]
    error = float(((s[rank:] ** 2).sum() / total).sqrt())
    return LoraFactors(b, a, error)


def lora_factors(deltas: dict[str, WeightDelta], energy: float = 0.99, max_rank: int = 64) -> dict[str, LoraFactors]:
    """Exact factors for low-rank deltas; SVD-compressed ones for dense deltas."""
    out = {}
    for name, delta in deltas.items():
        if delta.dense is None:
            out[name] = LoraFactors(delta.b.to(torch.float64), delta.a.to(torch.float64), 0.0)
        else:
            out[name] = svd_compress(delta.dense, energy, max_rank)
        out[name].bias = delta.bias
    return out


def save_adapter(model: nn.Module, factors: dict[str, LoraFactors], out_dir: str | Path,
                 base_model_name_or_path: str | None = None) -> None:
    """Write adapter_config.json + adapter_model.safetensors for `factors` on `model`.

    LoRA layers are injected into `model` to save with peft, and removed again afterwards.
    """
    if not factors:
        raise ValueError("the chosen trial changes no weights: nothing to export")
    ranks = {name: f.rank for name, f in factors.items()}
    r = max(set(ranks.values()), key=list(ranks.values()).count)
    pattern = {re.escape(n): k for n, k in ranks.items() if k != r}
    biased = {f.bias is not None for f in factors.values()}
    if len(biased) > 1:
        raise ValueError("some residual writers have a bias and some do not: peft's lora_bias is all or none, "
                         "so this adapter cannot be written")
    config = LoraConfig(r=r, lora_alpha=r, target_modules=sorted(factors), rank_pattern=pattern,
                        alpha_pattern=dict(pattern), lora_dropout=0.0, bias="none", lora_bias=biased == {True})
    with warnings.catch_warnings():  # peft 0.21 reads transformers 5's deprecated is_gradient_checkpointing
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = get_peft_model(model, config)
    base = peft_model.base_model.model
    with torch.no_grad():
        for name, f in factors.items():
            module = base.get_submodule(name)
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
            if tuple(a.shape) != tuple(f.a.shape) or tuple(b.shape) != tuple(f.b.shape):
                raise RuntimeError(f"LoRA shape mismatch at {name}: {tuple(a.shape)} vs {tuple(f.a.shape)}")
            a.copy_(f.a.to(a.dtype))
            b.copy_(f.b.to(b.dtype))
            if f.bias is not None:
                module.lora_B["default"].bias.copy_(f.bias.to(b.dtype))
    if base_model_name_or_path is not None:
        peft_model.peft_config["default"].base_model_name_or_path = base_model_name_or_path
    with warnings.catch_warnings():  # peft takes a 1-D lora_B.bias for an unsharded tensor; shapes are checked above
        warnings.filterwarnings("ignore", message=".*LoRA tensor\\(s\\) have invalid shape.*")
        peft_model.save_pretrained(str(out_dir))
    peft_model.unload()  # the LoRA layers come out again: `model` is as it was
