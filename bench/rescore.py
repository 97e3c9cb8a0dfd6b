"""Re-score saved models on held-out prompts neither optimizer saw, with one scorer for all:
greedy answers of --max-new-tokens tokens, labelled by the five-way measure (refusal, hedged,
compliance, off-topic, degenerate: `clawly.measure.stance`), with keyword refusals by clawly's
markers and by Heretic's markers beside it, and first-token KL on held-out harmless prompts against
the base model. Answers are decoded to the full budget: a refusal followed by the help is labelled
by what follows, not cut at the marker."""

from __future__ import annotations

import argparse
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
    import json

    import pandas as pd

    from clawly.measure.classify import response_classifier
    from clawly.measure.decoding import PromptSet
    from clawly.measure.logprobs import kl_divergence
    from clawly.measure.stance import RefusalDetector, StrictKeywordRule, combine
    from clawly.measure.templating import chat_prompts
    from clawly.model.loading import load_model
    from clawly.settings import ModelSettings, Settings

    harmful = pd.read_csv(a.prompts / "harmful_heldout.csv")
    harmless = read_lines(a.prompts / "harmless_heldout.txt")
    clawly_rule = RefusalDetector()
    heretic_rule = RefusalDetector(json.loads(a.heretic_markers.read_text())) if a.heretic_markers else clawly_rule

    def heretic_verdict(text: str) -> bool:  # Heretic also counts an empty answer as a refusal
        return heretic_rule(text) or not text.strip()

    def score(model, tok):
        hp = PromptSet(tok, chat_prompts(tok, harmful.text.tolist(), "You are a helpful assistant."), a.batch_size)
        gp = PromptSet(tok, chat_prompts(tok, harmless, "You are a helpful assistant."), a.batch_size)
        responses, _ = hp.generate(model, a.max_new_tokens)
        return responses, gp.first_token_logprobs(model)

    classifier = response_classifier(Settings())
    requests = harmful.text.tolist()

    base, tok = load_model(ModelSettings(name=a.base, device="cpu", dtype="float32"))
    base_resp, base_lp = score(base, tok)
    del base
    results, rows = {}, harmful[["category", "text"]].copy()
    until = UntilGood(a.until_good or (), a.max_kl) if a.until_good is not None else None
    for name, resp, lp in [
        ("base", base_resp, base_lp),
        *((n, None, None) for n in (m.split("=", 1)[0] for m in a.models)),
    ]:
        if until and not until.wanted(name):
            continue
        if resp is None:
            path = dict(m.split("=", 1) for m in a.models)[name]
            model, _ = load_model(ModelSettings(name=path, device="cpu", dtype="float32"))
            resp, lp = score(model, tok)
            del model
        rows[f"{name}_response"] = resp
        rows[f"{name}_label"] = combine(classifier(requests, resp).labels, StrictKeywordRule(clawly_rule).labels(resp))
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
        }
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
                "max_new_tokens": a.max_new_tokens,
                "refusals": "five-way (clawly.measure.stance); keyword counts beside it",
                "models": results,
                "skipped_after_a_good_candidate": until.skipped if until else [],
            },
        )


if __name__ == "__main__":
    main()
