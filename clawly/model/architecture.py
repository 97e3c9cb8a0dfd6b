"""Architecture adapter: where the decoder layers are, which weights write into the residual stream.

Everything else in clawly is architecture-blind and asks only these questions. A model this
adapter does not know raises `UnsupportedArchitectureError` naming its class and what was looked
for; nothing is skipped silently.

Residual writers are the weights whose outputs are added to the residual stream in every decoder
layer, by component:

- ``"attn_out"``: the attention output projection (``self_attn.o_proj`` and its aliases);
- ``"mlp_down"``: the MLP down projection (``mlp.down_proj`` and its aliases); in a
  mixture-of-experts layer every expert's down projection, and a shared expert's.

A writer maps its input (width d_in) into the residual stream (width d). It is stored one of four
ways, and `Writer.transposed` says which orientation:

- ``nn.Linear``: weight ``[d, d_in]`` (output-first), bias ``[d]``;
- transformers' ``Conv1D`` (GPT-2): weight ``[d_in, d]`` (input-first), bias ``[d]``;
- experts as separate modules (a ModuleList of MLPs): one ``nn.Linear`` writer per expert;
- experts fused in one parameter: ``[E, d, d_in]`` (Mixtral, Qwen2/3-MoE) or ``[E, d_in, d]``
  (gpt-oss), with a per-expert bias ``[E, d]`` named ``<weight>_bias`` where there is one;
  `clawly.model.experts` tells the two orientations apart.

A layer child with weights that is none of these (a Mamba mixer, a second MLP) is an error, so a
writer is never skipped silently. A bitsandbytes 4-bit ``Linear4bit`` (``model.load_in_4bit``) is an
``nn.Linear`` whose weight is packed; `dense_weight` gives the matrix it computes with.

Some architectures (Gemma 2 and 3, OLMo 2) normalize each writer's output before adding it to the
residual stream (``post_attention_layernorm``, ``post_feedforward_layernorm``). An RMS norm there
scales every coordinate by its gain g, so what enters the residual stream is g * W x / rms(W x);
`writer_gains` measures g so the ablation can act on that (see `clawly.ablate.ablation`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from clawly.errors import ClawlyError
from clawly.model.experts import stored_input_first

ATTN_OUT = "attn_out"
MLP_DOWN = "mlp_down"
COMPONENTS = (ATTN_OUT, MLP_DOWN)

# Dotted paths from the top-level model to its nn.ModuleList of decoder layers, first match wins.
_LAYER_PATHS = (
    "model.layers",  # Llama, Qwen2/3, Mistral, Gemma 1/2/3 (CausalLM), Phi3, OLMo 2, MoE models
    "model.language_model.layers",  # Gemma3ForConditionalGeneration and other VLMs (transformers 5)
    "language_model.model.layers",  # the same VLMs in transformers 4
    "model.decoder.layers",  # OPT
    "transformer.h",  # GPT-2, GPT-J, Falcon, Bloom
    "gpt_neox.layers",  # GPT-NeoX, Pythia
)

# Dotted paths from a decoder layer to its attention output projection, first match wins.
_ATTN_PATHS = (
    "self_attn.o_proj",
    "self_attn.out_proj",
    "self_attn.dense",
    "attn.out_proj",
    "attn.c_proj",
    "attention.dense",
    "self_attention.dense",
)
# Dotted paths from a decoder layer to a dense MLP's down projection, first match wins.
_MLP_PATHS = ("mlp.down_proj", "mlp.fc2", "mlp.c_proj", "mlp.dense_4h_to_h", "feed_forward.down_proj", "fc2")
# A mixture-of-experts block: its experts at <block>.experts, a shared expert at <block>.<shared>.
_MOE_BLOCKS = ("mlp", "block_sparse_moe", "feed_forward")
_SHARED_EXPERTS = ("shared_expert", "shared_experts")
# An expert's (or shared expert's) down projection module; a fused stack's parameter is one of the first two.
_EXPERT_DOWN = ("down_proj", "w2", "fc2", "c_proj")
_FUSED_DOWN = ("down_proj", "w2")
BIAS_SUFFIX = "_bias"  # a fused stack's per-expert bias is the parameter <weight>_bias (gpt-oss)
# Layer children with weights that only read the residual stream, though no writer lives in them.
_READERS = ("fc1",)  # OPT's MLP up projection sits on the layer itself


class UnsupportedArchitectureError(ClawlyError, ValueError):
    """The model's layers or residual writers cannot be found; the message names the class."""


@dataclass
class Writer:
    """One weight that writes into the residual stream of decoder layer `layer`.

    `name` is how weight changes refer to it: the module's name for a matrix writer
    ("model.layers.3.self_attn.o_proj"), the parameter's name for a fused expert stack
    ("model.layers.3.mlp.experts.down_proj"); `writer_parameters` turns a name back into tensors.
    """

    layer: int
    component: str
    name: str
    module: nn.Module  # what computes the write: the Linear, the Conv1D or the fused experts module
    weight: nn.Parameter  # [d, d_in]; [d_in, d] when transposed; [E, ...] for fused experts; 4-bit: packed
    bias: nn.Parameter | None  # [d] or [E, d], added to the write
    transposed: bool = False  # stored input-first (Conv1D, gpt-oss experts)
    gain: torch.Tensor | None = None  # [d] gain of an RMS norm between its output and the residual stream

    @property
    def experts(self) -> int | None:
        """Number of experts in a fused stack, None for a matrix writer."""
        return self.weight.shape[0] if self.weight.dim() == 3 else None

    @property
    def kind(self) -> str:
        """What it is, for tables and messages."""
        if self.experts is None:
            return type(self.module).__name__
        return f"{self.experts} fused experts {'[E, d_in, d]' if self.transposed else '[E, d, d_in]'}"


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
            "stream after every residual add (post-LN, as in OPT-350m), so no direction can be ablated from it"
        )
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
    raise UnsupportedArchitectureError(f"unsupported architecture {type(inner).__name__}: no hidden_size in its config")


def _base(module: nn.Module) -> nn.Module:
    """The original module behind PEFT tuner layers (nested for several adapted parameters)."""
    while isinstance(getattr(module, "base_layer", None), nn.Module):
        module = module.base_layer
    return module


def is_quantized(weight: torch.Tensor) -> bool:
    """A bitsandbytes 4-bit weight: packed bytes that cannot be edited in place, with its quantization state."""
    return getattr(weight, "quant_state", None) is not None


def holds_quantized(model: nn.Module) -> bool:
    """Any 4-bit weight in the model: then its weights cannot hold a change, nor be saved as a model."""
    return any(is_quantized(p) for p in model.parameters())


def dense_weight(weight: torch.Tensor) -> torch.Tensor:
    """The matrix a weight computes with, on its device: a 4-bit weight dequantized (`[d, d_in]`, its
    original dtype), any other weight itself (detached)."""
    if not is_quantized(weight):
        return weight.detach()
    if getattr(weight.quant_state, "packing_format_for_cpu", False):
        raise UnsupportedArchitectureError(
            "a 4-bit weight was repacked by bitsandbytes' CPU kernel (bfloat16 block scales, its own layout), which "
            "bitsandbytes cannot turn back into the matrix it computes with: load 4-bit models on CUDA"
        )
    from bitsandbytes.functional import dequantize_4bit  # optional package (the quant extra): 4-bit models only

    return dequantize_4bit(weight.data, weight.quant_state)


def _matrix_writer(module: nn.Module, path: str, component: str, owner: str, hidden: int) -> Writer:
    """A Linear or Conv1D writer at `path` (relative to its layer), checked to write `hidden` wide."""
    module = _base(module)
    if type(module).__name__ == "Conv1D":  # transformers' GPT-2 layer: y = x @ W + b, W [d_in, d]
        transposed = True
    elif isinstance(module, nn.Linear):
        transposed = False
    else:
        raise UnsupportedArchitectureError(
            f"unsupported architecture {owner}: {path} is a {type(module).__name__}, not nn.Linear or Conv1D"
        )
    weight = module.weight
    shape = weight.quant_state.shape if is_quantized(weight) else weight.shape  # 4-bit: packed [n, 1] bytes
    if len(shape) != 2 or shape[0 if not transposed else 1] != hidden:
        raise UnsupportedArchitectureError(
            f"unsupported architecture {owner}: {path} ({type(module).__name__}) has weight {list(shape)}, "
            f"which does not write {hidden} wide ([d, d_in] for nn.Linear, [d_in, d] for Conv1D)"
        )
    return Writer(-1, component, path, module, weight, module.bias, transposed)


def _expert_writers(block: nn.Module, block_path: str, owner: str, hidden: int) -> list[Writer]:
    """Every expert's down projection in a mixture-of-experts block, fused or as separate modules."""
    experts = _get(block, "experts")
    if experts is None:
        return []
    experts, path = _base(experts), f"{block_path}.experts"
    for name in _FUSED_DOWN:
        weight = getattr(experts, name, None)
        if isinstance(weight, nn.Parameter):
            try:
                transposed = stored_input_first(block, experts, name, hidden)
            except ValueError as e:
                raise UnsupportedArchitectureError(f"unsupported architecture {owner}: {path}.{e}") from e
            bias = getattr(experts, name + BIAS_SUFFIX, None)
            return [Writer(-1, MLP_DOWN, f"{path}.{name}", experts, weight, bias, transposed)]
    if not isinstance(experts, (nn.ModuleList, nn.ModuleDict)):
        raise UnsupportedArchitectureError(
            f"unsupported architecture {owner}: {path} ({type(experts).__name__}) holds neither a fused 3-D "
            f"parameter ({', '.join(_FUSED_DOWN)}) nor a list of expert modules"
        )
    found = []
    for index, expert in experts.named_children():
        down = next((n for n in _EXPERT_DOWN if _get(expert, n) is not None), None)
        if down is None:
            raise UnsupportedArchitectureError(
                f"unsupported architecture {owner}: expert {path}.{index} ({type(expert).__name__}) has no down "
                f"projection (looked for {', '.join(_EXPERT_DOWN)})"
            )
        found.append(_matrix_writer(_get(expert, down), f"{path}.{index}.{down}", MLP_DOWN, owner, hidden))
    return found


def _mlp_writers(layer: nn.Module, owner: str, hidden: int) -> list[Writer]:
    """The dense MLP's down projection, or a mixture-of-experts block's experts and shared experts."""
    for path in _MLP_PATHS:
        module = _get(layer, path)
        if module is not None:
            return [_matrix_writer(module, path, MLP_DOWN, owner, hidden)]
    found = []
    for block_path in _MOE_BLOCKS:
        block = _get(layer, block_path)
        if block is None:
            continue
        found += _expert_writers(block, block_path, owner, hidden)
        for shared in _SHARED_EXPERTS:
            for down in _EXPERT_DOWN:
                module = _get(block, f"{shared}.{down}")
                if module is not None:
                    found.append(_matrix_writer(module, f"{block_path}.{shared}.{down}", MLP_DOWN, owner, hidden))
                    break
    if not found:
        raise UnsupportedArchitectureError(
            f"unsupported architecture {owner}: no {MLP_DOWN} projection found (looked for {', '.join(_MLP_PATHS)}, "
            f"and for experts at {', '.join(b + '.experts' for b in _MOE_BLOCKS)})"
        )
    return found


def residual_writers(layer: nn.Module, hidden: int, owner: str | None = None) -> list[Writer]:
    """The layer's writers, attention first; names are paths within the layer, `layer` is -1 and
    there are no gains (`writers` fills them in). `owner` is what error messages call the layer.

    Behind PEFT LoRA wrappers the original modules are returned, so edits reach the base weights.
    """
    owner = owner or type(layer).__name__
    path = next((p for p in _ATTN_PATHS if _get(layer, p) is not None), None)
    if path is None:
        raise UnsupportedArchitectureError(
            f"unsupported architecture {owner}: no {ATTN_OUT} projection found (looked for {', '.join(_ATTN_PATHS)})"
        )
    found = [_matrix_writer(_get(layer, path), path, ATTN_OUT, owner, hidden), *_mlp_writers(layer, owner, hidden)]
    holders = {w.name.split(".")[0] for w in found} | set(_READERS)
    unknown = [
        n for n, child in layer.named_children() if n not in holders and any(p.dim() >= 2 for p in child.parameters())
    ]
    if unknown:
        raise UnsupportedArchitectureError(
            f"unsupported architecture {owner}: its layer also holds {', '.join(unknown)}, which is neither an "
            f"attention ({', '.join(_ATTN_PATHS)}) nor an MLP ({', '.join(_MLP_PATHS)}, or experts) that clawly "
            "knows, and may write into the residual stream too"
        )
    return found


def writers(model: nn.Module) -> list[Writer]:
    """Every weight that writes into the residual stream, layer by layer, with its full name and the
    gain of a norm after it (errors name the model class and the layer)."""
    layers = decoder_layers(model)
    hidden = hidden_size(model)
    names = {id(m): n for n, m in model.named_modules()}
    out = []
    for i, layer in enumerate(layers):
        owner = f"{type(_unwrap(model)).__name__} (layer {i}, {type(layer).__name__})"
        gains = writer_gains(layer, hidden)
        for w in residual_writers(layer, hidden, owner):
            name = names[id(w.module)] + ("" if w.experts is None else "." + w.name.rpartition(".")[2])
            out.append(replace(w, layer=i, name=name, gain=gains[w.component]))
    return out


def writer_parameters(model: nn.Module, name: str) -> tuple[nn.Parameter, nn.Parameter | None]:
    """The weight and bias (or None) of the writer `writers` calls `name`."""
    try:
        module = model.get_submodule(name)
    except AttributeError:  # a fused expert stack: the name is the parameter's
        owner, _, attr = name.rpartition(".")
        return model.get_parameter(name), getattr(model.get_submodule(owner), attr + BIAS_SUFFIX, None)
    return module.weight, module.bias


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
            "norm (gain * x / rms(x)), so the ablated direction cannot be kept out of the residual stream"
        )
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
                f"unsupported architecture {type(layer).__name__}: it has {_POST_NORM_MARK} but no {path}"
            )
        out[component] = rms_norm_gain(norm, hidden)
    return out
