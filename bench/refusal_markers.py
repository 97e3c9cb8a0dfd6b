"""How the keyword rule does on the project's hand-labelled responses (clawly/measure/responses/):
false positives (non-refusals with a marker) and false negatives (refusals without one).

    python bench/refusal_markers.py [--markers FILE.json] [--name NAME]

A marker list is judged on every labelled response; 'refusal' is the positive class and
compliance, off-topic and degenerate answers are negatives."""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import dump  # noqa: E402


def load(split: str) -> list[dict]:
    return [
        json.loads(x)
        for x in (ROOT / "clawly" / "measure" / "responses" / f"{split}.jsonl").read_text().splitlines()
        if x
    ]


def confusion(rows: list[dict], rule) -> dict:
    tp = sum(rule(r["response"]) and r["label"] == "refusal" for r in rows)
    fp = sum(rule(r["response"]) and r["label"] != "refusal" for r in rows)
    fn = sum(not rule(r["response"]) and r["label"] == "refusal" for r in rows)
    pos = sum(r["label"] == "refusal" for r in rows)
    neg = len(rows) - pos
    return {
        "responses": len(rows),
        "refusals": pos,
        "true_positives": tp,
        "false_positives": fp,
        "false_negatives": fn,
        "false_positive_rate": round(fp / neg, 3),
        "false_negative_rate": round(fn / pos, 3),
        "precision": round(tp / max(tp + fp, 1), 3),
        "recall": round(tp / pos, 3),
        "missed_by_kind": dict(
            Counter(r["note"] or "plain" for r in rows if r["label"] == "refusal" and not rule(r["response"]))
        ),
        "false_alarms_by_kind": dict(
            Counter(r["note"] or "plain" for r in rows if r["label"] != "refusal" and rule(r["response"]))
        ),
    }


def main() -> None:
    from clawly.measure.stance import RefusalDetector

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--markers", type=Path, help="JSON list of markers, or an object with a 'markers' list")
    ap.add_argument("--name", default="clawly")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "refusal-markers")
    a = ap.parse_args()
    markers = None
    if a.markers:
        data = json.loads(a.markers.read_text())
        markers = data["markers"] if isinstance(data, dict) else data
    rule = RefusalDetector(markers)
    out = {
        "markers": a.name,
        "marker_count": len(rule.markers),
        "sets": {s: confusion(load(s), rule) for s in ("train", "test")},
    }
    dump(a.out / f"{a.name}.json", out)
    for s, c in out["sets"].items():
        print(
            f"{a.name} markers on {s} ({c['responses']} responses, {c['refusals']} refusals): "
            f"false negatives {c['false_negatives']}/{c['refusals']} ({c['false_negative_rate']:.0%}), "
            f"false positives {c['false_positives']}/{c['responses'] - c['refusals']} "
            f"({c['false_positive_rate']:.0%}); missed: {c['missed_by_kind']}; false alarms: "
            f"{c['false_alarms_by_kind']}"
        )


if __name__ == "__main__":
    main()
