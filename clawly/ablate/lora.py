"""The weight change as a PEFT LoRA adapter: W' = W + B A (scaling 1), loadable by `peft`.

Low-rank changes (plain ablation, rank = number of ablated directions) are written exactly.
Dense changes (norm-preserving ablation) are compressed by truncated SVD: the rank keeps the
given share of squared singular values (energy), and the relative Frobenius error is reported.

What each writer becomes in the adapter (its `target_modules` or `target_parameters`):

- nn.Linear and GPT-2's Conv1D: a LoRA on the module (peft transposes Conv1D's change itself,
  ``fan_in_fan_out``). A bias change (OPT, GPT-NeoX, GPT-2) is lora_B's bias (peft's
  ``lora_bias``), which peft adds to the output and, on merge, to the base bias.
- A fused expert stack ``[E, ., .]``: a LoRA on the parameter (peft's ``target_parameters``). peft
  keeps one rank-r pair per expert (lora_A ``[E r, d_in]``, lora_B ``[d, r E]``) and merges
  B_e A_e into expert e, in the layout the experts module declares (``is_transposed``), so the
  per-expert change is held exactly. A per-expert bias change ``[E, d]`` is rank <= r too, and is
  a LoRA on the bias parameter (``<weight>_bias``, as a 2-D parameter).

peft cannot hold everything: its parameter LoRA refuses ``lora_bias``, so a model with fused
experts and a biased attention writer (gpt-oss) gets `AdapterUnsupportedError`; the merged model
holds such changes exactly.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from clawly.ablate.ablation import WeightDelta
from clawly.errors import ClawlyError
from clawly.model.architecture import BIAS_SUFFIX


class AdapterUnsupportedError(ClawlyError, ValueError):
    """peft cannot hold this change as a LoRA adapter; the merged model can."""


@dataclass
class LoraFactors:
    """One adapter target's factors. On a module: B `[d_out, r]`, A `[r, d_in]` and a bias change
    `[d_out]`. On a parameter (`on_parameter`): a fused stack's B `[d, r]` (shared by its experts) or
    `[E, d, r]` and A `[E, r, d_in]`, or a 2-D parameter's (an expert bias `[E, d]`) B `[E, r]`, A `[r, d]`."""

    b: torch.Tensor
    a: torch.Tensor
    relative_error: float  # ||B A - delta||_F / ||delta||_F (0 for exact low-rank changes)
    bias: torch.Tensor | None = None  # [d_out] the bias change of a module, exact
    on_parameter: bool = False  # a LoRA on the parameter named by its key (peft's target_parameters)
    transposed: bool = False  # the parameter stores the matrix input-first

    @property
    def rank(self) -> int:
        return self.b.shape[-1]

    @property
    def experts(self) -> int | None:
        return self.a.shape[0] if self.a.dim() == 3 else None


def svd_compress(delta: torch.Tensor, energy: float, max_rank: int) -> LoraFactors:
    """Smallest rank r <= max_rank whose singular values keep `energy` of sum(s^2) of every matrix:
    `delta` `[d, d_in]`, or `[E, d, d_in]` (one rank for all experts, as peft needs)."""
    u, s, vh = torch.linalg.svd(delta.to(torch.float64), full_matrices=False)
    power = s**2
    total = power.sum()
    if total == 0:
        return LoraFactors(
            torch.zeros(*delta.shape[:-1], 1, dtype=torch.float64),
            torch.zeros(*delta.shape[:-2], 1, delta.shape[-1], dtype=torch.float64),
            0.0,
        )
    own = power.sum(-1, keepdim=True)  # each matrix's total
    kept = torch.cumsum(power, -1) / own.clamp_min(torch.finfo(torch.float64).tiny)
    needed = torch.searchsorted(kept, torch.full_like(own, energy) - 1e-12) + 1
    needed = torch.where(own > 0, needed, torch.ones_like(needed))  # an unchanged expert needs nothing
    rank = max(1, min(int(needed.max()), max_rank, s.shape[-1]))
    b = u[..., :rank] * s[..., None, :rank]
    a = vh[..., :rank, :]
    error = float((power[..., rank:].sum() / total).sqrt())
    return LoraFactors(b, a, error)


def lora_factors(deltas: dict[str, WeightDelta], energy: float = 0.99, max_rank: int = 64) -> dict[str, LoraFactors]:
    """The adapter's factors by peft target: exact for low-rank deltas, SVD-compressed for dense ones.
    A fused expert stack's delta (3-D) is a parameter target, and its bias change a second one."""
    out = {}
    for name, delta in deltas.items():
        fused = (delta.dense if delta.dense is not None else delta.a).dim() == 3
        if delta.dense is None:
            f = LoraFactors(delta.b.to(torch.float64), delta.a.to(torch.float64), 0.0)
        else:
            f = svd_compress(delta.dense, energy, max_rank)
        f.on_parameter, f.transposed = fused, delta.transposed
        out[name] = f
        if not fused:
            f.bias = delta.bias
        elif delta.bias is not None:  # [E, d], rank <= k: exact at full energy
            bias = svd_compress(delta.bias, 1.0, min(delta.bias.shape))
            bias.on_parameter = True
            out[name + BIAS_SUFFIX] = bias
    return out


def expert_lora_weights(f: LoraFactors) -> tuple[torch.Tensor, torch.Tensor]:
    """peft's lora_A `[E r, d_in]` and lora_B `[d, r E]` of a fused stack's factors: expert e's A is
    rows e r .. e r + r - 1, its B the columns j E + e (peft's ParamWrapper reshapes them so)."""
    e, r = f.a.shape[0], f.rank
    b = f.b if f.b.dim() == 3 else f.b.expand(e, *f.b.shape)  # [E, d, r]
    return f.a.reshape(e * r, f.a.shape[-1]), b.permute(1, 2, 0).reshape(b.shape[1], r * e)


def _param_wrapper(model: nn.Module, name: str) -> nn.Module:
    """peft's ParamWrapper of the parameter `name` (several on one module are nested)."""
    owner, _, attr = name.rpartition(".")
    module = model.get_submodule(owner)
    while getattr(module, "parameter_name", None) != attr:
        module = module.base_layer
    return module


def adapter_problem(model: nn.Module, factors: dict[str, LoraFactors]) -> str | None:
    """Why peft cannot hold these factors as one adapter, or None: biased and unbiased writers mixed
    (lora_bias is all or none), a bias change beside LoRA on parameters (fused experts), or a stack
    whose class tells peft another layout than its weights have."""
    modules = {n: f for n, f in factors.items() if not f.on_parameter}
    if len({f.bias is not None for f in modules.values()}) > 1:
        return (
            "some residual writers have a bias and some do not: peft's lora_bias is all or none, so this "
            "adapter cannot be written; the merged model holds the exact change"
        )
    if len(modules) == len(factors):
        return None
    biased = sorted(n for n, f in factors.items() if f.bias is not None)
    if biased:
        return (
            f"a LoRA adapter cannot hold this change: the fused experts need peft's LoRA on parameters "
            f"(target_parameters), which does not work with lora_bias, and the bias change of {biased[0]} needs "
            "lora_bias. The merged model holds the exact change: save the model instead of the adapter"
        )
    for name, f in factors.items():
        if f.experts is None:
            continue
        owner = model.get_submodule(name.rpartition(".")[0])
        declared = bool(getattr(owner, "is_transposed", False))  # what peft's ParamWrapper reads
        if declared != f.transposed:
            return (
                f"a LoRA adapter cannot hold the change of {name}: it is stored "
                f"{'input-first [E, d_in, d]' if f.transposed else 'output-first [E, d, d_in]'}, but "
                f"{type(owner).__name__}.is_transposed={declared} tells peft otherwise. The merged model holds "
                "the exact change: save the model instead of the adapter"
            )
    return None


def save_adapter(
    model: nn.Module, factors: dict[str, LoraFactors], out_dir: str | Path, base_model_name_or_path: str | None = None
) -> None:
    """Write adapter_config.json + adapter_model.safetensors for `factors` on `model`.

    LoRA layers are injected into `model` to save with peft, and removed again afterwards.
    Raises `AdapterUnsupportedError` when peft cannot hold the change.
    """
    if not factors:
        raise ClawlyError(
            "the chosen trial changes no weights: nothing to export (pick a trial with a non-zero kernel)"
        )
    problem = adapter_problem(model, factors)
    if problem:
        raise AdapterUnsupportedError(problem)
    modules = {n: f for n, f in factors.items() if not f.on_parameter}
    parameters = {n: f for n, f in factors.items() if f.on_parameter}
    ranks = {name: f.rank for name, f in factors.items()}
    r = max(set(ranks.values()), key=list(ranks.values()).count)
    pattern = {re.escape(n): k for n, k in ranks.items() if k != r}
    biased = {f.bias is not None for f in modules.values()}
    conv1d = {type(model.get_submodule(n)).__name__ == "Conv1D" for n in modules}
    config = LoraConfig(
        r=r,
        lora_alpha=r,
        target_modules=sorted(modules),
        target_parameters=sorted(parameters) or None,
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
        lora_dropout=0.0,
        bias="none",
        lora_bias=biased == {True},
        fan_in_fan_out=conv1d == {True},
    )  # GPT-2's Conv1D stores [in, out]
    with warnings.catch_warnings():  # peft 0.21 reads transformers 5's deprecated is_gradient_checkpointing
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = get_peft_model(model, config)
    base = peft_model.base_model.model
    with torch.no_grad():
        for name, f in factors.items():
            module = _param_wrapper(base, name) if f.on_parameter else base.get_submodule(name)
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
            want_a, want_b = expert_lora_weights(f) if f.experts is not None else (f.a, f.b)
            if tuple(a.shape) != tuple(want_a.shape) or tuple(b.shape) != tuple(want_b.shape):
                raise RuntimeError(
                    f"LoRA shape mismatch at {name}: A {tuple(a.shape)} vs {tuple(want_a.shape)}, "
                    f"B {tuple(b.shape)} vs {tuple(want_b.shape)}"
                )
            a.copy_(want_a.to(a.dtype))
            b.copy_(want_b.to(b.dtype))
            if f.bias is not None:
                module.lora_B["default"].bias.copy_(f.bias.to(b.dtype))
    if base_model_name_or_path is not None:
        peft_model.peft_config["default"].base_model_name_or_path = base_model_name_or_path
    with warnings.catch_warnings():  # peft takes a 1-D lora_B.bias for an unsharded tensor; shapes are checked above
        warnings.filterwarnings("ignore", message=".*LoRA tensor\\(s\\) have invalid shape.*")
        peft_model.save_pretrained(str(out_dir))
    peft_model.unload()  # the LoRA layers come out again: `model` is as it was
