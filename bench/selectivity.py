"""Selectivity of finished runs, measured the same way for every row: the comparison table.

Each RUN is a project directory after `dvc repro` / `dvc exp run` (its `data/prompts/` and
`artifacts/`). For each, every eval-split request of the preset's categories that its optimizer
did not score (all 50 per category when the run had a tune split) is answered by the base model
and by the run's merged model, decoded as `evaluate` decodes, ANSWER_TOKENS tokens. Each answer is
labelled by the plain keyword rule, the strict rule and the five-way measure (`clawly.measure.stance`:
classifier + strict rule); per category the table gives base and after refusals with 95% Wilson
intervals, the share of base refusals removed (targeted) or retained (kept), the answers labelled
compliance (and off-topic, degenerate: an answer about something else is not an uncensored one),
first-token KL on held-out harmless prompts, and harmless quality: how many of HARMLESS_ANSWERED
held-out harmless requests each model's answer is labelled compliance. Base answers are cached by
prompt text in bench/work/.

    python bench/selectivity.py NAME=RUN_DIR [NAME=RUN_DIR ...]

Writes docs/results/selectivity/results.json and table.md.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
from pathlib import Path

import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

from clawly.ablate.categories import wilson_interval  # noqa: E402
from clawly.data.prompts import row_systems  # noqa: E402
from clawly.measure.classify import response_classifier  # noqa: E402
from clawly.measure.decoding import PromptSet  # noqa: E402
from clawly.measure.logprobs import kl_divergence  # noqa: E402
from clawly.measure.stance import RefusalDetector, StrictKeywordRule, combine  # noqa: E402
from clawly.measure.templating import chat_prompts  # noqa: E402
from clawly.model.loading import load_model  # noqa: E402
from clawly.search.chosen import read_chosen_trial, read_optimizer_prompt_ids  # noqa: E402
from clawly.settings import Settings  # noqa: E402
from clawly.steps.evaluate import evaluation_prompts  # noqa: E402

PRESET = {
    "violence_weapons": "targeted",
    "drugs_substances": "targeted",
    "adult_content": "targeted",
    "self_harm_suicide": "kept",
    "instructed_refusal": "kept",
}  # instructed: where the run's tables have it
ANSWER_TOKENS = 64
HARMLESS = 100  # first-token KL
HARMLESS_ANSWERED = 50  # of those, answered by both models and labelled (harmless quality)
OUT = ROOT.parent / "docs" / "results" / "selectivity"
CACHE = ROOT / "work" / "selectivity-base.parquet"


def key(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_prompts(run: Path, settings: Settings) -> tuple[pd.DataFrame, pd.DataFrame]:
    harmful = pd.read_parquet(run / "data/prompts/harmful.parquet")
    harmless = pd.read_parquet(run / "data/prompts/harmless.parquet")
    seen = read_optimizer_prompt_ids(run / "artifacts/optimize/prompts.parquet")
    h = harmful[(harmful.split == "eval") & harmful.category.isin(PRESET) & ~harmful.id.isin(seen)]
    g = harmless[(harmless.split == "eval") & ~harmless.id.isin(seen)]
    g = g.sample(n=min(len(g), HARMLESS), random_state=0)
    return h.sort_values("id").reset_index(drop=True), g.reset_index(drop=True)


def base_answers(
    settings: Settings, texts: list[str], systems: list[str | None], harmless: list[str]
) -> tuple[list[str], torch.Tensor]:  # noqa: F821
    """The base model's answers (cached by system prompt and text) and harmless first-token log-probs
    (not cached)."""
    cache = pd.read_parquet(CACHE) if CACHE.is_file() else pd.DataFrame({"key": [], "response": []})
    known = dict(zip(cache.key, cache.response, strict=True))
    model, tok = load_model(settings.model)
    keys = [
        key(t) if not s or s == settings.model.system_prompt else key(f"{s}\n{t}")
        for t, s in zip(texts, systems, strict=True)
    ]
    todo = [i for i, k in enumerate(keys) if k not in known]
    if todo:
        answers, _ = evaluation_prompts(
            settings, tok, [texts[i] for i in todo], "", [systems[i] for i in todo]
        ).generate(model, ANSWER_TOKENS)
        known.update({keys[i]: a for i, a in zip(todo, answers, strict=True)})
        CACHE.parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame({"key": list(known), "response": list(known.values())}).to_parquet(CACHE, index=False)
    lp = PromptSet(tok, chat_prompts(tok, harmless, settings.model.system_prompt), 48).first_token_logprobs(model)
    return [known[k] for k in keys], lp


def labels(settings: Settings, classifier, requests: list[str], answers: list[str]) -> dict[str, list]:
    detector = RefusalDetector(settings.optimize.refusal_markers or None)
    strict = StrictKeywordRule(detector).labels(answers)
    five = combine(classifier(requests, answers).labels, strict)
    return {
        "keyword": [detector(a) for a in answers],
        "strict": [s == "refusal" for s in strict],
        "refusal": [x == "refusal" for x in five],
        "hedged": [x == "hedged" for x in five],
        "compliance": [x == "compliance" for x in five],
        "off_topic": [x == "off_topic" for x in five],
        "degenerate": [x == "degenerate" for x in five],
    }


def measure(run: Path, name: str) -> dict:
    settings = Settings.from_dict(yaml.safe_load((run / "params.yaml").read_text()))
    settings = dataclasses.replace(settings, artifacts_dir=str(run / "artifacts"))
    h, g = run_prompts(run, settings)
    texts, systems = h.text.tolist(), row_systems(h, settings.model.system_prompt)
    t0 = time.perf_counter()
    calm = g.text.tolist()[:HARMLESS_ANSWERED]
    base, base_lp = base_answers(settings, texts + calm, systems + [None] * len(calm), g.text.tolist())
    base, base_calm = base[: len(texts)], base[len(texts) :]
    chosen = read_chosen_trial(run / "artifacts/optimize/chosen_trial.json")
    model, tok = load_model(dataclasses.replace(settings.model, name=str(run / "artifacts/model"), gguf_file=None))
    after, _ = evaluation_prompts(
        settings, tok, texts + calm, chosen.response_prefix, systems + [None] * len(calm)
    ).generate(model, ANSWER_TOKENS)
    after, after_calm = after[: len(texts)], after[len(texts) :]
    kl = kl_divergence(
        base_lp,
        PromptSet(tok, chat_prompts(tok, g.text.tolist(), settings.model.system_prompt), 48).first_token_logprobs(
            model
        ),
    )
    del model
    classifier = response_classifier(settings)
    lb, la = labels(settings, classifier, texts, base), labels(settings, classifier, texts, after)
    hb, ha = labels(settings, classifier, calm, base_calm), labels(settings, classifier, calm, after_calm)
    harmless_quality = {
        "prompts": len(calm),
        **{m: {"base": sum(hb[m]), "after": sum(ha[m])} for m in ("compliance", "refusal", "off_topic", "degenerate")},
    }
    rows = {}
    for cat, role in PRESET.items():
        idx = [i for i, c in enumerate(h.category) if c == cat]
        if not idx:
            continue
        row = {"role": role, "prompts": len(idx)}
        for m in ("refusal", "keyword", "strict", "hedged", "compliance", "off_topic", "degenerate"):
            b, a = sum(lb[m][i] for i in idx), sum(la[m][i] for i in idx)
            row[m] = {
                "base": b,
                "after": a,
                "after_ci95": wilson_interval(a, len(idx)),
                "kept_share": round(a / b, 4) if b else None,
            }
        rows[cat] = row
    answers = pd.concat(
        [
            h.assign(base_response=base, after_response=after),
            g.iloc[: len(calm)].assign(base_response=base_calm, after_response=after_calm),
        ]
    )
    names = ("refusal", "hedged", "compliance", "off_topic", "degenerate")
    for model_name, lab in (("base", {k: lb[k] + hb[k] for k in lb}), ("after", {k: la[k] + ha[k] for k in la})):
        answers[f"{model_name}_label"] = [next((m for m in names if lab[m][i]), "?") for i in range(len(answers))]
    answers.to_parquet(ROOT / "work" / f"selectivity-{name}.parquet", index=False)
    return {
        "run": str(run),
        "holdout": settings.data.holdout,
        "edit": settings.edit.method,
        "directions": settings.directions.method,
        "chosen_trial": chosen.trial,
        "plan": chosen.plan.to_dict(),
        "distill": distill_settings(settings),
        "kl_divergence": round(kl, 4),
        "harmless_prompts": len(g),
        "harmless_quality": harmless_quality,
        "answer_tokens": ANSWER_TOKENS,
        "seconds": round(time.perf_counter() - t0, 1),
        "by_category": rows,
    }


def distill_settings(settings: Settings) -> dict | None:
    """What the run distilled (None: the chosen trial's change was exported as it is)."""
    d = settings.distill
    if not d.steps:
        return None
    keys = ("steps", "rank", "lr", "targeted_prompts", "kept_prompts", "harmless_prompts", "kl_tokens")
    return {k: getattr(d, k) for k in keys}


def edit_cell(r: dict) -> str:
    cell = f"{r['edit']} ({r['directions']})"
    if r.get("distill"):
        cell += f", distilled ({r['distill']['steps']} steps)"
    return cell


def table(results: dict) -> str:
    lines = [
        "| run | KL | " + " | ".join(f"{c} ({r})" for c, r in PRESET.items()) + " |",
        "| --- | --- | " + " | ".join("---" for _ in PRESET) + " |",
    ]
    for name, r in results.items():
        cells = []
        for cat in PRESET:
            if cat not in r["by_category"]:
                cells.append("—")
                continue
            x = r["by_category"][cat]
            ref, kw = x["refusal"], x["keyword"]
            lo, hi = ref["after_ci95"]
            share = "—" if ref["kept_share"] is None else f"{ref['kept_share']:.0%}"
            cells.append(
                f"{ref['base']}→{ref['after']}/{x['prompts']} ({share} kept; {lo:.0%}–{hi:.0%}); "
                f"keyword {kw['base']}→{kw['after']}, hedged {x['hedged']['after']}"
            )
        lines.append(f"| {name} | {r['kl_divergence']:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def holdout_table(results: dict) -> str:
    """The rows measured under the template-level hold-out: per category five-way refusals base → after
    (share of base refusals left or kept, 95% interval of the after rate), plain and strict keyword
    counts after, and answers labelled compliance base → after (off-topic + degenerate after); KL and
    harmless compliance base → after of the run."""
    rows = {k: r for k, r in results.items() if r.get("holdout") == "template"}
    cats = [c for c in PRESET if any(c in r["by_category"] for r in rows.values())]
    lines = [
        "| row | edit | KL | harmless compliance | " + " | ".join(f"{c} ({PRESET[c]})" for c in cats) + " |",
        "| --- | --- | --- | --- | " + " | ".join("---" for _ in cats) + " |",
    ]
    for name, r in rows.items():
        cells = []
        for cat in cats:
            x = r["by_category"].get(cat)
            if x is None:
                cells.append("—")
                continue
            ref = x["refusal"]
            lo, hi = ref["after_ci95"]
            share = "—" if ref["kept_share"] is None else f"{ref['kept_share']:.0%}"
            helps = x["compliance"]
            other = x["off_topic"]["after"] + x["degenerate"]["after"]
            other_base = x["off_topic"]["base"] + x["degenerate"]["base"]
            cells.append(
                f"**{ref['base']} → {ref['after']}** ({share}; {lo:.0%}–{hi:.0%}); "
                f"kw {x['keyword']['after']}, strict {x['strict']['after']}; "
                f"helps {helps['base']} → {helps['after']}, "
                f"off-topic/degenerate {other_base} → {other}"
            )
        hq = r["harmless_quality"]
        lines.append(
            f"| {name} | {edit_cell(r)} | {r['kl_divergence']:.3f} | "
            f"{hq['compliance']['base']} → {hq['compliance']['after']} of {hq['prompts']} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    pairs = [a.split("=", 1) for a in sys.argv[1:]]
    if not pairs or any(len(p) != 2 for p in pairs):
        sys.exit(__doc__)
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / "results.json"
    for name, run in pairs:
        measured = measure(Path(run).resolve(), name)
        results = json.loads(path.read_text()) if path.is_file() else {}  # re-read: runs may be measured in parallel
        results[name] = measured
        path.write_text(json.dumps(results, indent=2) + "\n")
        print(
            f"{name}: KL {results[name]['kl_divergence']}, "
            + ", ".join(
                f"{c} {x['refusal']['base']}->{x['refusal']['after']}/{x['prompts']}"
                for c, x in results[name]["by_category"].items()
            )
        )
    (OUT / "table.md").write_text(table({k: r for k, r in results.items() if r.get("holdout") != "template"}))
    (OUT / "holdout.md").write_text(holdout_table(results))
    print(f"wrote {path}, {OUT / 'table.md'} (prompt-level split) and {OUT / 'holdout.md'} (template-level)")


if __name__ == "__main__":
    main()
