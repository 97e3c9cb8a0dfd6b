"""What counting real refusals on kept categories costs per trial.

Scores the default model (base weights: the first thing every search scores) on the optimizer's
prompts of `+preset=default` twice: kept categories counted like the others (marker rule, answers
stop at the first marker, optimize.max_new_tokens) and counted strictly (answers run to
optimize.kept_max_new_tokens and count only strict refusals; what the optimizer does now). Prints
token positions pushed through the model (machine-independent) and seconds, best of REPEATS.

    python bench/kept_measure_cost.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

REPEATS = 2
PRESET = {"violence_weapons": 1.0, "drugs_substances": 1.0, "adult_content": 1.0, "self_harm_suicide": 0.0}


def main() -> None:
    from bench.common import dump, machine, project_settings
    from clawly.data.templates import generate_prompts
    from clawly.measure.scoring import ScoringPrompts, TrialScorer
    from clawly.measure.templating import chat_prompts
    from clawly.model.loading import load_model
    from clawly.steps.optimize import stratified_sample

    settings = project_settings()
    s = settings.optimize
    harmful, harmless = generate_prompts(settings.data)
    pool = harmful[(harmful.split == "eval") & harmful.category.isin(PRESET)]
    h = stratified_sample(pool, s.harmful_prompts, s.seed)
    g = harmless[harmless.split == "eval"].sample(n=s.harmless_prompts, random_state=s.seed)
    model, tok = load_model(settings.model)
    system = settings.model.system_prompt
    prompts = ScoringPrompts(
        chat_prompts(tok, h.text.tolist(), system),
        h.category.tolist(),
        chat_prompts(tok, g.text.tolist(), system),
        h.text.tolist(),
    )
    out = {
        "machine": machine(),
        "prompts": len(h),
        "kept_prompts": int((h.category == "self_harm_suicide").sum()),
        "max_new_tokens": s.max_new_tokens,
        "kept_max_new_tokens": s.kept_max_new_tokens,
    }
    for name, kept in (("marker rule on kept", ()), ("strict rule on kept", ("self_harm_suicide",))):
        scorer = TrialScorer(model, tok, prompts, s, kept=kept)
        best, scores = None, None
        for _ in range(REPEATS):
            t0 = time.perf_counter()
            scores = scorer.score()
            dt = time.perf_counter() - t0
            best = dt if best is None else min(best, dt)
        out[name] = {
            "seconds": round(best, 2),
            "tokens": scores.tokens,
            "kept_refusals": scores.refusals_by_category.get("self_harm_suicide"),
            "kept_keyword_hits": sum(
                scorer.detector(r)
                for r, c in zip(scores.responses, h.category, strict=True)
                if c == "self_harm_suicide"
            ),
        }
        print(
            f"{name:>20}: {out[name]['seconds']:.2f} s, {scores.tokens} tokens, kept refusals "
            f"{out[name]['kept_refusals']} of {out['kept_prompts']}"
        )
    a, b = out["marker rule on kept"], out["strict rule on kept"]
    print(
        f"cost of the strict kept measure: +{b['tokens'] - a['tokens']} tokens "
        f"({b['tokens'] / a['tokens'] - 1:+.0%}), {b['seconds'] - a['seconds']:+.2f} s a trial"
    )
    dump(ROOT / "results" / "kept-measure-cost.json", out)


if __name__ == "__main__":
    main()
