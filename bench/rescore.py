"""Re-score saved models on held-out prompts neither optimizer saw, with one scorer for all:
greedy answers of --max-new-tokens tokens, labelled by the five-way measure (refusal, hedged,
compliance, off-topic, degenerate: `clawly.measure.stance`), with keyword refusals by clawly's
markers and by Heretic's markers beside it, and first-token KL on held-out harmless prompts against
the base model. Answers are decoded to the full budget: a refusal followed by the help is labelled
by what follows, not cut at the marker.

A model is a merged model directory or a PEFT adapter directory (`adapter_config.json`: applied to
the base model and merged). A model scored before, under any name, with the same weights, prompts
and answer budget (its `fingerprint`) is not scored again: its figures and answers are copied from
--out and --responses, so a stopped re-score resumes and a later run re-scores only new models.
Models in --out that this run does not name stay there when they were scored the same way (the
`scoring` digest of prompts, budget and base model)."""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import dump, read_lines  # noqa: E402
from bench.time_to_quality import quality_threshold  # noqa: E402

FIVE = ("refusal", "hedged", "compliance", "off_topic", "degenerate")


class UntilGood:
    """Which models to score when each tool's candidates are needed only up to its first good one:
    names are TOOL:N, met in the order the candidates completed; after a TOOL's first model meeting
    the bar, its later ones are skipped, except those in `keep` (each tool's chosen trial)."""

    def __init__(self, keep, max_kl: float):
        self.keep, self.max_kl, self.good, self.skipped = set(keep), max_kl, set(), []
        self.max_refusals: int | None = None  # known once the base model is scored

    def wanted(self, name: str) -> bool:
        if name.split(":", 1)[0] in self.good and name not in self.keep:
            self.skipped.append(name)
            return False
        return True

    def scored(self, name: str, refusals: int, kl: float) -> None:
        if name == "base":
            self.max_refusals = quality_threshold(refusals)
        elif refusals <= self.max_refusals and kl <= self.max_kl:
            self.good.add(name.split(":", 1)[0])


def weights_fingerprint(model_dir: Path, scoring: str) -> str:
    """sha256 of a model's (or adapter's) safetensors files, in name order, and of `scoring` (what the
    answers depend on besides the weights: prompts, answer budget, base model)."""
    h = hashlib.sha256(scoring.encode())
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        h.update(f.name.encode())
        with f.open("rb") as fh:
            while chunk := fh.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()[:16]


def scoring_key(prompts: Path, max_new_tokens: int, base: str) -> str:
    files = sorted(p for p in Path(prompts).iterdir() if p.stem.endswith("_heldout"))
    digest = hashlib.sha256(b"".join(f.name.encode() + f.read_bytes() for f in files)).hexdigest()
    return json.dumps({"prompts": digest, "max_new_tokens": max_new_tokens, "base": base}, sort_keys=True)


def load_scored(path: str, base_settings):
    """The model at `path`: a merged model, or a PEFT adapter applied to the base and merged into it."""
    from clawly.model.loading import load_model
    from clawly.settings import ModelSettings

    if (Path(path) / "adapter_config.json").is_file():
        from peft import PeftModel

        base, _ = load_model(base_settings)
        return PeftModel.from_pretrained(base, path).merge_and_unload()
    model, _ = load_model(ModelSettings(name=path, device="cpu", dtype="float32"))
    return model


def previous_scores(out: Path, responses: Path) -> tuple[dict, object, dict]:
    """fingerprint -> (name, figures) of what an earlier re-score wrote, its answers table and its output."""
    import pandas as pd

    if not (out.is_file() and responses.is_file()):
        return {}, None, {}
    earlier = json.loads(out.read_text())
    models = earlier.get("models", {})
    table = pd.read_parquet(responses)
    known = {
        m["fingerprint"]: (name, m)
        for name, m in models.items()
        if m.get("fingerprint") and f"{name}_response" in table.columns
    }
    return known, table, earlier


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", required=True, help="base model: 'default' or a directory")
    ap.add_argument("--models", nargs="+", required=True, help="NAME=DIR of each model to score")
    ap.add_argument("--prompts", type=Path, required=True)
    ap.add_argument("--heretic-markers", type=Path, help="JSON list of Heretic's refusal markers")
    ap.add_argument("--max-new-tokens", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument(
        "--until-good",
        nargs="*",
        metavar="NAME",
        help="time to quality needs each tool's candidates only up to its first good one: models named "
        "TOOL:N are scored in the given order, and once one of a TOOL meets the bar (five-way refusals <= a "
        "third of the base model's, KL <= --max-kl) its later ones are skipped, except the NAMEs given here",
    )
    ap.add_argument("--max-kl", type=float, default=0.1)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument(
        "--responses",
        type=Path,
        required=True,
        help="where the answers go (keep them out of the repository: they answer harmful requests)",
    )
    a = ap.parse_args()
    import pandas as pd

    from clawly.measure.classify import response_classifier
    from clawly.measure.decoding import PromptSet
    from clawly.measure.logprobs import kl_divergence
    from clawly.measure.stance import RefusalDetector, StrictKeywordRule, combine
    from clawly.measure.templating import chat_prompts
    from clawly.model.loading import load_model, resolve_model_source
    from clawly.settings import ModelSettings, Settings

    harmful = pd.read_csv(a.prompts / "harmful_heldout.csv")
    harmless = read_lines(a.prompts / "harmless_heldout.txt")
    clawly_rule = RefusalDetector()
    heretic_rule = RefusalDetector(json.loads(a.heretic_markers.read_text())) if a.heretic_markers else clawly_rule

    def heretic_verdict(text: str) -> bool:  # Heretic also counts an empty answer as a refusal
        return heretic_rule(text) or not text.strip()

    def score(model):
        responses, _ = hp.generate(model, a.max_new_tokens)
        return responses, gp.first_token_logprobs(model)

    classifier = response_classifier(Settings())
    requests = harmful.text.tolist()

    base_settings = ModelSettings(name=a.base, device="cpu", dtype="float32")
    scoring = scoring_key(a.prompts, a.max_new_tokens, a.base)
    known, table, earlier = previous_scores(a.out, a.responses)
    paths = dict(m.split("=", 1) for m in a.models)
    prints = {"base": weights_fingerprint(resolve_model_source(base_settings), scoring)}
    base, tok = load_model(base_settings)
    system = base_settings.system_prompt  # clawly's default, the one every tool ran under
    hp = PromptSet(tok, chat_prompts(tok, harmful.text.tolist(), system), a.batch_size)  # tokenized once
    gp = PromptSet(tok, chat_prompts(tok, harmless, system), a.batch_size)
    base_lp = gp.first_token_logprobs(base)
    results, rows = {}, harmful[["category", "text"]].copy()
    digest = hashlib.sha256(scoring.encode()).hexdigest()[:16]
    if table is not None and earlier.get("scoring") == digest and table.text.tolist() == rows.text.tolist():
        # scored the same way: models scored before and not named now stay in the output
        results = dict(earlier["models"])
        rows = table.copy()
    until = UntilGood(a.until_good or (), a.max_kl) if a.until_good is not None else None
    for name in ["base", *paths]:
        if until and not until.wanted(name):
            continue
        fp = prints.get(name) or weights_fingerprint(Path(paths[name]), scoring)
        if fp in known:  # the same weights scored the same way before, perhaps under another name
            old, figures = known[fp]
            print(f"{name}: the scores of {old} (the same weights, fingerprint {fp})", flush=True)
            for col in table.columns:
                if col.startswith(f"{old}_"):
                    rows[f"{name}_{col[len(old) + 1 :]}"] = table[col].values
            results[name] = dict(figures)
        else:
            model = base if name == "base" else load_scored(paths[name], base_settings)
            resp, lp = score(model)
            del model
            rows[f"{name}_response"] = resp
            rows[f"{name}_label"] = combine(
                classifier(requests, resp).labels, StrictKeywordRule(clawly_rule).labels(resp)
            )
            rows[f"{name}_refusal_clawly_markers"] = [clawly_rule(r) for r in resp]
            rows[f"{name}_refusal_heretic_markers"] = [heretic_verdict(r) for r in resp]
            labels = rows[f"{name}_label"].value_counts()
            results[name] = {
                "refusals": int(labels.get("refusal", 0)),
                "labels": {k: int(labels.get(k, 0)) for k in FIVE},
                "refusals_clawly_markers": int(sum(rows[f"{name}_refusal_clawly_markers"])),
                "refusals_heretic_markers": int(sum(rows[f"{name}_refusal_heretic_markers"])),
                "kl_divergence": round(kl_divergence(base_lp, lp), 6),
                "by_category": rows.groupby("category")[f"{name}_refusal_clawly_markers"].sum().astype(int).to_dict(),
                "fingerprint": fp,
            }
        if name == "base":
            del base
        if until:
            until.scored(name, results[name]["refusals"], results[name]["kl_divergence"])
        # written after every model: a re-score stopped early keeps what it scored
        a.responses.parent.mkdir(parents=True, exist_ok=True)
        rows.to_parquet(a.responses, index=False)
        dump(
            a.out,
            {
                "harmful_prompts": len(harmful),
                "harmless_prompts": len(harmless),
                "scoring": digest,
                "max_new_tokens": a.max_new_tokens,
                "refusals": "five-way (clawly.measure.stance); keyword counts beside it",
                "models": results,
                "skipped_after_a_good_candidate": until.skipped if until else [],
            },
        )


if __name__ == "__main__":
    main()
