"""What the response classifier costs per optimizer trial, on this CPU.

With `optimize.refusal_measure=classifier` every trial classifies its harmful answers once (three
MiniLM passes: requests, answers, opening sentences; then 20 features and a 4-way softmax). This
times that call on answers of the demo run (`artifacts/evaluate/responses.parquet`, merged model)
or, without them, on the project's labelled test responses.

    python bench/classifier_cost.py [--count 48] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    import pandas as pd
    import torch

    from bench.common import dump, machine, project_settings
    from clawly.measure.classify import read_labelled, response_classifier

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--count", type=int, default=48, help="answers per call (the optimizer's default: 48)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--responses", type=Path, default=ROOT / "artifacts" / "evaluate" / "responses.parquet")
    args = ap.parse_args()
    if args.responses.is_file():
        table = pd.read_parquet(args.responses).head(args.count)
        prompts, answers, source = table.text.tolist(), table.merged_response.tolist(), str(args.responses)
    else:
        rows = read_labelled("clawly/measure/responses/test.jsonl")[: args.count]
        prompts, answers, source = [r["prompt"] for r in rows], [r["response"] for r in rows], "test.jsonl"
    start = time.perf_counter()
    clf = response_classifier(project_settings())
    setup = time.perf_counter() - start
    clf(prompts[:4], answers[:4])  # warm-up
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        clf(prompts, answers)
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    print(f"{len(answers)} answers from {source}, torch threads {torch.get_num_threads()}")
    print(f"load (cached weights) or train: {setup:.2f} s once per run")
    print(
        f"classify: median {median:.2f} s per call ({1000 * median / len(answers):.1f} ms an answer), "
        f"runs {', '.join(f'{t:.2f}' for t in times)}"
    )
    out = ROOT / "bench" / "results" / "classifier-cost.json"
    dump(
        out,
        {
            "answers": len(answers),
            "source": source,
            "setup_seconds": round(setup, 3),
            "seconds_per_call": [round(t, 3) for t in times],
            "median_seconds": round(median, 3),
            "machine": machine(),
        },
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
