"""Gradient descent on a few tensors with the model frozen: refusal direction optimization and
distillation share it (`descend`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def descend(
    parameters: Sequence[torch.Tensor],
    steps: int,
    lr: float,
    losses: Callable[[int], dict[str, torch.Tensor]],
    desc: str,
    progress: Callable | None = None,
) -> list[dict]:
    """Adam on `parameters` for `steps` steps. `losses(step)` returns the step's named terms, "loss"
    (what is minimized) first; each step's values go into the history, and the last entry scores the
    final parameters (no step follows it)."""
    opt = torch.optim.Adam(list(parameters), lr=lr)
    history = []
    bar = progress(total=steps, desc=desc, unit="step") if progress else None
    try:
        for step in range(steps + 1):
            terms = losses(step)
            history.append({"step": step, **{k: round(float(x.detach()), 6) for k, x in terms.items()}})
            if step == steps:
                break
            opt.zero_grad()
            terms["loss"].backward()
            opt.step()
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return history
