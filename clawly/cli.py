"""`clawly MODEL`: the whole job in one command, over the `Pipeline` API.

Every config key is an option (`--optimize.n-trials 30`, or `--n-trials 30` where the key is in one
section only), generated from the settings' own fields, defaults and help. Settings are layered:
defaults < `--config FILE` (YAML or TOML, the keys of params.yaml) < `--category-preset NAME` <
options < MODEL. Without a terminal (or with `--non-interactive`) the run saves the chosen trial;
in a terminal the user picks a trial, saves, uploads or chats with it.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import re
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import yaml

from clawly.errors import ClawlyError
from clawly.log import get_logger
from clawly.paths import Paths, project_file
from clawly.settings import REFUSAL_MEASURES, SECTIONS, Settings, SettingsError, dotted_keys, key_sections
from clawly.settings_docs import HELP
from clawly.settings_docs import SECTIONS as SECTION_DOCS

KEY = "key:"  # argparse dest prefix of config-key options: "key:optimize.n_trials"
SAVE_KINDS = ("both", "model", "adapter", "none")

EXAMPLES = """examples:
  clawly                                     the packaged Qwen2.5-Coder-0.5B-Instruct, 16 trials
  clawly Qwen/Qwen2.5-1.5B-Instruct --n-trials 50 --output out
  clawly MODEL --category-preset default     uncensor violence, drugs, adult content; keep self-harm
  clawly MODEL --layers 8-16 --use-layer 12 --ablation-strength 1.0    direct mode, no optimization
  clawly MODEL --config my.yaml --non-interactive --push-to-hub me/model-abliterated
  clawly --reproduce out/model/clawly_reproduction.json --output rebuilt
  clawly MODEL --category-preset default --print-residual-geometry --plot-residuals views
"""


# ---------------------------------------------------------------- options from the settings


def _metavar(annotation: str) -> str:
    base = annotation.split("|")[0].strip().split("[")[0]
    return {"int": "INT", "float": "NUMBER", "str": "TEXT", "list": "LIST", "dict": "MAP"}.get(base, "VALUE")


def config_options() -> list[tuple[str, dataclasses.Field]]:
    """(dotted key, field) of every config key, in section order."""
    return [(f"{section}.{f.name}", f) for section, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


def _default_text(f: dataclasses.Field) -> str:
    value = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
    return (
        "null"
        if value is None
        else yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix("...").strip()
    )


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad command line is one line (no usage block), an abbreviation is never taken
    for an option, and a misspelled option gets the closest one suggested."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message: str) -> NoReturn:
        unknown = re.match(r"unrecognized arguments: (.*)", message)
        if unknown:
            options = [o for action in self._actions for o in action.option_strings]
            words = unknown.group(1).split()
            words = [w for w in words if w.startswith("-")] or words  # an unknown option's value is no news
            hints = [
                f"{w} (did you mean {close[0]}?)"
                if (close := difflib.get_close_matches(w.split("=")[0], options, n=1, cutoff=0.75))
                else w
                for w in words
            ]
            message = f"unknown option{'s' if len(words) > 1 else ''} {', '.join(hints)}"
        self.exit(2, f"{self.prog}: error: {message} ({self.prog} --help lists every option)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="clawly",
        usage="clawly [MODEL] [options]   (clawly --help lists every option)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EXAMPLES,
        description="Remove refusal behaviour from a language model by directional ablation, optionally per harm "
        "category, with the ablation parameters searched by Optuna.",
    )
    parser.add_argument(
        "model",
        nargs="?",
        default=None,
        metavar="MODEL",
        help="'default' (the packaged Qwen2.5-Coder-0.5B-Instruct), a Hub id, a model directory or "
        "a .gguf file [default: default]",
    )
    run = parser.add_argument_group("run")
    run.add_argument(
        "--config",
        metavar="FILE",
        help="YAML or TOML file with settings (the keys of params.yaml: "
        "sections, or dotted/flat keys; category_preset = NAME too) "
        "[default: config.toml in the working directory, if any]",
    )
    run.add_argument(
        "--category-preset",
        metavar="NAME",
        help="category weights from clawly/conf/preset/NAME.yaml (or a YAML file path), e.g. default, full",
    )
    run.add_argument(
        "--output",
        metavar="DIR",
        default="clawly-output",
        help="where the adapter, merged model and work files go [default: clawly-output]",
    )
    run.add_argument(
        "--save",
        choices=SAVE_KINDS,
        default="both",
        help="what a non-interactive run saves: both, model (merged), adapter, none [default: both]",
    )
    run.add_argument(
        "--non-interactive",
        action="store_true",
        help="never ask: save the rule's chosen trial and exit (the default without a terminal)",
    )
    run.add_argument(
        "--push-to-hub",
        metavar="REPO_ID",
        help="upload the saved model (the adapter with --save "
        "adapter) to this Hub repo; token from HF_TOKEN or "
        "`hf auth login`",
    )
    run.add_argument("--hub-private", action="store_true", help="create the Hub repo private")
    run.add_argument("--debug", action="store_true", help="show the traceback of an error (as CLAWLY_DEBUG=1 does)")
    run.add_argument(
        "--reproduce",
        metavar="FILE",
        help="rebuild a saved result from its clawly_reproduction.json into --output, then exit",
    )
    direct = parser.add_argument_group("direct mode (no optimization: ablate exactly this)")
    direct.add_argument("--layers", metavar="A-B", help="decoder layers to ablate: 'all', N or an inclusive range A-B")
    direct.add_argument(
        "--use-layer",
        type=int,
        metavar="N",
        help="ablate the direction probed at the output of "
        "decoder layer N in every layer [default: each "
        "layer its own direction]",
    )
    direct.add_argument(
        "--ablation-strength",
        type=float,
        metavar="NUMBER",
        help="ablation weight in the chosen layers (1 removes the direction) [default: 1.0]",
    )
    direct.add_argument(
        "--probe-marker",
        metavar="TEXT",
        help="probe the residual at this marker instead of the last "
        "prompt token ('auto': the chat template's generation "
        "prompt); sets probe.position=marker",
    )
    research = parser.add_argument_group(
        "research views (probe and compute the directions, show, exit; no optimization)"
    )
    research.add_argument(
        "--print-residual-geometry",
        action="store_true",
        help="print per probe point the norms and cosines of the means and the refusal direction, "
        "the silhouettes (harmful vs harmless, between categories) and the category-direction "
        "cosines",
    )
    research.add_argument(
        "--plot-residuals",
        metavar="DIR",
        help="write PaCMAP projections of the residuals into DIR: "
        "residuals.html (a slider over the probe points) "
        "and PNGs (needs the research extra)",
    )
    owners = key_sections()
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(f"{section} settings", SECTION_DOCS[section])
        for f in dataclasses.fields(cls):
            flags = [f"--{section}.{f.name.replace('_', '-')}"]
            if len(owners[f.name]) == 1 and not (section == "model" and f.name == "name"):
                flags.append(f"--{f.name.replace('_', '-')}")  # unambiguous: also without its section
            help_text = f"{HELP[f'{section}.{f.name}']} [default: {_default_text(f)}]".replace("%", "%%")
            if str(f.type) == "bool":
                group.add_argument(
                    *flags,
                    dest=f"{KEY}{section}.{f.name}",
                    action=argparse.BooleanOptionalAction,
                    default=argparse.SUPPRESS,
                    help=help_text,
                )
            else:
                group.add_argument(
                    *flags,
                    dest=f"{KEY}{section}.{f.name}",
                    default=argparse.SUPPRESS,
                    metavar=_metavar(str(f.type)),
                    help=help_text,
                )
    parser.add_argument(
        "--artifacts-dir",
        dest=f"{KEY}artifacts_dir",
        default=argparse.SUPPRESS,
        metavar="DIR",
        help="work files (activations, directions, study) [default: OUTPUT/work]",
    )
    return parser


def parse_value(text: str, annotation: str, key: str) -> Any:
    """A command-line string as the value a field of this annotation takes (validated later)."""
    kinds = [k.strip() for k in annotation.split("|")]
    if "None" in kinds and text.strip().lower() in ("null", "none", "~"):
        return None
    if kinds[0] == "str":
        return text
    if kinds[0].startswith("list") and not text.lstrip().startswith("["):
        return [parse_value(part.strip(), kinds[0][5:-1], key) for part in text.split(",") if part.strip()]
    if kinds[0].startswith("dict") and "=" in text and not text.lstrip().startswith("{"):
        pairs = [part.split("=", 1) for part in text.split(",") if part.strip()]
        return {k.strip(): yaml.safe_load(v) for k, v in pairs}
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SettingsError(
            f"invalid setting {key}={text!r}: not a value (a number, true/false, [a, b] or {{key: value}})"
        ) from e


# ---------------------------------------------------------------- settings from files and options

PRESET_KEY = "category_preset"  # a config file's preset (Clawly's key): applied as --category-preset NAME is
WORKING_DIR_CONFIG = "config.toml"  # read from the working directory when --config is not given (Heretic, Clawly)


def config_keys(values: dict[str, Any]) -> dict[str, Any]:
    """A config file's settings as {"section.key": value}; Hydra's own keys (params.yaml) are skipped,
    and a `category_preset` is kept as it is (see `file_values`)."""
    values = {k: v for k, v in (values or {}).items() if k not in ("defaults", "hydra")}
    preset = values.pop(PRESET_KEY, None)
    return {**dotted_keys(values), **({PRESET_KEY: preset} if preset is not None else {})}


def read_config(path: str) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise ClawlyError(f"--config {path}: file not found")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ClawlyError(
            f"--config {path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}): save it as UTF-8"
        ) from e
    try:
        if file.suffix.lower() == ".toml":
            data = tomllib.loads(text)
        else:
            data = yaml.safe_load(text) or {}
    except Exception as e:  # noqa: BLE001 - yaml and toml errors: one line naming the file
        raise ClawlyError(
            f"--config {path}: not valid {'TOML' if file.suffix.lower() == '.toml' else 'YAML'}: "
            f"{' '.join(str(e).split())}"
        ) from e
    if not isinstance(data, dict):
        raise ClawlyError(f"--config {path}: expected a mapping of settings, got {type(data).__name__}")
    return config_keys(data)


def read_preset(name: str) -> dict[str, Any]:
    """clawly/conf/preset/NAME.yaml (from the working directory, else clawly's checkout), or a YAML file path."""
    path = Path(name) if name.endswith((".yaml", ".yml")) else project_file(f"clawly/conf/preset/{name}.yaml")
    if path.is_file():
        return config_keys(yaml.safe_load(path.read_text(encoding="utf-8")))
    shipped = (
        sorted(p.stem for p in project_file("clawly/conf/preset").glob("*.yaml"))
        if project_file("clawly/conf/preset").is_dir()
        else []
    )
    raise ClawlyError(
        f"--category-preset {name}: no such preset; available: {', '.join(shipped) or 'none found'} "
        "(or pass a YAML file)"
    )


def file_values(config: str | None, preset: str | None, say: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The settings of `--config FILE` (without one, `config.toml` in the working directory when there
    is one: `say` is told so), then the preset over them, `--category-preset NAME` or the file's own
    `category_preset` (dotted keys)."""
    values: dict[str, Any] = {}
    if config is None and Path(WORKING_DIR_CONFIG).is_file():
        config = WORKING_DIR_CONFIG
        (say or (lambda text: print(text, file=sys.stderr)))(
            f"reading settings from {Path(WORKING_DIR_CONFIG).resolve()} (--config FILE reads another)"
        )
    if config:
        values.update(read_config(config))
    preset = preset or values.pop(PRESET_KEY, None)
    values.pop(PRESET_KEY, None)
    if preset:
        values.update(read_preset(preset))
    return values


def output_settings(values: dict[str, Any], model: str | None, output: str | Path) -> Settings:
    """Settings of a run writing under `output`: MODEL over everything, work files in OUTPUT/work
    (prompts in OUTPUT/work/prompts) unless the values place them."""
    values = dict(values)
    if model is not None:
        values["model.name"] = model
    values.setdefault("artifacts_dir", str(Path(output) / "work"))
    values.setdefault("data.out_dir", str(Path(values["artifacts_dir"]) / "prompts"))
    return Settings(**values)


def settings_from_args(args: argparse.Namespace) -> Settings:
    values = file_values(args.config, args.category_preset)
    fields = dict(config_options())
    for dest, text in vars(args).items():
        if not dest.startswith(KEY):
            continue
        key = dest[len(KEY) :]
        if key == "artifacts_dir" or isinstance(text, bool):
            values[key] = text
        else:
            values[key] = parse_value(text, str(fields[key].type), key)
    if args.probe_marker is not None:
        values["probe.position"] = "marker"
        values["probe.marker"] = None if args.probe_marker == "auto" else args.probe_marker
    return output_settings(values, args.model, args.output)


def parse_layers(text: str, num_layers: int) -> tuple[int, int]:
    text = text.strip().lower()
    try:
        if text == "all":
            return 0, num_layers - 1
        lo, _, hi = text.partition("-")
        return int(lo), int(hi or lo)
    except ValueError as e:
        raise ClawlyError(f"--layers {text!r}: use 'all', a layer N or an inclusive range A-B (e.g. 8-16)") from e


# ---------------------------------------------------------------- the run


def front_table(pipe, chosen: int | None) -> str:
    n = pipe.search.scored_prompts
    lines = [
        f"{'trial':>6}  {'refusals':>9}  {'KL':>8}",
        f"{'base':>6}  {pipe.search.base_refusals:>4}/{n:<4}  {0:>8.4f}",
    ]
    for t in pipe.get_pareto_front():
        mark = "  <- chosen by the rule" if t.index == chosen else ""
        lines.append(f"{t.index:>6}  {t.refusals:>4}/{n:<4}  {t.kl_divergence:>8.4f}{mark}")
    return "\n".join(lines)


def save(pipe, out: Path, kind: str, say: Callable[[str], None]) -> list[Path]:
    from clawly.ablate.lora import AdapterUnsupportedError  # deferred with the engine (see run)

    saved = []
    if kind in ("both", "adapter"):
        try:
            saved.append(pipe.save_adapter(out / "adapter"))
            say(f"saved the LoRA adapter to {saved[-1]}")
        except AdapterUnsupportedError as e:
            if kind == "adapter":
                raise
            say(f"no LoRA adapter: {e}")
    if kind in ("both", "model"):
        saved.append(pipe.save_model(out / "model"))
        say(f"saved the merged model to {saved[-1]}")
    return saved


def upload(folder: Path, repo_id: str, private: bool, say: Callable[[str], None]) -> None:
    from clawly.save.hub import push_to_hub  # deferred with the engine (below): huggingface_hub is slow to import

    url = push_to_hub(folder, repo_id, private=private)
    say(f"uploaded {folder} to {url}")


def chat(pipe, ask: Callable[[str], str], say: Callable[[str], None], max_new_tokens: int = 256) -> None:
    """Talk to the model as it is now (the restored trial) until an empty line or /exit."""
    messages: list[dict[str, str]] = []
    say("chat with the model (empty line or /exit to stop)")
    while True:
        text = ask("you> ").strip()
        if not text or text == "/exit":
            return
        messages.append({"role": "user", "content": text})
        reply = ""
        for reply in pipe.chat(messages, max_new_tokens):  # noqa: B007 - the stream's last text is the answer
            pass
        messages.append({"role": "assistant", "content": reply})
        say(f"model> {reply}")


def interact(
    pipe, args: argparse.Namespace, chosen: int | None, ask: Callable[[str], str], say: Callable[[str], None]
) -> None:
    """Pick a trial, then save, upload or chat with it, until the user quits."""
    out = Path(args.output)
    while True:
        default = "" if chosen is None else f", Enter = {chosen}"
        answer = ask(f"trial to use (a number from the table{default}, q = quit): ").strip().lower()
        if answer in ("q", "quit"):
            return
        if answer or chosen is not None:
            try:
                trial = pipe.restore_trial(int(answer) if answer else chosen)
            except (ValueError, ClawlyError) as e:
                say(f"not a trial: {answer!r} ({e})" if isinstance(e, ClawlyError) else f"not a number: {answer!r}")
                continue
            say(f"the model now holds {trial}")
        while True:
            action = (
                ask(
                    "[a] save adapter  [m] save merged model  [u] upload to the Hub  [c] chat  "
                    "[t] another trial  [q] quit: "
                )
                .strip()
                .lower()
            )
            if action == "a":
                save(pipe, out, "adapter", say)
            elif action == "m":
                save(pipe, out, "model", say)
            elif action == "u":
                repo = ask("Hub repo id (user/name): ").strip()
                if repo:
                    folder = save(pipe, out, "model", say)[0]
                    try:
                        upload(folder, repo, args.hub_private, say)
                    except ClawlyError as e:
                        say(f"error: {e}")
            elif action == "c":
                chat(pipe, ask, say)
            elif action == "t":
                break
            elif action in ("q", "quit"):
                return
            else:
                say(f"unknown choice {action!r}")


def run(args: argparse.Namespace, ask: Callable[[str], str] = input, say: Callable[[str], None] = print) -> int:
    # The engine (torch, transformers, peft) takes seconds to import: deferred to here, so --help and
    # a bad option answer at once.
    from clawly.api import Pipeline
    from clawly.model.architecture import num_layers as decoder_layer_count

    out = Path(args.output)
    if args.reproduce:
        log = get_logger("clawly", out / "logs")
        record = Path(args.reproduce)
        kind = _record_kind(record)
        path = Pipeline.reproduce(record, out / kind, log)
        say(f"rebuilt the {kind} from {record} into {path}")
        return 0
    settings = settings_from_args(args)
    if args.plot_residuals:  # before the model loads: a missing extra is said at once
        from clawly.ablate.research import require_research_extra  # deferred: see above (torch)

        require_research_extra()
    log = get_logger("clawly", Path(settings.artifacts_dir) / "logs")
    pipe = Pipeline(settings, log=log)
    pipe.load_model()
    direct = args.layers is not None or args.use_layer is not None or args.ablation_strength is not None
    pipe.compute_refusal_directions()
    if args.print_residual_geometry or args.plot_residuals:
        return research_views(pipe, args, say)
    chosen = None
    if direct:
        num_layers = decoder_layer_count(pipe.model)
        layers = parse_layers(args.layers, num_layers) if args.layers else None
        strength = 1.0 if args.ablation_strength is None else args.ablation_strength
        pipe.restore_trial(pipe.direct_plan(layers, args.use_layer, strength))
        scored = pipe.score()
        n = pipe.search.scored_prompts
        label = REFUSAL_MEASURES[pipe.settings.optimize.refusal_measure][0]
        say(
            f"direct mode: {scored.refusals}/{n} {label} (base {pipe.search.base_refusals}/{n}), "
            f"KL {scored.kl_divergence:.4f}"
        )
    else:
        for _ in pipe.run_optimization_iter():  # each trial is logged, with a progress bar
            pass
        pipe.write_outputs()
        chosen = pipe.choose_trial().index
        label = REFUSAL_MEASURES[pipe.settings.optimize.refusal_measure][0]
        say(f"Pareto front ({label} on the optimizer's harmful prompts, first-token KL on harmless ones):")
        say(front_table(pipe, chosen))
    interactive = not args.non_interactive and sys.stdin.isatty()
    if interactive:
        interact(pipe, args, chosen, ask, say)
        return 0
    if not direct:
        pipe.restore_trial(chosen)
        say(f"using {pipe.trial}")
        if pipe.settings.distill.enabled:
            pipe.distill()
            say(f"distilled the adapter ({pipe.settings.distill.steps} steps from the global change)")
    saved = save(pipe, out, args.save, say)
    if args.push_to_hub:
        if not saved:
            raise ClawlyError("--push-to-hub needs something saved: drop --save none")
        upload(saved[-1], args.push_to_hub, args.hub_private, say)
    say(f"work files (prompts, directions, study, trials table, Pareto plot) are in {settings.artifacts_dir}")
    return 0


GEOMETRY_COLUMNS = [  # (column, heading): the terminal table; geometry.csv has every column
    ("probe_point", "point"),
    ("harmful_mean_norm", "|harmful|"),
    ("harmless_mean_norm", "|harmless|"),
    ("difference_norm", "|difference|"),
    ("cos_harmful_harmless", "cos(harmful, harmless)"),
    ("cos_harmful_direction", "cos(harmful, r)"),
    ("cos_harmless_direction", "cos(harmless, r)"),
    ("cos_direction_previous", "cos(r, previous r)"),
    ("silhouette", "silhouette"),
    ("category_silhouette", "silhouette by category"),
    ("category_cosine_mean", "mean cos between categories"),
]


def geometry_table(table) -> Any:
    """The residual geometry as a rich table (NaN shown as a dash)."""
    from rich.table import Table  # deferred: only this view draws a table

    shown = [(c, h) for c, h in GEOMETRY_COLUMNS if c in table]
    out = Table(
        title="Residual geometry per probe point (0 = embeddings, l + 1 = output of decoder layer l; "
        "r = refusal direction)",
        title_justify="left",
    )
    for _, heading in shown:
        out.add_column(heading, justify="right")
    for _, row in table.iterrows():
        out.add_row(
            *[
                str(int(row[c])) if c == "probe_point" else "-" if row[c] != row[c] else f"{row[c]:.3f}"
                for c, _ in shown
            ]
        )
    return out


def research_views(pipe, args: argparse.Namespace, say: Callable[[str], None]) -> int:
    """--print-residual-geometry and --plot-residuals: show, write, exit."""
    table = pipe.residual_geometry()
    if args.print_residual_geometry:
        from rich.console import Console  # deferred: only this view draws

        Console(width=max(160, len(table.columns) * 12), soft_wrap=False).print(geometry_table(table))
        say(f"every column, per category too: {Paths.of(pipe.settings).geometry_csv}")
    if args.plot_residuals:
        files = pipe.plot_residuals(args.plot_residuals)
        say(f"wrote {len(files)} files into {args.plot_residuals}: " + ", ".join(f.name for f in files))
    return 0


def _record_kind(record: Path) -> str:
    from clawly.save.export import read_record  # deferred: see run()

    return read_record(record)[0].get("kind", "model")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return run(args)
    except ClawlyError as e:
        if args.debug or os.environ.get("CLAWLY_DEBUG"):
            raise
        print(f"clawly: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("clawly: interrupted; run the same command again to resume the optimization", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
