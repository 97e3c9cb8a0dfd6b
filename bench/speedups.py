"""What each shortcut of clawly's trial scoring buys, measured one at a time on the default model.

    python bench/speedups.py [--prompts DIR] [--plan chosen_trial.json]

Every row scores the same weight change (a trial's ablation, applied in place) on the same
harmful and harmless prompts (--count of each) and adds one shortcut to the row above. It prints wall
seconds, token positions pushed through the model, and the keyword refusal count, so a
shortcut that changed a verdict shows. The first row is a naive evaluation:
`transformers.generate`, 100 tokens, prompts in file order, the base distributions recomputed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import dump, machine, read_lines  # noqa: E402

SYSTEM = "You are a helpful assistant."


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=Path, default=ROOT / "bench" / "results" / "heretic-vs-clawly" / "prompts")
    ap.add_argument(
        "--plan", type=Path, default=ROOT / "bench" / "work" / "clawly" / "artifacts" / "optimize" / "chosen_trial.json"
    )
    ap.add_argument(
        "--directions",
        type=Path,
        default=ROOT / "bench" / "work" / "clawly" / "artifacts" / "directions" / "orthogonalized.safetensors",
    )
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--budget", type=int, default=16, help="clawly's token budget per answer")
    ap.add_argument("--count", type=int, default=100, help="harmful and harmless prompts scored")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "speedups.json")
    a = ap.parse_args()
    import torch
    from safetensors.torch import load_file

    from clawly.ablate.ablation import AblationPlan, ablated, weight_deltas
    from clawly.ablate.directions import AblationBasis
    from clawly.measure.decoding import DecodeStats, PromptSet
    from clawly.measure.logprobs import first_token_logprobs, kl_divergence
    from clawly.measure.reference import generate
    from clawly.measure.stance import RefusalDetector
    from clawly.measure.templating import chat_prompts
    from clawly.model.loading import load_model
    from clawly.settings import ModelSettings

    model, tok = load_model(ModelSettings())
    harmful = chat_prompts(tok, read_lines(a.prompts / "harmful_eval.txt")[: a.count], SYSTEM)
    harmless = chat_prompts(tok, read_lines(a.prompts / "harmless_eval.txt")[: a.count], SYSTEM)
    rule = RefusalDetector()
    bs = a.batch_size
    base_hf = first_token_logprobs(model, tok, harmless, bs)
    plan = AblationPlan.from_dict(json.loads(a.plan.read_text())["plan"])
    basis = AblationBasis(load_file(str(a.directions))["directions"])  # the ablated directions, [1, P, d]
    rows = []

    def row(name: str, fn) -> None:
        t0 = time.perf_counter()
        refusals, kl, tokens = fn()
        seconds = time.perf_counter() - t0
        rows.append(
            {
                "config": name,
                "seconds": round(seconds, 1),
                "tokens": tokens,
                "refusals": refusals,
                "kl_divergence": None if kl is None else round(kl, 5),
            }
        )
        print(
            f"{name:<55} {seconds:7.1f} s  {tokens if tokens is not None else '':>7}  refusals {refusals}", flush=True
        )

    def hf(max_new, decided, sort):
        def run():
            base = first_token_logprobs(model, tok, harmless, bs)  # recomputed, as if per trial
            kl = kl_divergence(base, first_token_logprobs(model, tok, harmless, bs))
            r = generate(model, tok, harmful, max_new, bs, decided=decided, sort_by_length=sort)
            return sum(map(rule, r)), kl, None

        return run

    requests = read_lines(a.prompts / "harmful_eval.txt")[: a.count]

    def with_classifier():
        from clawly.measure.classify import build_classifier
        from clawly.model.loading import cache_root

        clf = build_classifier(
            ROOT / "clawly" / "measure" / "responses" / "train.jsonl", cache_dir=cache_root() / "classifier"
        )
        hp = PromptSet(tok, harmful, bs)
        gp = PromptSet(tok, harmless, bs)

        def run():
            st = DecodeStats()
            kl = kl_divergence(base_hf, gp.first_token_logprobs(model, st))
            r, _ = hp.generate(model, a.budget, stats=st)  # whole answers: no stop at markers
            labels = clf(requests, r).labels
            return sum(lab != "compliance" for lab in labels), kl, st.total

        return run

    def fast(prefix, chunk, compact, cached_base=True, kl_only=False):
        hp = PromptSet(tok, harmful, bs, prefix_cache=prefix, prefill_chunk=chunk)
        gp = PromptSet(tok, harmless, bs, prefix_cache=prefix, prefill_chunk=chunk)

        def run():
            st = DecodeStats()
            base = base_hf if cached_base else gp.first_token_logprobs(model, st)
            kl = kl_divergence(base, gp.first_token_logprobs(model, st))
            if kl_only:
                return None, kl, st.total
            r, _ = hp.generate(model, a.budget, decided=rule, stats=st, compact=compact)
            return sum(map(rule, r)), kl, st.total

        return run

    with ablated(model, weight_deltas(model, basis, plan)), torch.no_grad():
        row("A. transformers.generate, 100 tokens, file order", hf(100, None, False))
        row("B. + stop each answer at its first refusal marker", hf(100, rule, False))
        row(f"C. + token budget {a.budget}", hf(a.budget, rule, False))
        row("D. + prompts sorted by length", hf(a.budget, rule, True))
        row("E. clawly scorer: shared-prefix KV cache", fast(True, bs, False, cached_base=False))
        row("F. + chunked prefill (32 rows, caches joined)", fast(True, 32, False, cached_base=False))
        row("G. + finished answers leave the batch", fast(True, 32, True, cached_base=False))
        row("H. + base distributions computed once", fast(True, 32, True))
        row("I. a trial pruned on KL (prune_kl)", fast(True, 32, True, kl_only=True))
        row("J. H with the classifier as the measure (refusal_measure)", with_classifier())
    dump(
        a.out,
        {
            "machine": machine(),
            "harmful_prompts": len(harmful),
            "harmless_prompts": len(harmless),
            "batch_size": bs,
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
