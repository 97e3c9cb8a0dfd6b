"""Extra processes that add trials to the same study (optimize.workers > 1).

    with extra_workers(settings, log, work, given) as pool:   # workers - 1 processes start here
        ...run trials in this process too...
    # leaving the block waits for them; an error in the block stops them (their running trials are
    # failed when the study is next opened)

Each worker is a fresh process (`spawn`): it loads the model itself and opens the study by name
from `optimize.storage`; from this process it takes the settings and what `given` hands over (the
response prefix, batch size and base scores: measuring them again would cost a trial's work). The
CPU threads are split between the processes (more threads than cores only makes each slower);
with several GPUs, worker i takes GPU i. Trial numbers come from the storage, so
the workers never run the same trial, and `clawly.search.study.iter_study` stops all of them at
optimize.n_trials finished trials.
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing as mp
import os
from collections.abc import Callable, Iterator

import torch

from clawly.errors import ClawlyError
from clawly.log import StageLogger
from clawly.settings import ModelSettings, Settings


def available_cpus() -> int:
    """The CPUs this process may run on: its affinity mask (what a cgroup, `taskset` or a Slurm
    allocation leaves it), at most SLURM_CPUS_PER_TASK inside a Slurm job; not the machine's count."""
    try:
        count = len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity masks (macOS, Windows)
        count = os.cpu_count() or 1
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if slurm.isdigit() and int(slurm) > 0:
        count = min(count, int(slurm))
    return max(1, count)


def cpu_share(workers: int) -> int:
    """CPU threads for each of `workers` processes, from the CPUs this process may use."""
    return max(1, available_cpus() // workers)


def worker_model(settings: Settings, index: int) -> ModelSettings:
    """Worker `index`'s model settings (0: this process): with optimize.workers > 1, several GPUs and
    model.device auto or cuda, worker i holds its model on GPU i mod count, instead of every worker
    spreading one over all GPUs (device_map auto)."""
    m = settings.model
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if settings.optimize.workers > 1 and m.device in ("auto", "cuda") and count > 1:
        return dataclasses.replace(m, device=f"cuda:{index % count}")
    return m


@contextlib.contextmanager
def extra_workers(
    settings: Settings, log: StageLogger, target: Callable[[dict, int, int, dict], None], given: dict
) -> Iterator[list[mp.process.BaseProcess]]:
    """Start optimize.workers - 1 processes running `target(settings_dict, index, threads, given)`, give
    this process its share of the threads, and on leaving wait for them (or, on an error, stop them)."""
    n = settings.optimize.workers
    if n <= 1:
        yield []
        return
    threads, before = cpu_share(n), torch.get_num_threads()
    context = mp.get_context("spawn")
    values = settings.to_dict()
    pool = [
        context.Process(target=target, args=(values, i, threads, given), name=f"clawly-worker-{i}", daemon=False)
        for i in range(1, n)
    ]
    for p in pool:
        p.start()
    log.event(
        "workers", f"{n} workers on one study ({threads} CPU thread(s) each)", workers=n, pids=[p.pid for p in pool]
    )
    torch.set_num_threads(threads)
    try:
        yield pool
    except BaseException:
        for p in pool:
            p.terminate()
        for p in pool:
            p.join()
        raise
    finally:
        torch.set_num_threads(before)
    for p in pool:
        p.join()
    failed = [f"{p.name}: exit status {p.exitcode}" for p in pool if p.exitcode != 0]
    if failed:
        raise ClawlyError(
            f"{len(failed)} of {n - 1} extra workers failed ({', '.join(failed)}): their errors are "
            "above, and in logs/optimize-worker-N.jsonl"
        )
