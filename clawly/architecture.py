"""Architecture adapter: where the decoder layers are, which linear layers write the residual stream.

Everything else in clawly is architecture-blind and asks only these questions. A model this
adapter does not know raises `UnsupportedArchitectureError` naming its class; nothing is
skipped silently.

Residual writers are the two projections whose outputs are added to the residual stream in
every decoder layer:

- ``"attn_out"``: the attention output projection (``self_attn.o_proj`` and its aliases);
- ``"mlp_down"``: the MLP down projection (``mlp.down_proj`` and its aliases).

Both are ``nn.Linear`` with ``weight`` of shape ``[hidden, in_features]``: the residual-stream
direction lives in the weight's *rows* (output side).

Some architectures (Gemma 2 and 3, OLMo 2) normalize each writer's output before adding it to the
residual stream (``post_attention_layernorm``, ``post_feedforward_layernorm``). An RMS norm there
scales every coordinate by its gain g, so what enters the residual stream is g * W x / rms(W x);
`writer_gains` measures g so the ablation can act on that (see `clawly.ablation`).
"""

from __future__ import annotations

import torch
from torch import nn

from clawly.errors import ClawlyError

ATTN_OUT = "attn_out"
MLP_DOWN = "mlp_down"
COMPONENTS = (ATTN_OUT, MLP_DOWN)

# Dotted paths from the top-level model to its nn.ModuleList of decoder layers, first match wins.
_LAYER_PATHS = (
    "model.layers",  # Llama, Qwen2/3, Mistral, Gemma 1/2/3 (CausalLM), Phi3
    "model.language_model.layers",  # Gemma3ForConditionalGeneration and other VLMs (transformers 5)
    "language_model.model.layers",  # the same VLMs in transformers 4
    "model.decoder.layers",  # OPT
    "transformer.h",  # GPT-2, GPT-J, Falcon, Bloom
    "gpt_neox.layers",  # GPT-NeoX, Pythia
)

# Dotted paths from a decoder layer to each residual writer, first match wins.
_WRITER_PATHS = {
    ATTN_OUT: (
        "self_attn.o_proj",
        "self_attn.out_proj",
        "self_attn.dense",
        "attn.out_proj",
        "attn.c_proj",
        "attention.dense",
        "self_attention.dense",
    ),
    MLP_DOWN: (
        "mlp.down_proj",
        "mlp.fc2",
        "mlp.c_proj",
        "mlp.dense_4h_to_h",
        "fc2",
    ),
}

# Sub-modules whose presence marks a mixture-of-experts layer.
_MOE_PATHS = ("mlp.experts", "block_sparse_moe", "feed_forward.experts", "mlp.router", "mlp.gate.experts")


class UnsupportedArchitectureError(ClawlyError, ValueError):
    """The model's layers or residual writers cannot be found; the message names the class."""


def _get(root: nn.Module, dotted: str) -> nn.Module | None:
    node = root
    for part in dotted.split("."):
        node = getattr(node, part, None)
        if node is None:
            return None
    return node if isinstance(node, nn.Module) else None


def _unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (PeftModel -> LoraModel -> the model)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's decoder layers, in order (also through a PEFT wrapper)."""
    inner = _unwrap(model)
    if getattr(getattr(inner, "config", None), "do_layer_norm_before", True) is False:
        raise UnsupportedArchitectureError(
            f"unsupported architecture {type(inner).__name__}: do_layer_norm_before=false normalizes the residual "
            "stream after every residual add (post-LN, as in OPT-350m), so no direction can be ablated from it")
    for path in _LAYER_PATHS:
        layers = _get(inner, path)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return layers
    raise UnsupportedArchitectureError(
        f"unsupported architecture {type(inner).__name__}: no decoder layers found "
        f"(looked for {', '.join(_LAYER_PATHS)})"
    )


def num_layers(model: nn.Module) -> int:
    """Number of decoder layers."""
    return len(decoder_layers(model))


def hidden_size(model: nn.Module) -> int:
    """Width of the residual stream (the text model's hidden size for multimodal configs)."""
    inner = _unwrap(model)
    config = getattr(inner, "config", None)
    if config is not None:
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        for key in ("hidden_size", "n_embd", "d_model"):
            value = getattr(text_config, key, None)
            if isinstance(value, int):
                return value
    raise UnsupportedArchitectureError(
        f"unsupported architecture {type(inner).__name__}: no hidden_size in its config"
    )


def _find_writers(layer: nn.Module, name: str) -> dict[str, tuple[str, nn.Linear]]:
    """Writers by component as (path, module); `name` is what error messages call the owner."""
    moe = [path for path in _MOE_PATHS if _get(layer, path) is not None]
    if moe:
        raise UnsupportedArchitectureError(
            f"unsupported architecture {name}: mixture-of-experts layers ({moe[0]}) are not supported yet"
        )
    found: dict[str, tuple[str, nn.Linear]] = {}
    for component, paths in _WRITER_PATHS.items():
        for path in paths:
            module = _get(layer, path)
            if module is None:
                continue
            base = getattr(module, "base_layer", None)  # a PEFT tuner layer keeps the original here
            if isinstance(base, nn.Linear):
                module = base
            if type(module).__name__ == "Conv1D":
                # GPT-2's Conv1D stores weight as [in, out], transposed against nn.Linear's [out, in].
                raise UnsupportedArchitectureError(
                    f"unsupported architecture {name}: {path} is a transformers Conv1D (weight stored "
                    f"[in, out], transposed against nn.Linear); GPT-2-style models are not supported yet"
                )
            if not isinstance(module, nn.Linear):
                raise UnsupportedArchitectureError(
                    f"unsupported architecture {name}: {path} is a {type(module).__name__}, not nn.Linear"
                )
            if module.weight.dim() != 2:
                raise UnsupportedArchitectureError(
                    f"unsupported architecture {name}: {path} has a {module.weight.dim()}-D weight "
                    f"(fused experts are not supported yet)"
                )
            found[component] = (path, module)
            break
        else:
            raise UnsupportedArchitectureError(
                f"unsupported architecture {name}: no {component} projection found "
                f"(looked for {', '.join(paths)})"
            )
    return found


def residual_writers(layer: nn.Module) -> dict[str, nn.Linear]:
    """The layer's residual writers by component: {"attn_out": Linear, "mlp_down": Linear}.

    Each weight is ``[hidden, in_features]``. Behind a PEFT LoRA wrapper the base nn.Linear is
    returned, so edits reach the original weights.
    """
    writers = _find_writers(layer, type(layer).__name__)
    return {component: module for component, (_, module) in writers.items()}


def _writers_of(model: nn.Module, index: int, layer: nn.Module) -> dict[str, tuple[str, nn.Linear]]:
    return _find_writers(layer, f"{type(_unwrap(model)).__name__} (layer {index}, {type(layer).__name__})")


def layer_writers(model: nn.Module) -> list[dict[str, nn.Linear]]:
    """`residual_writers` of every decoder layer, in order; errors name the model class and layer."""
    return [
        {component: module for component, (_, module) in _writers_of(model, i, layer).items()}
        for i, layer in enumerate(decoder_layers(model))
    ]


# A layer with this norm normalizes both writers' outputs before the residual add (Gemma 2/3, OLMo 2);
# in pre-norm models `post_attention_layernorm` is the MLP's input norm instead.
_POST_NORM_MARK = "post_feedforward_layernorm"
_POST_NORMS = {ATTN_OUT: "post_attention_layernorm", MLP_DOWN: "post_feedforward_layernorm"}


@torch.no_grad()
def rms_norm_gain(norm: nn.Module, size: int) -> torch.Tensor:
    """The per-coordinate gain g `[size]` float64 of an RMS norm, y = g * x / rms(x), read off the
    module itself (so `weight` or `1 + weight` conventions need no special case). Anything that is
    not such a norm (a LayerNorm subtracts the mean) is an `UnsupportedArchitectureError`."""
    param = next(norm.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    gain = norm(torch.full((1, size), 1e4, dtype=torch.float64, device=device)).double()[0]  # rms 1e4 >> eps
    x = torch.randn(4, size, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).to(device)
    expected = gain * x / x.pow(2).mean(-1, keepdim=True).sqrt()
    if not torch.allclose(norm(x).double(), expected, rtol=1e-3, atol=1e-4):
        raise UnsupportedArchitectureError(
            f"unsupported architecture: the norm after a residual writer ({type(norm).__name__}) is not an RMS "
            "norm (gain * x / rms(x)), so the ablated direction cannot be kept out of the residual stream")
    return gain.cpu()


def writer_gains(layer: nn.Module, hidden: int) -> dict[str, torch.Tensor | None]:
    """Per component, the gain `[hidden]` of the RMS norm applied to the writer's output before the
    residual add, or None where the output is added as it is."""
    if _get(layer, _POST_NORM_MARK) is None:
        return {c: None for c in COMPONENTS}
    out: dict[str, torch.Tensor | None] = {}
    for component, path in _POST_NORMS.items():
        norm = _get(layer, path)
        if norm is None:
            raise UnsupportedArchitectureError(
                f"unsupported architecture {type(layer).__name__}: it has {_POST_NORM_MARK} but no {path}")
        out[component] = rms_norm_gain(norm, hidden)
    return out
