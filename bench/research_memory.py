"""Peak memory of the research views' residual sample: 1x and 4x the prompts, the same cap.

Writes synthetic activation files shaped like the default model's (25 probe points, hidden 896)
with N harmful prompts over 8 categories and N harmless ones, then in a fresh process per size
draws the sample `analyze` draws (`research.sample_per_category`, default 100) and reports the
process's peak resident memory. The sample is capped, so the peak should not grow with N beyond
the file-reading buffers; reading the whole file (`read_activations`) is shown beside it.

    python bench/research_memory.py [N ...]      # default: 800 3200

Writes bench/results/research-memory.json.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

POINTS, HIDDEN, CATEGORIES = 25, 896, 8


def write_files(directory: Path, n: int) -> None:
    import torch

    from clawly.ablate.activations import ActivationWriter

    g = torch.Generator().manual_seed(0)
    for name in ("harmful", "harmless"):
        w = ActivationWriter(directory / f"{name}.parquet", HIDDEN)
        for start in range(0, n, 64):
            b = min(64, n - start)
            ids = [f"{name}-{k}" for k in range(start, start + b)]
            cats = [f"c{k % CATEGORIES}" if name == "harmful" else "general" for k in range(start, start + b)]
            w.write(ids, cats, torch.randn(b, POINTS, HIDDEN, generator=g))
        w.close()


def measure(directory: str, how: str) -> None:
    """Child process: draw the sample (or read everything), print peak RSS in MiB."""
    from clawly.ablate import research as rs
    from clawly.ablate.activations import read_activations

    d = Path(directory)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if how == "sample":
        s = rs.sample_residuals(d / "harmful.parquet", d / "harmless.parquet", 100)
        rows = s.residuals.shape[0]
    else:
        rows = sum(read_activations(d / f"{n}.parquet")[2].shape[0] for n in ("harmful", "harmless"))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        json.dumps(
            {
                "rows": rows,
                "peak_mib": round(peak / 1024, 1),
                "above_imports_mib": round((peak - base) / 1024, 1),
                "seconds": round(time.perf_counter() - start, 2),
            }
        )
    )


def main(sizes: list[int]) -> None:
    results = []
    for n in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            write_files(Path(tmp), n)
            size = sum(f.stat().st_size for f in Path(tmp).iterdir())
            for how in ("sample", "read_all"):
                out = subprocess.run(
                    [sys.executable, __file__, "--child", tmp, how], capture_output=True, text=True, check=True
                ).stdout
                row = {"prompts_per_set": n, "how": how, "file_mib": round(size / 2**20, 1), **json.loads(out)}
                print(row)
                results.append(row)
    out_dir = ROOT / "results"
    out_dir.mkdir(exist_ok=True)
    (out_dir / "research-memory.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        measure(sys.argv[2], sys.argv[3])
    else:
        main([int(a) for a in sys.argv[1:]] or [800, 3200])
