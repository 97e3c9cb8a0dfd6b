"""Which way a fused stack of expert down projections is stored, read off its shape or probed.

A mixture-of-experts layer may keep all its experts' down projections in one 3-D parameter:

- output-first ``[E, d, d_in]``, used as ``F.linear(h, W[e])`` (Mixtral, Qwen2-MoE, Qwen3-MoE);
- input-first ``[E, d_in, d]``, used as ``h @ W[e]`` (gpt-oss).

d is the residual stream's width. When d_in != d the shape tells. When they are equal (gpt-oss:
2880 and 2880) it cannot, so a functional probe decides: every expert's matrix is perturbed by the
same rank-1 ``s u v^T`` as stored, the MLP block runs on random input, and its output moves along u
when the stack is output-first (``(W + s u v^T) h = W h + s u (v.h)``) and along v when it is
input-first (``h (W + s u v^T) = h W + s (h.u) v``). The routing does not depend on the down
projection, so every routed token sees the change and nothing else moves. The weights are restored
exactly, and the answer is cached per module (a class's layout does not change between calls).
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

# experts module -> {parameter name: stored input-first}
_PROBED: weakref.WeakKeyDictionary[nn.Module, dict[str, bool]] = weakref.WeakKeyDictionary()


def stored_input_first(block: nn.Module, experts: nn.Module, name: str, hidden: int) -> bool:
    """True when `experts.<name>` `[E, d_in, d]` is input-first, False when `[E, d, d_in]` is
    output-first (d = `hidden`). `block` is the MLP module whose output is the layer's MLP write.

    Raises ValueError saying why when neither the shape nor the probe tells.
    """
    shape = tuple(getattr(experts, name).shape)
    if len(shape) != 3:
        raise ValueError(f"{name} has shape {list(shape)}, not [experts, d, d_in] or [experts, d_in, d]")
    out_first, in_first = shape[1] == hidden, shape[2] == hidden
    if out_first != in_first:
        return in_first
    if not out_first:
        raise ValueError(f"{name} has shape {list(shape)}: neither dimension is the hidden size {hidden}")
    cached = _PROBED.setdefault(experts, {})
    if name not in cached:
        cached[name] = _probe(block, experts, name, hidden)
    return cached[name]


@torch.no_grad()
def _probe(block: nn.Module, experts: nn.Module, name: str, hidden: int) -> bool:
    """The functional probe of the module docstring for a square stack `[E, d, d]`."""
    param = getattr(experts, name)
    g = torch.Generator().manual_seed(0)
    u, v = torch.linalg.qr(torch.randn(hidden, 2, generator=g, dtype=torch.float64))[0].t()  # orthonormal
    x = torch.randn(1, 8, hidden, generator=g).to(param.device, param.dtype)
    scale = float(param.detach().abs().amax()) * hidden or 1.0  # entries of s u v^T as large as the weights'
    perturbation = (scale * torch.outer(u, v)).to(param.device, param.dtype)
    original = param.detach().clone()
    training = block.training
    block.eval()  # no router jitter: both runs route alike
    try:
        before = _output(block(x))
        param.add_(perturbation)
        moved = (_output(block(x)) - before).double().reshape(-1, hidden).cpu()
    except Exception as e:  # any failure of an unknown block's forward: say which call failed and why
        raise ValueError(
            f"{name} is square [{param.shape[0]}, {hidden}, {hidden}], so its layout is probed by "
            f"running {type(block).__name__} on hidden states alone, which failed: "
            f"{type(e).__name__}: {e}"
        ) from e
    finally:
        param.copy_(original)
        block.train(training)
    total = moved.norm()
    along_u, along_v = (moved @ u).norm(), (moved @ v).norm()
    if total > 0 and along_u > 0.99 * total:
        return False
    if total > 0 and along_v > 0.99 * total:
        return True
    raise ValueError(
        f"{name} is square [{param.shape[0]}, {hidden}, {hidden}] and a rank-1 change of every expert "
        f"moved {type(block).__name__}'s output along neither of its factors (share along u "
        f"{float(along_u / total) if total > 0 else 0:.2f}, along v "
        f"{float(along_v / total) if total > 0 else 0:.2f}): its output is not a sum of the experts' "
        "down projections (a norm after the experts?), so the direction cannot be ablated from it"
    )


def _output(out) -> torch.Tensor:
    """An MLP block's hidden states (gpt-oss returns them with the router scores)."""
    return out[0] if isinstance(out, tuple) else out
