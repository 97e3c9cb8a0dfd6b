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

A writer's bias b is written into the residual stream too and changes the same way,
b' = b - sum_c a_c (G^-1 q_c) (G q_c)^T b. In a mixture-of-experts layer every expert's down
projection W_e (and a shared expert's) is a writer of the layer's MLP: W_e' = W_e - sum_c a_c q_c q_c^T W_e
for every e, biases alike, so the routed sum sum_e r_e(x) W_e' h_e loses the q_c components whatever
the routing weights r_e. A fused stack [E, ., .] changes per expert by the same B and its own A_e.

Writers are stored output-first ([d, d_in], nn.Linear) or input-first ([d_in, d]: GPT-2's Conv1D,
gpt-oss's experts); every change here is in the residual stream's orientation and transposed only
where it is added (`WeightDelta.transposed`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Protocol

import torch
from torch import nn

from clawly.ablate.directions import AblationBasis
from clawly.model.architecture import Writer, decoder_layers, dense_weight, is_quantized, writer_parameters, writers


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
    # an input-conditional edit (clawly.ablate.edits): {"method": "nullspace", "energy": e} or
    # {"method": "least_squares", "ridge": r}; empty for plain ablation
    edit: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        out = {
            "kernels": {c: asdict(k) for c, k in self.kernels.items()},
            "direction_index": self.direction_index,
            "norm_preserve": self.norm_preserve,
            "category_weights": dict(self.category_weights),
        }
        if self.category_kernels:
            out["category_kernels"] = {
                cat: {c: asdict(k) for c, k in ks.items()} for cat, ks in self.category_kernels.items()
            }
        if self.edit:
            out["edit"] = dict(self.edit)
        return out

    @classmethod
    def from_dict(cls, d: dict) -> AblationPlan:
        return cls(
            kernels={c: LayerKernel(**k) for c, k in d["kernels"].items()},
            direction_index=d.get("direction_index"),
            norm_preserve=bool(d.get("norm_preserve", False)),
            category_weights=dict(d.get("category_weights", {})),
            category_kernels={
                cat: {c: LayerKernel(**k) for c, k in ks.items()} for cat, ks in d.get("category_kernels", {}).items()
            },
            edit=dict(d.get("edit", {})),
        )

    def strengths_by_layer(self, num_layers: int, m: int) -> dict[str, torch.Tensor]:
        """Component -> ablation strength of each of the m directions per layer, `[num_layers, m]`:
        the shared kernel for every direction, or each category's own (directions in the order
        of category_weights)."""
        if not self.category_kernels:
            return {c: ablation_kernel(num_layers, k)[:, None].expand(num_layers, m) for c, k in self.kernels.items()}
        names = list(self.category_weights)
        if len(names) != m or set(names) != set(self.category_kernels):
            raise ValueError(
                f"per-category kernels for {sorted(self.category_kernels)} but the basis has "
                f"{m} direction(s) for {names}"
            )
        components = sorted({c for ks in self.category_kernels.values() for c in ks})
        zero = torch.zeros(num_layers, dtype=torch.float64)
        return {
            c: torch.stack(
                [
                    ablation_kernel(num_layers, self.category_kernels[n][c]) if c in self.category_kernels[n] else zero
                    for n in names
                ],
                dim=1,
            )
            for c in components
        }


def layer_directions(basis: AblationBasis, plan: AblationPlan, num_layers: int) -> torch.Tensor:
    """Orthonormal directions to ablate per decoder layer, `[num_layers, m, d]`: each layer's own
    probe point (its output, point l + 1), or one fractional probe index for all layers."""
    if plan.direction_index is None:
        return basis.directions[:, 1 : num_layers + 1].transpose(0, 1)
    return basis.at_index(plan.direction_index).unsqueeze(0).expand(num_layers, -1, -1)


@dataclass
class WeightDelta:
    """A writer's change, in the residual stream's orientation: ``[d, d_in]``, or ``[E, d, d_in]``
    for a fused expert stack (one change per expert). Low rank as B @ A (B ``[d, k]``, shared by all
    experts, or ``[E, d, k]``; A ``[k, d_in]`` or ``[E, k, d_in]``), or dense; and the change of
    its bias ``[d]`` or ``[E, d]`` where it has one (the bias is written into the residual stream too).

    `transposed`: the parameter stores the matrix input-first (Conv1D, gpt-oss experts), so the
    change is added transposed. `rounded`: the change is rounded to the weight's dtype before it is
    added, as peft merges a LoRA on a parameter (``target_parameters``); otherwise it is added in
    its own precision and rounded once.
    """

    b: torch.Tensor | None = None
    a: torch.Tensor | None = None
    dense: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    transposed: bool = False
    rounded: bool = False

    def matrix(self, experts: slice | None = None) -> torch.Tensor:
        """The change `[d, d_in]`, or `[e, d, d_in]` for the fused stack's `experts` (default all)."""
        if self.dense is not None:
            return self.dense if experts is None else self.dense[experts]
        if experts is None:
            return self.b @ self.a
        return (self.b if self.b.dim() == 2 else self.b[experts]) @ self.a[experts]

    def stored(self, experts: slice | None = None) -> torch.Tensor:
        """`matrix` in the parameter's own layout."""
        m = self.matrix(experts)
        return m.transpose(-1, -2) if self.transposed else m


class InputEditor(Protocol):
    """What turns a writer's read rows A `[k, d_in]` into A R (clawly.ablate.edits)."""

    def apply(self, edit: dict, name: str, a: torch.Tensor) -> torch.Tensor: ...


# Elements of a fused expert stack changed per step: bounds the float64 temporaries (a 128-expert
# stack of 2880 x 2880 matrices would otherwise need 8.5 GB at once).
_CHUNK = 1 << 24


def _experts_per_chunk(shape: torch.Size) -> int:
    return max(1, _CHUNK // max(1, shape[-1] * shape[-2]))


def _read(read: torch.Tensor, wr: Writer) -> torch.Tensor:
    """read @ W in float64 on CPU: `[k, d_in]`, or `[E, k, d_in]` for a fused stack (in chunks of experts)."""
    weight = dense_weight(wr.weight)  # a 4-bit weight dequantized: the change is made to what it computes
    if weight.dim() == 2:
        w = weight.to("cpu", torch.float64)
        return read @ (w.t() if wr.transposed else w)
    step = _experts_per_chunk(weight.shape)
    parts = []
    for start in range(0, weight.shape[0], step):
        w = weight[start : start + step].to("cpu", torch.float64)
        parts.append(read @ (w.transpose(-1, -2) if wr.transposed else w))
    return torch.cat(parts)


def _math_weight(wr: Writer) -> torch.Tensor:
    """W in float64 on CPU in the residual stream's orientation, `[d, d_in]` or `[E, d, d_in]`."""
    w = dense_weight(wr.weight).to("cpu", torch.float64)
    return w.transpose(-1, -2) if wr.transposed else w


def weight_deltas(
    model: nn.Module,
    basis: AblationBasis,
    plan: AblationPlan,
    strengths: torch.Tensor | None = None,
    inputs: InputEditor | None = None,
) -> dict[str, WeightDelta]:
    """The weight change of every writer the plan touches, computed in float64, keyed by writer name.

    basis: the directions to ablate (m = 1 in global mode). strengths: optional `[m]` multipliers
    (category weights), default ones. Every expert of a fused stack changes by the same B and its own
    A = (G q)^T W_e, so the layer's MLP write loses the directions whatever the routing. With an
    input-conditional edit in the plan, `inputs` (`clawly.ablate.edits`) turns each writer's A into
    A R; the bias, written whatever the input, is then left as it is.
    """
    if plan.edit and inputs is None:
        raise ValueError(f"the plan's {plan.edit['method']} edit needs the writers' input statistics (probe-writers)")
    if plan.edit and plan.norm_preserve:
        raise ValueError(
            "norm preservation rescales every column, so it cannot keep an input-conditional edit's "
            "kept inputs unchanged"
        )
    found = writers(model)
    num_layers = len(decoder_layers(model))
    q = layer_directions(basis, plan, num_layers)  # [L, m, d]
    m = q.shape[1]
    s = torch.ones(m, dtype=torch.float64) if strengths is None else strengths.to(torch.float64)
    kernels = plan.strengths_by_layer(num_layers, m)
    deltas: dict[str, WeightDelta] = {}
    for wr in found:
        if wr.component not in kernels:
            continue
        alpha = kernels[wr.component][wr.layer] * s  # [m]
        if not torch.any(alpha != 0):
            continue
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
        a = _read(read, wr)  # [k, d_in] or [E, k, d_in]
        bias_change = None
        if plan.edit:
            a = inputs.apply(plan.edit, wr.name, a)
        elif wr.bias is not None:  # [d] or [E, d]
            bias_change = (wr.bias.detach().to("cpu", torch.float64) @ read.t()) @ b.t()
        if plan.norm_preserve:
            w = _math_weight(wr)
            new = w + b @ a
            new = new * (w.norm(dim=-2, keepdim=True) / new.norm(dim=-2, keepdim=True).clamp_min(1e-12))
            deltas[wr.name] = WeightDelta(dense=new - w, bias=bias_change, transposed=wr.transposed)
        else:
            deltas[wr.name] = WeightDelta(b=b, a=a, bias=bias_change, transposed=wr.transposed)
    return deltas


def _add(param: nn.Parameter, delta: WeightDelta) -> None:
    """param += the delta's matrix in the parameter's layout (a fused stack in chunks of experts)."""
    if param.dim() == 2:
        chunks = [None]
    else:
        step = _experts_per_chunk(param.shape)
        chunks = [slice(start, start + step) for start in range(0, param.shape[0], step)]
    for experts in chunks:
        change = delta.stored(experts)
        target = param if experts is None else param[experts]
        target.add_(change.to(param.device, param.dtype) if delta.rounded else change.to(param.device))


def _output_change(delta: WeightDelta, device: torch.device) -> Callable:
    """A forward hook that adds the change's write x (B A)^T to a Linear's output, in float32 on the
    layer's device: a 4-bit layer then computes as its dequantized weight plus the change would."""
    if delta.transposed:
        raise ValueError("a quantized writer stored input-first is not supported")
    factors = [delta.dense] if delta.dense is not None else [delta.a, delta.b]  # x @ A^T @ B^T stays low rank
    factors = [f.to(device, torch.float32).t() for f in factors]

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        change = args[0].float()
        for f in factors:
            change = change @ f
        return output + change.to(output.dtype)

    return hook


@contextlib.contextmanager
def ablated(model: nn.Module, deltas: dict[str, WeightDelta]) -> Iterator[nn.Module]:
    """Apply weight changes in place; always restore the exact original weights on exit.

    Each change is added in its own precision and rounded once to the weight's dtype: a trial's
    float64 change, or an adapter's float32 B A exactly as `peft`'s merge adds it (a parameter
    LoRA's is rounded first, as peft does). A 4-bit weight (packed, not editable) keeps its bytes:
    a forward hook adds the change's write to the layer's output instead (`_output_change`)."""
    originals: list[tuple[nn.Parameter, torch.Tensor]] = []
    hooks = []
    try:
        with torch.no_grad():
            for name, delta in deltas.items():
                weight, bias = writer_parameters(model, name)
                if is_quantized(weight):
                    hooks.append(model.get_submodule(name).register_forward_hook(_output_change(delta, weight.device)))
                else:
                    originals.append((weight, weight.detach().clone()))
                    _add(weight, delta)
                if delta.bias is not None:
                    if bias is None:
                        raise ValueError(f"{name} has no bias, but its change has one")
                    originals.append((bias, bias.detach().clone()))
                    bias.add_(delta.bias.to(bias.device, bias.dtype) if delta.rounded else delta.bias.to(bias.device))
        yield model
    finally:
        for hook in hooks:
            hook.remove()
        with torch.no_grad():
            for param, original in reversed(originals):
                param.copy_(original)
