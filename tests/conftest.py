"""Shared fixtures: tiny random causal LMs built from a transformers config, with a word-level tokenizer.

The models are saved with `save_pretrained` (safetensors + config + tokenizer + chat template) so
tests exercise the real loading path offline. Weights are random (fixed seed): generated text is
degenerate, which is fine for testing mechanics.

Fixtures:
- `make_tiny_model(arch="llama", num_layers=2, hidden=32, tie=False) -> Path` (session cache);
- `build_tiny_model(arch=..., ...) -> (model, tokenizer)` in memory, same weights as the saved one;
- `tiny_model_dir` (llama; parametrize indirectly with an arch name), `tiny_qwen2_dir`;
- `tiny_gguf` -> (path of a tiny float32 Qwen2 .gguf, the model it holds): the GGUF path, offline;
- `tiny_model` -> (model, tokenizer) loaded through `clawly.model.load_model` on CPU;
- `postgres_url`, `slurm_cluster`: a real PostgreSQL server and Slurm cluster on 127.0.0.1
  (tests/services.py; a test that asks for one fails when it cannot be started).

Parallel: `pytest` runs on pytest-xdist's workers (`-n auto --dist loadgroup`, pyproject.toml), each
with its share of torch's CPU threads; the tests that use the services share one worker (group
`services`), so the servers start once. `-n 0` runs in one process.

Markers: a test that uses `postgres_url` or `slurm_cluster` is marked `services` and `slow`, and one
marked `browser` is marked `slow`, at collection: the quick loop (`pytest -m "not slow"`) needs no
root, no servers and no browser; plain `pytest` (CI) runs them all.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from services import postgres_url, slurm_cluster  # noqa: F401  (session fixtures, one per run)

SEED = 1234

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "<|im_start|>", "<|im_end|>"]
PAD, UNK, BOS, IM_START, IM_END = SPECIAL_TOKENS

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Lower-cased (the tokenizer lower-cases its input); broad enough that typical test prompts,
# harmful and harmless, map mostly to known words.
_WORDS = """
system user assistant
a an the this that these those it its i me my you your he she him her his we us our they them their
what which who whom whose why how when where there here
is are was were be been being am do does did done doing have has had having can could will would
shall should may might must not no yes and or but if then else so because than as of to in on at by
for with without from into onto about over under after before between through during up down out off
again also only just very too more most less least much many some any all each every few other another
such same own both either neither one two three four five six seven eight nine ten first last next new
old good bad best worst big small long short high low right wrong true false easy hard simple safe
dangerous legal illegal quick slow free please thanks thank sorry hello hi ok okay sure help helpful
make made build create write explain describe tell give show find get use used using need want know
learn teach try start stop keep let take put run go come see look think say said ask answer work
play read list sort reverse print call return open close buy sell pay steal kill hurt harm attack
hack break cheat lie spy track hide avoid bypass disable crack destroy poison burn threaten scam
fake forge smuggle rob kidnap cook bake grow plant clean fix change improve save plan travel visit
summarize translate compare calculate convert count add remove delete check test compute solve
python code program function class method variable string number integer loop file data database
script software computer website web email password account server network system virus malware
phone app language english french math question example step steps way ways guide tutorial tips idea
ideas list dictionary array error bug key value name text word words sentence story poem song essay
letter article book recipe cake bread pasta soup food meal dinner water coffee tea fruit apple
garden tree flower dog cat animal bird fish money bank card credit tax job business company market
price person people friend family child children kid kids man woman someone somebody anyone everyone
home house car bike road city country world school student teacher history science health doctor
medicine drug drugs pill pills weapon weapons gun guns bomb bombs explosive explosives knife chemical
chemicals gas fire police law crime government election vote news music movie game sport sports
time day days week year years today tomorrow night morning minute hour life body mind heart brain
weather sun rain snow sea river mountain space planet earth moon energy power light color red blue
green black white birthday party gift holiday weekend vacation exercise sleep diet weight meditation
homework exam resume interview meeting schedule budget
don doesn didn isn aren wasn won cannot let
hate violence violent threat threats abuse illegally instructions detailed details information secret
private personal identity steal stealing hacking making building writing killing someone's
manipulate blackmail extort launder laundering counterfeit fraud phishing ransomware exploit
lock locks door security camera alarm shop store bypassing
refusal compliance off degenerate
"""
WORDS = list(dict.fromkeys(_WORDS.split()))
PUNCTUATION = [".", ",", "?", "!", "'", '"', ":", ";", "-", "(", ")", "s", "t", "re", "ll", "ve", "d", "m"]
DIGITS = [str(d) for d in range(10)]
VOCAB = SPECIAL_TOKENS + list(dict.fromkeys(WORDS + PUNCTUATION + DIGITS))


def build_tokenizer():
    """A word-level PreTrainedTokenizerFast over VOCAB with chat-template special tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token=UNK))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces, tidies punctuation
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=IM_END,
        pad_token=PAD,
        unk_token=UNK,
        chat_template=CHAT_TEMPLATE,
    )


def tiny_config(arch: str = "llama", num_layers: int = 2, hidden: int = 32, tie: bool = False):
    """A transformers config for a tiny model of `arch` over VOCAB (4 heads, 2 KV heads; mixture-of-experts
    archs: 4 experts, 2 per token; "gemma3": the multimodal wrapper around a gemma3_text model)."""
    from transformers import AutoConfig

    common = dict(
        vocab_size=len(VOCAB),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=tie,
        bos_token_id=VOCAB.index(BOS),
        eos_token_id=VOCAB.index(IM_END),
        pad_token_id=VOCAB.index(PAD),
    )
    extra = {
        "llama": {},
        "qwen2": {"use_sliding_window": False},
        "qwen3": {"head_dim": hidden // 4},
        "mistral": {"sliding_window": None},
        "gemma": {"head_dim": hidden // 4},
        "gemma2": {"head_dim": hidden // 4, "query_pre_attn_scalar": hidden // 4},
        "gemma3_text": {"head_dim": hidden // 4, "query_pre_attn_scalar": hidden // 4},
        "phi3": {"pad_token_id": VOCAB.index(PAD)},
        "olmo2": {},
        "opt": {"ffn_dim": 2 * hidden, "word_embed_proj_dim": hidden},  # biased writers
        "gpt_neox": {},  # biased writers, parallel residual
        # mixture of experts: 4 experts, 2 per token; fused [E, d, d_in] stacks, qwen2_moe's square
        "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
        "qwen2_moe": {
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": hidden,
            "shared_expert_intermediate_size": hidden,
        },
        "qwen3_moe": {
            "head_dim": hidden // 4,
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": hidden // 2,
        },
        # fused [E, d_in, d] stack, square as in the real model (2880 x 2880), biased experts and attention
        "gpt_oss": {
            "head_dim": hidden // 4,
            "intermediate_size": hidden,
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
            "sliding_window": 8,
            "layer_types": ["sliding_attention", "full_attention"] * (num_layers // 2)
            + ["sliding_attention"] * (num_layers % 2),
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        },
    }
    if arch == "gpt2":
        return AutoConfig.for_model(
            "gpt2",
            vocab_size=len(VOCAB),
            n_embd=hidden,
            n_layer=num_layers,
            n_head=4,
            n_positions=512,
            bos_token_id=common["bos_token_id"],
            eos_token_id=common["eos_token_id"],
            tie_word_embeddings=tie,
        )
    if arch == "gemma3":  # the multimodal wrapper: a tiny SigLIP vision tower around a gemma3_text model
        text = tiny_config("gemma3_text", num_layers, hidden, tie)
        vision = {
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 28,
            "patch_size": 14,
        }
        return AutoConfig.for_model(
            "gemma3",
            text_config=text.to_dict(),
            vision_config=vision,
            mm_tokens_per_image=4,
            tie_word_embeddings=tie,
            **{k: common[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")},
        )
    if arch not in extra:
        raise ValueError(f"no tiny config for arch {arch!r}; known: gpt2, gemma3, {', '.join(extra)}")
    return AutoConfig.for_model(arch, **{**common, **extra[arch]})


def build_tiny_model(arch: str = "llama", num_layers: int = 2, hidden: int = 32, tie: bool = False):
    """(model, tokenizer) with random weights from a fixed seed: the same call gives the same weights."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(arch, num_layers, hidden, tie)
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # biases start at zero; real models' do not, and a zero bias hides bugs
        for name, param in model.named_parameters():
            if name.endswith((".bias", "_bias")) and "norm" not in name:  # and experts' [E, d] (gpt-oss)
                param.normal_(0.0, 0.1)
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = VOCAB.index(PAD)
    model.generation_config.bos_token_id = VOCAB.index(BOS)
    model.eval()
    return model, build_tokenizer()


def _byte_level_alphabet() -> list[str]:
    """GPT-2's byte-to-unicode table: the 256 base tokens of a byte-level BPE vocab."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("\u00a1"), ord("\u00ac") + 1),
        *range(ord("\u00ae"), ord("\u00ff") + 1),
    ]
    shifted = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(shifted)) for b in range(256)]


def write_tiny_gguf(path: Path, num_layers: int = 2, hidden: int = 32):
    """Write a tiny float32 Qwen2 GGUF (byte-level BPE tokenizer, chat template) to `path`.

    Returns the in-memory model the GGUF holds, to compare logits against after conversion.
    """
    import gguf
    from transformers import AutoModelForCausalLM

    tokens = _byte_level_alphabet() + ["\u0120t", "he", "\u0120the", "<|endoftext|>", IM_START, IM_END]
    config = tiny_config("qwen2", num_layers, hidden)
    config.vocab_size = len(tokens)
    config.bos_token_id = config.pad_token_id = len(tokens) - 3
    config.eos_token_id = len(tokens) - 1
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()

    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_name("tiny qwen2")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(hidden)
    writer.add_block_count(num_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(10000.0)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.NORMAL] * (len(tokens) - 3) + [gguf.TokenType.CONTROL] * 3)
    writer.add_token_merges(["\u0120 t", "h e", "\u0120t he"])
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_pad_token_id(config.pad_token_id)
    writer.add_eos_token_id(config.eos_token_id)
    writer.add_chat_template(CHAT_TEMPLATE)
    top = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
    per_layer = {
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    for name, tensor in model.state_dict().items():
        module, kind = name.rsplit(".", 1)
        if module in top:
            gguf_name = f"{top[module]}.{kind}"
        else:
            index, rest = module.removeprefix("model.layers.").split(".", 1)
            gguf_name = f"blk.{index}.{per_layer[rest]}.{kind}"
        writer.add_tensor(gguf_name, tensor.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model


def _hypothesis_profiles() -> None:
    """Property tests draw the same examples on every run (CI stays deterministic); set
    HYPOTHESIS_PROFILE=explore to draw new ones."""
    from hypothesis import settings

    settings.register_profile("repeatable", derandomize=True, database=None)
    settings.register_profile("explore", max_examples=500)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))


_hypothesis_profiles()


SERVICE_FIXTURES = ("postgres_url", "slurm_cluster")  # tests/services.py: root, Debian's PostgreSQL and Slurm


def pytest_configure(config: pytest.Config) -> None:
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:  # pytest-xdist: each worker gets its share of the CPU threads, not all of them
        torch.set_num_threads(max(1, torch.get_num_threads() // workers))
    config.addinivalue_line(
        "markers", "slow: needs the real packaged model, long runs, the services or a browser (deselect: -m 'not slow')"
    )
    config.addinivalue_line("markers", "gpu: needs CUDA; skipped when it is not available")
    config.addinivalue_line(
        "markers",
        "services: needs the real PostgreSQL/Slurm of .ci/services (root); fails, never skips, without "
        "them; set on every test using postgres_url or slurm_cluster, which are slow too",
    )
    config.addinivalue_line("markers", "browser: drives a real browser (Debian's chromium); slow too")


@pytest.hookimpl(tryfirst=True)  # before -m deselects: the markers added here count
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        services = set(SERVICE_FIXTURES) & set(getattr(item, "fixturenames", ()))
        if services:
            item.add_marker(pytest.mark.services)
            item.add_marker(pytest.mark.xdist_group("services"))  # one worker starts the servers, once
        if services or item.get_closest_marker("browser") is not None:
            item.add_marker(pytest.mark.slow)
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def make_tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory: save a tiny model + tokenizer to a temp dir and return the dir (cached per arguments).

    The directories are shared across the session: copy one before changing files in it.
    """
    made: dict[tuple, Path] = {}

    def make(arch: str = "llama", num_layers: int = 2, hidden: int = 32, tie: bool = False) -> Path:
        key = (arch, num_layers, hidden, tie)
        if key not in made:
            model, tokenizer = build_tiny_model(arch, num_layers, hidden, tie)
            path = tmp_path_factory.mktemp(f"tiny-{arch}-{num_layers}x{hidden}{'-tied' if tie else ''}")
            model.save_pretrained(path)
            tokenizer.save_pretrained(path)
            made[key] = path
        return made[key]

    return make


@pytest.fixture(name="build_tiny_model")
def build_tiny_model_fixture() -> Callable[..., tuple]:
    """The in-memory builder, for tests that compare against a saved copy."""
    return build_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(request: pytest.FixtureRequest, make_tiny_model: Callable[..., Path]) -> Path:
    """A saved tiny model dir; llama unless parametrized indirectly with an arch name."""
    return make_tiny_model(getattr(request, "param", "llama"))


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    """(path of a tiny float32 Qwen2 .gguf file, the in-memory model it holds)."""
    path = tmp_path_factory.mktemp("tiny-gguf") / "tiny-qwen2-f32.gguf"
    return path, write_tiny_gguf(path)


@pytest.fixture(scope="session")
def tiny_qwen2_dir(make_tiny_model: Callable[..., Path]) -> Path:
    return make_tiny_model("qwen2")


@pytest.fixture
def tiny_model(tiny_model_dir: Path):
    """(model, tokenizer) loaded from `tiny_model_dir` through clawly's own loader, on CPU."""
    from clawly.model.loading import load_model
    from clawly.settings import ModelSettings

    return load_model(ModelSettings(name=str(tiny_model_dir), device="cpu"))


def saved_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every weight of a saved model directory (all its shards), without clawly's own files."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        if not f.name.startswith("clawly_"):
            out.update(load_file(str(f)))
    return out


class LiveRows:
    """Counts, at every forward pass of `model` inside the block, the rows of live tensors `[..., *tail]`
    with at least one leading dimension (e.g. `tail=(vocab,)` for log-probs, `(P, d)` for residuals;
    a `[P, d]` mean is no row), found through the garbage collector, each storage counted once (a view
    keeps its whole base alive). `peak` is the
    most seen at once: memory that grows with the prompt count shows as a peak that grows with it."""

    def __init__(self, model: torch.nn.Module, tail: tuple[int, ...]):
        self.model, self.tail, self.peak, self.handle = model, tuple(tail), 0, None

    def rows(self) -> int:
        import gc
        import math

        width = math.prod(self.tail)
        storages: dict[int, int] = {}
        for o in gc.get_objects():
            if (
                isinstance(o, torch.Tensor)
                and not isinstance(o, torch.nn.Parameter)
                and o.dim() > len(self.tail)
                and tuple(o.shape[-len(self.tail) :]) == self.tail
            ):
                st = o.untyped_storage()
                storages[st.data_ptr()] = st.nbytes() // (width * o.element_size())
        return sum(storages.values())

    def _hook(self, module, args, kwargs) -> None:
        self.peak = max(self.peak, self.rows())

    def __enter__(self) -> LiveRows:
        self.handle = self.model.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        self.peak = max(self.peak, self.rows())
        self.handle.remove()
