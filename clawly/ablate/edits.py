"""Input-conditional edits: a writer's change that depends on what the writer reads.

Plain directional ablation changes a writer W `[d, d_in]` (input x, output W x) by

    ΔW = -a q (qᵀ W)                                     (`edit.method=projection`)

so every input loses its write along q, a kept category's as much as a targeted one's. Where
refusal has a core shared by the categories, no direction q removes violence's refusals and keeps
self-harm's. The two edits here keep ΔW rank 1 per direction (B = -a q, A = qᵀ W R: the LoRA stays
exact) but change A by an operator R on the writer's *input* space, built from what the writer reads
on kept requests (C_k) and on targeted ones (C_t), prompt and the base model's own answer, every
position:

- **null-space constraint** (AlphaEdit, Fang et al., arXiv 2410.02355; AlphaSteer, arXiv 2506.07022):
  R = P = I - U Uᵀ, U the eigenvectors carrying the fraction `energy` of C_k's energy. A kept input
  in span(U) gives ΔW x = 0 exactly; a targeted input keeps the part of its refusal write outside
  that span (`retained_writes` reports how much, per writer).
- **least squares with a keep set**: the ΔW = -q qᵀ W R minimizing
  E_t‖(W + ΔW) x - (I - q qᵀ) W x‖² + E_k‖ΔW x‖² + λ‖ΔW‖², i.e. R = C_t (C_t + C_k + λ I)⁻¹ with C
  the per-position second moments; solved through the low-rank form of C (Woodbury), never inverted.

The second moments are streamed (`SecondMoment`): exact where the input is at most `rank` wide, else
a rank-`rank` sketch of the top of the spectrum (frequent-directions style: the running matrix of
scaled singular vectors and each new chunk of rows, reduced to its top `rank` again), with the exact
trace kept so that an energy share is of the whole, not of the sketch.

Writers that are modules (nn.Linear, GPT-2's Conv1D) are supported; fused expert stacks are not
(one clear error).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from clawly.errors import ClawlyError, reading
from clawly.io import write_safetensors
from clawly.model.architecture import Writer, writers
from clawly.paths import Paths
from clawly.settings import EditSettings, Settings

METHODS = ("projection", "nullspace", "least_squares")


class InputEditError(ClawlyError, ValueError):
    """An input-conditional edit that cannot be made here (the message says why and what to do)."""


# ------------------------------------------------------------------ streamed second moments


class SecondMoment:
    """Σ x xᵀ of streamed rows x ∈ R^d: exact (`[d, d]`, float64) when d <= rank, else a sketch
    `b` `[<= rank, d]` whose rows are the top singular vectors of all rows seen, scaled by their
    singular values (so bᵀ b approximates Σ x xᵀ on its top-`rank` subspace). `trace` and `count`
    are exact."""

    def __init__(self, d: int, rank: int):
        self.d, self.rank = d, rank
        self.exact = d <= rank
        self.c = torch.zeros(d, d, dtype=torch.float64) if self.exact else None
        self.b = torch.zeros(0, d, dtype=torch.float32)
        self.trace = 0.0
        self.count = 0

    def update(self, x: torch.Tensor) -> None:
        """Add rows `x` `[n, d]`."""
        x = x.detach().reshape(-1, self.d).to("cpu", torch.float64)
        self.trace += float((x * x).sum())
        self.count += x.shape[0]
        if self.exact:
            self.c += x.t() @ x
            return
        for start in range(0, x.shape[0], self.rank):
            m = torch.cat([self.b.double(), x[start : start + self.rank]])  # [k + c, d]
            values, vectors = torch.linalg.eigh(m @ m.t())  # ascending; m mᵀ = U S² Uᵀ
            top = vectors[:, -self.rank :].flip(1)  # [k + c, r]
            self.b = (top.t() @ m).float()  # rows s_i v_iᵀ = u_iᵀ m

    def spectrum(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(basis `[r, d]` orthonormal rows, energy `[r]` descending), float64: eigenvectors and
        eigenvalues of the (sketched) second moment."""
        if self.exact:
            values, vectors = torch.linalg.eigh(self.c)
            return vectors.flip(1).t().contiguous(), values.flip(0).clamp_min(0.0)
        b = self.b.double()
        norms = b.norm(dim=1)
        keep = norms > 0
        return b[keep] / norms[keep, None], norms[keep] ** 2


@dataclass
class Spectrum:
    """A writer's inputs on one set of requests: orthonormal `basis` `[r, d_in]`, its `energy` `[r]`
    (descending, summed over positions), the exact `trace` and the position `count`."""

    basis: torch.Tensor
    energy: torch.Tensor
    trace: float
    count: int

    def rank_for(self, share: float) -> int:
        """The fewest leading directions that carry `share` of the whole energy (all of them when
        the sketch holds less)."""
        if self.trace <= 0:
            return 0
        kept = torch.cumsum(self.energy, 0) / self.trace
        share = min(share, 1.0 - 1e-9)  # all of it: the directions with energy, not rounding's zeros
        return min(len(self.energy), int(torch.searchsorted(kept, torch.tensor(share, dtype=kept.dtype))) + 1)

    def factor(self) -> torch.Tensor:
        """Z `[d_in, r]` with Z Zᵀ = the per-position second moment (on the tracked subspace)."""
        return self.basis.t() * (self.energy / max(self.count, 1)).sqrt()


@dataclass
class WriterInputs:
    """What each writer reads on kept and on targeted requests, by writer name."""

    kept: dict[str, Spectrum]
    targeted: dict[str, Spectrum]
    meta: dict[str, str]
    # per writer, the least-squares edit's factors: the same for every trial (only the ridge changes)
    _solvers: dict[str, LeastSquares] = field(default_factory=dict, repr=False, compare=False)

    def apply(self, edit: dict, name: str, a: torch.Tensor) -> torch.Tensor:
        """A `[k, d_in]` (read @ W) with the edit's operator applied on the input side."""
        if name not in self.kept:
            raise InputEditError(f"no input statistics for writer {name}: rerun probe-writers on this model")
        solver = None
        if edit.get("method") == "least_squares" and name in self.targeted:
            if name not in self._solvers:
                self._solvers[name] = LeastSquares.of(self.kept[name], self.targeted[name])
            solver = self._solvers[name]
        return edit_rows(edit, a, self.kept[name], self.targeted.get(name), solver)


@dataclass
class LeastSquares:
    """R = C_t (C_t + C_k + λI)⁻¹ for one writer, for any ridge: with C_t + C_k = Z Zᵀ (Z `[d, r]`, the
    two sets' factors side by side) and ZᵀZ = V diag(σ) Vᵀ, Woodbury gives
    A R = (Y - (Y Z V) diag(1 / (λ + σ)) (Z V)ᵀ) / λ with Y = A C_t. The eigendecomposition is the
    only O(d r²) step, done once; each ridge then costs a few products with Z V."""

    zt: torch.Tensor  # [d, r_t]: C_t = zt ztᵀ
    zv: torch.Tensor  # [d, r]: Z V
    sigma: torch.Tensor  # [r]: the eigenvalues of ZᵀZ
    energy_per_dim: float  # mean per-position energy of both sets per input dimension (λ's unit)

    @classmethod
    def of(cls, kept: Spectrum, targeted: Spectrum) -> LeastSquares:
        zt, zk = targeted.factor(), kept.factor()
        z = torch.cat([zt, zk], dim=1)
        sigma, v = torch.linalg.eigh(z.t() @ z)
        energy = (targeted.trace / max(targeted.count, 1) + kept.trace / max(kept.count, 1)) / z.shape[0]
        return cls(zt, z @ v, sigma.clamp_min(0.0), energy)

    def rows(self, a: torch.Tensor, ridge: float) -> torch.Tensor:
        lam = max(ridge * self.energy_per_dim, 1e-12)
        y0 = (a.to(torch.float64) @ self.zt) @ self.zt.t()  # A C_t
        return (y0 - ((y0 @ self.zv) / (lam + self.sigma)) @ self.zv.t()) / lam


def edit_rows(
    edit: dict, a: torch.Tensor, kept: Spectrum, targeted: Spectrum | None, solver: LeastSquares | None = None
) -> torch.Tensor:
    """A R for the edit `{"method": "nullspace", "energy": e}` or `{"method": "least_squares",
    "ridge": ρ}` (λ = ρ times the mean per-position energy of both sets per input dimension);
    `solver`: the least-squares factors of these spectra when built before (else built here)."""
    a = a.to(torch.float64)
    if edit["method"] == "nullspace":
        u = kept.basis[: kept.rank_for(edit["energy"])]  # [r, d_in]
        return a - (a @ u.t()) @ u
    if edit["method"] == "least_squares":
        if targeted is None:
            raise InputEditError("edit.method=least_squares needs the targeted requests' inputs: rerun probe-writers")
        return (solver or LeastSquares.of(kept, targeted)).rows(a, edit["ridge"])
    raise InputEditError(f"unknown edit method {edit['method']!r}; one of {', '.join(METHODS[1:])}")


@dataclass
class RecordedInputs:
    """The A rows a saved change used, by writer (a reproduction record's `clawly_edit.safetensors`):
    rebuilding the change needs no probing."""

    rows: dict[str, torch.Tensor]

    def apply(self, edit: dict, name: str, a: torch.Tensor) -> torch.Tensor:
        if name not in self.rows or self.rows[name].shape != a.shape:
            raise InputEditError(
                f"the recorded edit has no rows of shape {tuple(a.shape)} for writer {name}: the "
                "record belongs to another model or plan"
            )
        return self.rows[name].to(torch.float64)


# ------------------------------------------------------------------ reading the writers' inputs


def module_writers(model: nn.Module) -> list[Writer]:
    """The writers whose inputs can be captured by a hook on their module (not fused expert stacks)."""
    found = writers(model)
    fused = [w.name for w in found if w.experts is not None]
    if fused:
        raise InputEditError(
            f"input-conditional edits need writers that are modules; this model's experts are "
            f"fused parameters ({fused[0]}, ...): use edit.method=projection"
        )
    return found


@contextlib.contextmanager
def capture_writer_inputs(
    model: nn.Module, moments: dict[str, SecondMoment], mask: list[torch.Tensor]
) -> Iterator[None]:
    """Feed every writer's input rows into its `SecondMoment` while the block runs forwards; only the
    positions where `mask[0]` (`[b, t]` bool, set by the caller per batch) is true count."""
    hooks = []
    for wr in module_writers(model):
        if wr.name not in moments:
            continue

        def hook(module, args, wr=wr):
            x, m = args[0], mask[0]
            if m is not None and x.shape[:-1] == m.shape:
                rows = x[m.to(x.device)]  # the real positions of a padded batch
            elif m is None or bool(m.all()):
                rows = x.reshape(-1, x.shape[-1])  # every position, or an expert's routed tokens of an unpadded batch
            else:
                raise InputEditError(f"{wr.name} reads routed tokens of a padded batch: read one conversation a batch")
            moments[wr.name].update(rows.float())

        hooks.append(wr.module.register_forward_pre_hook(hook))
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


@torch.no_grad()
def read_inputs(
    model: nn.Module, tokenizer, texts: Sequence[str], rank: int, batch_size: int = 8, progress=None
) -> dict[str, Spectrum]:
    """Each writer's input spectrum over every token position of `texts` (full conversations: the
    templated request and an answer), padded positions left out."""
    found = module_writers(model)
    if any(".experts." in w.name for w in found):  # expert modules see routed tokens: no padding to leave out
        batch_size = 1
    moments = {w.name: SecondMoment(_input_width(w), rank) for w in found}
    mask: list[torch.Tensor] = [None]
    device = next(model.parameters()).device
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    with capture_writer_inputs(model, moments, mask):
        for idx in progress(batches) if progress else batches:
            rows = [tokenizer(texts[i], add_special_tokens=False).input_ids for i in idx]
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            attention = torch.zeros((len(rows), width), dtype=torch.long)
            for j, r in enumerate(rows):  # right-padded: the padding comes after every real token
                ids[j, : len(r)], attention[j, : len(r)] = torch.tensor(r), 1
            mask[0] = attention.bool()
            # the writers' inputs are all that is read: the LM head computes one position, not `[b, t, vocab]`
            model(input_ids=ids.to(device), attention_mask=attention.to(device), use_cache=False, logits_to_keep=1)
    return {name: Spectrum(*m.spectrum(), m.trace, m.count) for name, m in moments.items()}


def _input_width(wr: Writer) -> int:
    if isinstance(wr.module, nn.Linear):  # a 4-bit Linear's packed weight has another shape
        return wr.module.in_features
    return wr.weight.shape[0] if wr.transposed else wr.weight.shape[1]


# ------------------------------------------------------------------ what the edit leaves


def retained_writes(edit: dict, inputs: WriterInputs, a: torch.Tensor, name: str) -> tuple[float, float]:
    """(targeted, kept) for one writer and its read rows `a` `[k, d_in]`: the share of the targeted
    requests' write along the ablated directions that the edited change still removes,
    ‖A R X_t‖ / ‖A X_t‖, and the share of the kept requests' write it still changes, ‖A R X_k‖ / ‖A X_k‖
    (1 and 1 for plain ablation; a null-space edit aims at (high, 0)), on the tracked subspaces."""
    edited = inputs.apply(edit, name, a)

    def share(s: Spectrum) -> float:
        z = s.factor()
        full = float((a.double() @ z).norm())
        return float((edited @ z).norm()) / full if full > 0 else math.nan

    targeted = inputs.targeted.get(name)
    return (share(targeted) if targeted is not None else math.nan), share(inputs.kept[name])


# ------------------------------------------------------------------ the file


def write_writer_inputs(path: Path, inputs: WriterInputs) -> None:
    """`writers/inputs.safetensors`: per writer and set (kept, targeted) the basis (float32), energy,
    trace and count; the edit settings in the metadata."""
    tensors = {}
    for part, spectra in (("kept", inputs.kept), ("targeted", inputs.targeted)):
        for name, s in spectra.items():
            tensors[f"{part}.{name}.basis"] = s.basis.float().contiguous()
            tensors[f"{part}.{name}.energy"] = s.energy.double()
            tensors[f"{part}.{name}.stats"] = torch.tensor([s.trace, float(s.count)], dtype=torch.float64)
    write_safetensors(path, tensors, inputs.meta)


def read_writer_inputs(path: Path) -> WriterInputs:
    with reading(path, "probe-writers"):
        with safe_open(str(path), "pt") as f:
            meta = dict(f.metadata() or {})
            keys = list(f.keys())
            parts: dict[str, dict[str, Spectrum]] = {"kept": {}, "targeted": {}}
            for key in keys:
                if not key.endswith(".basis"):
                    continue
                part, name = key.split(".", 1)[0], key[len(key.split(".", 1)[0]) + 1 : -len(".basis")]
                trace, count = f.get_tensor(f"{part}.{name}.stats").tolist()
                parts[part][name] = Spectrum(
                    f.get_tensor(key).double(), f.get_tensor(f"{part}.{name}.energy"), trace, int(count)
                )
    return WriterInputs(parts["kept"], parts["targeted"], meta)


def load_writer_inputs(settings: Settings) -> WriterInputs | None:
    """The probe-writers output a run's trials need (None with edit.method=projection)."""
    if not settings.edit.conditional:
        return None
    path = Paths.of(settings).writer_inputs
    inputs = read_writer_inputs(path)
    if inputs.meta.get("method") == "projection" or not inputs.kept:
        raise InputEditError(
            f"{path} holds no writer inputs (it was made with edit.method=projection): rerun "
            "probe-writers (python -m stages.probe_writers, or dvc repro)"
        )
    return inputs


def suggest_edit(trial, edit: EditSettings) -> dict:
    """The trial's input-conditional edit, its parameter drawn from the search space ({} for projection)."""
    if edit.method == "nullspace":
        return {"method": "nullspace", "energy": trial.suggest_float("keep_energy", *edit.energy_range)}
    if edit.method == "least_squares":
        return {"method": "least_squares", "ridge": trial.suggest_float("ridge", *edit.ridge_range, log=True)}
    return {}


def write_recorded_rows(path: Path, rows: dict[str, torch.Tensor]) -> None:
    write_safetensors(path, {name: r.float().contiguous() for name, r in rows.items()}, {"format": "1"})


def read_recorded_rows(path: Path) -> RecordedInputs:
    with reading(path, "export-lora"):
        with safe_open(str(path), "pt") as f:
            return RecordedInputs({k: f.get_tensor(k).double() for k in f.keys()})
