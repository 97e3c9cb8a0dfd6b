"""Probe-activations throughput against a plain batched forward pass of the same model.

    python bench/probe_throughput.py [--prompts N] [--batch-size B]

Both runs push the same templated prompts, in the same length-sorted batches, through the
default model; the probe additionally reads the residual stream at every layer and writes it
to Parquet the way the probe-activations stage does."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import dump, machine, read_lines  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=160)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument(
        "--file", type=Path, default=ROOT / "bench" / "results" / "heretic-vs-clawly" / "prompts" / "harmful_train.txt"
    )
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "probe-throughput.json")
    a = ap.parse_args()
    import torch

    from clawly.ablate.activations import ActivationWriter, probe_residuals
    from clawly.measure.reference import _encode
    from clawly.measure.templating import chat_prompts, length_sorted_batches
    from clawly.model.loading import load_model
    from clawly.settings import ModelSettings

    model, tok = load_model(ModelSettings())
    prompts = chat_prompts(tok, read_lines(a.file)[: a.prompts], "You are a helpful assistant.")
    tokens = sum(len(tok(p, add_special_tokens=False).input_ids) for p in prompts)
    results = {}
    with torch.no_grad():
        for run in ("forward", "probe", "forward", "probe"):  # interleaved, second round reported
            t0 = time.perf_counter()
            if run == "forward":
                for idx in length_sorted_batches(tok, prompts, a.batch_size):
                    model(**_encode(tok, [prompts[i] for i in idx], model.device), use_cache=False, logits_to_keep=1)
            else:
                with tempfile.TemporaryDirectory() as d:
                    w = ActivationWriter(Path(d) / "a.parquet", model.config.hidden_size)
                    for idx, res in probe_residuals(model, tok, prompts, a.batch_size):
                        w.write([str(i) for i in idx], ["x"] * len(idx), res)
                    w.close()
            results[run] = time.perf_counter() - t0
    out = {
        "prompts": len(prompts),
        "tokens": tokens,
        "batch_size": a.batch_size,
        "machine": machine(),
        **{f"{k}_prompts_per_second": round(len(prompts) / v, 2) for k, v in results.items()},
        "probe_vs_forward": round(results["forward"] / results["probe"], 3),
    }
    dump(a.out, out)
    print(
        f"plain forward: {out['forward_prompts_per_second']} prompts/s; probe: {out['probe_prompts_per_second']} "
        f"prompts/s ({out['probe_vs_forward']:.0%} of the forward pass), {len(prompts)} prompts, "
        f"{tokens / len(prompts):.1f} tokens each, batch {a.batch_size}"
    )


if __name__ == "__main__":
    main()
