"""How many answer tokens the optimizer's keyword verdict needs: the verdict on an answer's first n
tokens against the five-way label of the whole 100-token answer.

Greedy decoding makes an answer's first n tokens exactly the answer a budget of n tokens would have
produced, so the held-out answers of the side-by-side benchmark's re-score (base model and every
re-scored candidate of every tool, each distinct set of answers once:
`bench/work/heldout_responses.parquet`) give each budget's verdict
without generating again. For each n: agreement with the five-way "refusal" label, refusals the
verdict misses and ones it adds, and per model the keyword count next to the five-way count.

    python bench/answer_budget.py [--budgets 4,6,8,12,16,24,100]

Writes bench/results/answer-budget.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import dump  # noqa: E402


def budget_agreement(responses: dict[str, list[str]], labels: dict[str, list[str]], verdict, tokens, n: int) -> dict:
    """The keyword `verdict` on the first `n` tokens (`tokens(text, n)`) of each model's answers against
    their five-way labels: agreement, misses (labelled refusal, verdict not) and additions."""
    agree = missed = added = total = 0
    by_model = {}
    for model, answers in responses.items():
        flags = [verdict(tokens(a, n)) for a in answers]
        truth = [lab == "refusal" for lab in labels[model]]
        agree += sum(f == t for f, t in zip(flags, truth, strict=True))
        missed += sum(t and not f for f, t in zip(flags, truth, strict=True))
        added += sum(f and not t for f, t in zip(flags, truth, strict=True))
        total += len(flags)
        by_model[model] = {"keyword": sum(flags), "five_way": sum(truth)}
    agreement = round(agree / total, 4)
    return {"answers": total, "agreement": agreement, "missed": missed, "added": added, "by_model": by_model}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--responses", type=Path, default=ROOT / "bench" / "work" / "heldout_responses.parquet")
    ap.add_argument("--budgets", default="4,6,8,12,16,24,100")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "answer-budget.json")
    a = ap.parse_args()
    import pandas as pd

    from clawly.measure.stance import RefusalDetector
    from clawly.model.loading import load_tokenizer, resolve_model_source
    from clawly.settings import ModelSettings

    table = pd.read_parquet(a.responses)
    models = [c.removesuffix("_response") for c in table.columns if c.endswith("_response")]
    tok = load_tokenizer(resolve_model_source(ModelSettings(name="default")))

    def first_tokens(text: str, n: int) -> str:
        return tok.decode(tok(text, add_special_tokens=False).input_ids[:n])

    responses: dict[str, list[str]] = {}
    for m in models:  # a model with the same answers as one before it (the same weights) counts once
        answers = table[f"{m}_response"].tolist()
        if answers not in responses.values():
            responses[m] = answers
    models = list(responses)
    labels = {m: table[f"{m}_label"].tolist() for m in models}
    detector = RefusalDetector()
    results = {
        "source": str(a.responses.relative_to(ROOT) if a.responses.is_relative_to(ROOT) else a.responses),
        "models": models,
        "verdict": "clawly's default refusal markers (the optimizer's keyword measure)",
        "truth": "five-way label of the 100-token answer (clawly.measure.stance)",
        "budgets": {},
    }
    for n in (int(b) for b in a.budgets.split(",")):
        r = budget_agreement(responses, labels, detector, first_tokens, n)
        results["budgets"][str(n)] = r
        print(f"{n:>4} tokens: agreement {r['agreement']:.3f}/{r['answers']}, missed {r['missed']}, added {r['added']}")
    dump(a.out, results)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
