"""Directional ablation of weights: which layers, how strongly, and the weight change itself.

A writer matrix W `[d, d_in]` (attention output or MLP down projection) writes into the residual
stream. Ablating orthonormal directions q_c with strengths a_c removes them from its output:

    W' = W - sum_c a_c q_c q_c^T W          (rank <= number of directions)

`a = 1` removes the component exactly; the optimizer searches strengths per layer through a
kernel over layers. With `norm_preserve`, every column of W' (the vector one input feature
writes into the residual stream) is rescaled to its original norm afterwards.

Where an RMS norm with gain G = diag(g) sits between the writer and the residual stream (Gemma 2/3,
OLMo 2), what enters the stream is G W x / rms(W x). There the change is

    W' = W - sum_c a_c (G^-1 q_c) (G q_c)^T W,   so that   G W' = (I - sum_c a_c q_c q_c^T) G W

and the residual-stream write loses the q_c components exactly as without a norm (the rms rescales
each token's write as a whole). Still rank <= number of directions.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from clawly.architecture import ATTN_OUT, decoder_layers, layer_writers, writer_gains
from clawly.directions import AblationBasis


@dataclass(frozen=True)
class LayerKernel:
    """Ablation strength over layers: `peak_weight` at `peak_position`, falling linearly to
    `floor_weight` at distance `reach` (in layers) and zero beyond it."""

    peak_weight: float
    peak_position: float
    floor_weight: float
    reach: float


def ablation_kernel(num_layers: int, kernel: LayerKernel) -> torch.Tensor:
    """Strength per decoder layer, `[num_layers]` float64."""
    layers = torch.arange(num_layers, dtype=torch.float64)
    distance = (layers - kernel.peak_position).abs()
    if kernel.reach <= 0:  # the peak's own layer only (a floor is reached nowhere)
        return torch.where(distance == 0, torch.full_like(distance, kernel.peak_weight), torch.zeros_like(distance))
    weight = kernel.peak_weight + (kernel.floor_weight - kernel.peak_weight) * (distance / kernel.reach)
    return torch.where(distance <= kernel.reach, weight, torch.zeros_like(weight))


@dataclass
class AblationPlan:
    """Everything a trial changes. `direction_index` None means per-layer directions (the
    writers of layer l use the direction probed at the output of layer l, point l + 1);
    a float picks one direction for all layers, interpolated between probe points."""

    kernels: dict[str, LayerKernel]
    direction_index: float | None = None
    norm_preserve: bool = False
    category_weights: dict[str, float] = field(default_factory=dict)
    # categories.kernels=per_category: each targeted category's own kernels (category -> component
    # -> kernel), in the order of the basis (that of category_weights); `kernels` is then unused
    category_kernels: dict[str, dict[str, LayerKernel]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        out = {"kernels": {c: asdict(k) for c, k in self.kernels.items()},
               "direction_index": self.direction_index, "norm_preserve": self.norm_preserve,
               "category_weights": dict(self.category_weights)}
        if self.category_kernels:
            out["category_kernels"] = {cat: {c: asdict(k) for c, k in ks.items()}
                                       for cat, ks in self.category_kernels.items()}
        return out

    @classmethod
    def from_dict(cls, d: dict) -> AblationPlan:
        return cls(kernels={c: LayerKernel(**k) for c, k in d["kernels"].items()},
                   direction_index=d.get("direction_index"), norm_preserve=bool(d.get("norm_preserve", False)),
                   category_weights=dict(d.get("category_weights", {})),
                   category_kernels={cat: {c: LayerKernel(**k) for c, k in ks.items()}
                                     for cat, ks in d.get("category_kernels", {}).items()})

    def strengths_by_layer(self, num_layers: int, m: int) -> dict[str, torch.Tensor]:
        """Component -> ablation strength of each of the m directions per layer, `[num_layers, m]`:
        the shared kernel for every direction, or each category's own (directions in the order
        of category_weights)."""
        if not self.category_kernels:
            return {c: ablation_kernel(num_layers, k)[:, None].expand(num_layers, m)
                    for c, k in self.kernels.items()}
        names = list(self.category_weights)
        if len(names) != m or set(names) != set(self.category_kernels):
            raise ValueError(f"per-category kernels for {sorted(self.category_kernels)} but the basis has "
                             f"{m} direction(s) for {names}")
        components = sorted({c for ks in self.category_kernels.values() for c in ks})
        zero = torch.zeros(num_layers, dtype=torch.float64)
        return {c: torch.stack([ablation_kernel(num_layers, self.category_kernels[n][c])
                                if c in self.category_kernels[n] else zero for n in names], dim=1)
                for c in components}


@dataclass
class Writer:
    layer: int
    component: str
    name: str  # full module name, e.g. "model.layers.3.self_attn.o_proj"
    module: nn.Module
    gain: torch.Tensor | None = None  # [d] gain of an RMS norm between its output and the residual stream


def writers(model: nn.Module) -> list[Writer]:
    """Every module that writes into the residual stream, with its layer and component."""
    names = {id(m): n for n, m in model.named_modules()}
    out = []
    for i, (layer, found) in enumerate(zip(decoder_layers(model), layer_writers(model), strict=True)):
        gains = writer_gains(layer, found[ATTN_OUT].weight.shape[0])
        for component, module in found.items():
            out.append(Writer(i, component, names[id(module)], module, gains[component]))
    return out


def layer_directions(basis: AblationBasis, plan: AblationPlan, num_layers: int) -> torch.Tensor:
    """Orthonormal directions to ablate per decoder layer, `[num_layers, m, d]`: each layer's own
    probe point (its output, point l + 1), or one fractional probe index for all layers."""
    if plan.direction_index is None:
        return basis.directions[:, 1:num_layers + 1].transpose(0, 1)
    return basis.at_index(plan.direction_index).unsqueeze(0).expand(num_layers, -1, -1)


@dataclass
class WeightDelta:
    """A writer's weight change. Low rank as B @ A (B `[d, k]`, A `[k, d_in]`), or dense; and the
    change of its bias `[d]` when it has one (the bias is written into the residual stream too)."""

    b: torch.Tensor | None = None
    a: torch.Tensor | None = None
    dense: torch.Tensor | None = None
    bias: torch.Tensor | None = None

    def matrix(self) -> torch.Tensor:
        return self.dense if self.dense is not None else self.b @ self.a


def weight_deltas(model: nn.Module, basis: AblationBasis, plan: AblationPlan,
                  strengths: torch.Tensor | None = None) -> dict[str, WeightDelta]:
    """The weight change of every writer the plan touches, computed in float64.

    basis: the directions to ablate (m = 1 in global mode). strengths: optional `[m]` multipliers
    (category weights), default ones.
    """
    layers = writers(model)
    num_layers = len(decoder_layers(model))
    q = layer_directions(basis, plan, num_layers)  # [L, m, d]
    m = q.shape[1]
    s = torch.ones(m, dtype=torch.float64) if strengths is None else strengths.to(torch.float64)
    kernels = plan.strengths_by_layer(num_layers, m)
    deltas: dict[str, WeightDelta] = {}
    for wr in layers:
        if wr.component not in kernels:
            continue
        alpha = kernels[wr.component][wr.layer] * s  # [m]
        if not torch.any(alpha != 0):
            continue
        w = wr.module.weight.detach().to("cpu", torch.float64)
        qc = q[wr.layer]  # [m, d]
        keep = alpha != 0
        qc, alpha = qc[keep], alpha[keep]
        if wr.gain is None:
            b = -(qc * alpha[:, None]).t()  # [d, k]
            read = qc  # [k, d]
        else:  # G^-1 q and G q (a zero gain coordinate never reaches the residual stream)
            g = wr.gain.to(torch.float64)
            inverse = torch.where(g != 0, 1.0 / g, torch.zeros_like(g))
            b = -(qc * inverse * alpha[:, None]).t()
            read = qc * g
        a = read @ w  # [k, d_in]
        bias = wr.module.bias
        bias_change = None if bias is None else b @ (read @ bias.detach().to("cpu", torch.float64))
        if plan.norm_preserve:
            new = w + b @ a
            new = new * (w.norm(dim=0, keepdim=True) / new.norm(dim=0, keepdim=True).clamp_min(1e-12))
            deltas[wr.name] = WeightDelta(dense=new - w, bias=bias_change)
        else:
            deltas[wr.name] = WeightDelta(b=b, a=a, bias=bias_change)
    return deltas


@contextlib.contextmanager
def ablated(model: nn.Module, deltas: dict[str, WeightDelta]) -> Iterator[nn.Module]:
    """Apply weight changes in place; always restore the exact original weights on exit.

    Each change is added in its own precision and rounded once to the weight's dtype: a trial's
    float64 change, or an adapter's float32 B A exactly as `peft`'s merge adds it."""
    modules = dict(model.named_modules())
    originals: dict[tuple[str, str], torch.Tensor] = {}
    try:
        with torch.no_grad():
            for name, delta in deltas.items():
                changes = [("weight", delta.matrix())] + ([("bias", delta.bias)] if delta.bias is not None else [])
                for kind, change in changes:
                    param = getattr(modules[name], kind)
                    originals[name, kind] = param.detach().clone()
                    param.add_(change.to(param.device))
        yield model
    finally:
        with torch.no_grad():
            for (name, kind), original in originals.items():
                getattr(modules[name], kind).copy_(original)
