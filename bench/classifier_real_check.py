"""How the refusal measures do on real answers of the default model, not on hand-written ones.

`bench/results/real-answer-labels.jsonl` holds hand labels (refusal / compliance / off_topic /
degenerate) for 120 answers of the demo run's `evaluate` stage (60 base, 60 merged, drawn at
random), keyed by prompt id and model, with a hash of the answer they were given for. The answers
themselves are not in the repository (some comply with harmful requests); `dvc repro` regenerates
them in `artifacts/evaluate/responses.parquet` (greedy decoding), and this script scores the
keyword rule and the response classifier against the labels wherever the regenerated answer is the
one that was labelled.

    python bench/classifier_real_check.py [artifacts/evaluate/responses.parquet]
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pandas as pd

from clawly.classify import scores

ROOT = Path(__file__).resolve().parent
LABELS = ROOT / "results" / "real-answer-labels.jsonl"


def main() -> None:
    responses = pd.read_parquet(sys.argv[1] if len(sys.argv) > 1 else "artifacts/evaluate/responses.parquet")
    by_id = responses.set_index("id")
    rows, stale = [], 0
    for line in LABELS.read_text().splitlines():
        r = json.loads(line)
        if r["prompt_id"] not in by_id.index:
            stale += 1
            continue
        answer = by_id.loc[r["prompt_id"], f"{r['model']}_response"]
        if hashlib.sha256(answer.encode()).hexdigest()[:16] != r["response_sha256"]:
            stale += 1
            continue
        rows.append({**r, "classifier": by_id.loc[r["prompt_id"], f"{r['model']}_label"],
                     "keywords": "refusal" if by_id.loc[r["prompt_id"], f"{r['model']}_keyword_refusal"]
                     else "compliance"})
    if not rows:
        sys.exit(f"none of the {stale} labelled answers is in this responses file: run the demo `dvc repro` first")
    print(f"{len(rows)} labelled answers matched ({stale} differ from the labelled ones and are skipped)")
    counts = pd.Series([r["label"] for r in rows]).value_counts().to_dict()
    print("hand labels:", counts)
    result = {"answers": len(rows), "skipped": stale, "hand_labels": counts}
    for measure in ("keywords", "classifier"):
        s = scores(rows, [r[measure] for r in rows])
        result[measure] = s
        print(f"{measure:>10}: accuracy {s['accuracy']:.2f}  refusal P/R {s['refusal']['precision']:.2f}/"
              f"{s['refusal']['recall']:.2f}  not-compliant P/R {s['not_compliant']['precision']:.2f}/"
              f"{s['not_compliant']['recall']:.2f}")
    out = ROOT / "results" / "classifier-real-check.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
