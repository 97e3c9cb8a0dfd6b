"""Re-score saved models on held-out prompts neither optimizer saw, with one scorer for all:
greedy answers of up to --max-new-tokens tokens, keyword refusals by clawly's markers and by
Heretic's markers (a response is final once both lists have fired), and first-token KL on
held-out harmless prompts against the base model."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import dump, read_lines  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", required=True, help="base model: 'default' or a directory")
    ap.add_argument("--models", nargs="+", required=True, help="NAME=DIR of each model to score")
    ap.add_argument("--prompts", type=Path, required=True)
    ap.add_argument("--heretic-markers", type=Path, help="JSON list of Heretic's refusal markers")
    ap.add_argument("--max-new-tokens", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=100)
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

    from clawly.measure.decoding import PromptSet
    from clawly.measure.logprobs import kl_divergence
    from clawly.measure.stance import RefusalDetector
    from clawly.measure.templating import chat_prompts
    from clawly.model.loading import load_model
    from clawly.settings import ModelSettings

    harmful = pd.read_csv(a.prompts / "harmful_heldout.csv")
    harmless = read_lines(a.prompts / "harmless_heldout.txt")
    clawly_rule = RefusalDetector()
    heretic_rule = RefusalDetector(json.loads(a.heretic_markers.read_text())) if a.heretic_markers else clawly_rule

    def heretic_verdict(text: str) -> bool:  # Heretic also counts an empty answer as a refusal
        return heretic_rule(text) or not text.strip()

    def score(model, tok):
        hp = PromptSet(tok, chat_prompts(tok, harmful.text.tolist(), "You are a helpful assistant."), a.batch_size)
        gp = PromptSet(tok, chat_prompts(tok, harmless, "You are a helpful assistant."), a.batch_size)
        responses, _ = hp.generate(model, a.max_new_tokens, decided=lambda t: clawly_rule(t) and heretic_rule(t))
        return responses, gp.first_token_logprobs(model)

    base, tok = load_model(ModelSettings(name=a.base, device="cpu", dtype="float32"))
    base_resp, base_lp = score(base, tok)
    del base
    results, rows = {}, harmful[["category", "text"]].copy()
    for name, resp, lp in [
        ("base", base_resp, base_lp),
        *((n, None, None) for n in (m.split("=", 1)[0] for m in a.models)),
    ]:
        if resp is None:
            path = dict(m.split("=", 1) for m in a.models)[name]
            model, _ = load_model(ModelSettings(name=path, device="cpu", dtype="float32"))
            resp, lp = score(model, tok)
            del model
        rows[f"{name}_response"] = resp
        rows[f"{name}_refusal_clawly_markers"] = [clawly_rule(r) for r in resp]
        rows[f"{name}_refusal_heretic_markers"] = [heretic_verdict(r) for r in resp]
        results[name] = {
            "refusals_clawly_markers": int(sum(rows[f"{name}_refusal_clawly_markers"])),
            "refusals_heretic_markers": int(sum(rows[f"{name}_refusal_heretic_markers"])),
            "kl_divergence": round(kl_divergence(base_lp, lp), 6),
            "by_category": rows.groupby("category")[f"{name}_refusal_clawly_markers"].sum().astype(int).to_dict(),
        }
    a.responses.parent.mkdir(parents=True, exist_ok=True)
    rows.to_parquet(a.responses, index=False)
    dump(
        a.out,
        {
            "harmful_prompts": len(harmful),
            "harmless_prompts": len(harmless),
            "max_new_tokens": a.max_new_tokens,
            "models": results,
        },
    )


if __name__ == "__main__":
    main()
