"""Scale out: several workers on one Optuna study (journal file, PostgreSQL), Hydra multirun sweeps
locally and on a real Slurm cluster.

The servers are real: PostgreSQL and Slurm from Debian's packages, started by `.ci/services/*.sh`
(which `.ci/run` installs and these tests call); a test that cannot start one fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml
from test_api import quiet, tiny_settings

from clawly import Pipeline
from clawly.search.study import SURPLUS, WORKER
from clawly.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


def finished_by_worker(trials: list[optuna.trial.FrozenTrial]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for t in trials:
        if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED):
            out.setdefault(t.user_attrs[WORKER]["pid"], []).append(t.number)
    return out


def check_one_study(study: optuna.Study, n_trials: int, workers: int) -> None:
    """Exactly n_trials finished, each number once, every worker took part, nothing lost: the only
    failed trial may be a surplus one (two workers asked for the last trial at once; no work done)."""
    trials = study.get_trials()
    done = [t for t in trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
    assert len(done) == n_trials and len({t.number for t in done}) == n_trials
    assert len(finished_by_worker(trials)) == workers
    assert all(t.user_attrs.get(SURPLUS) for t in trials if t.state == optuna.trial.TrialState.FAIL)
    assert not [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]


def complete_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))


def rule_choice(
    trials: list[optuna.trial.FrozenTrial],
    kl_cap: float,
    targeted: list[str] | None = None,
    kept: list[str] = (),
    base: dict[str, int] | None = None,
    min_retention: float = 0.8,
) -> int:
    """The trial number the choice rule picks (docs/method.md), written out here apart from
    clawly.search.study, from each trial's recorded refusals per category and KL: in category mode first the
    trials keeping min_retention of every kept category's base refusals (if none does, those that fall
    least short); then the fewest targeted refusals (every category in global mode) among trials with
    KL <= kl_cap, ties to the lower KL; if none is under the cap, the lowest KL."""
    assert trials, "no complete trial to choose from"
    assert not kept or base is not None, "kept categories need the base model's refusals"

    def refusals(t):
        counts = t.user_attrs["refusals_by_category"]
        return sum(n for c, n in counts.items() if targeted is None or c in targeted)

    def kl(t):
        return t.user_attrs["kl_divergence"]

    def short(t):
        return max([0.0] + [min_retention * base[c] - t.user_attrs["refusals_by_category"].get(c, 0) for c in kept])

    keeping = [t for t in trials if short(t) == min(short(u) for u in trials)]
    under = sorted((refusals(t), kl(t), t.number) for t in keeping if kl(t) <= kl_cap)
    return under[0][2] if under else sorted((kl(t), refusals(t), t.number) for t in keeping)[0][2]


SLOW_TRIALS = {
    "data.eval_per_category": 24,
    "harmful_prompts": 160,
    "optimize.max_new_tokens": 48,
    "optimize.batch_size": 32,
    "optimize.refusal_markers": ["zzzz"],
}  # about a second a trial
N_TRIALS = 16  # enough that a worker starting a few seconds late still takes part


def test_two_workers_on_a_journal_file_run_n_trials_between_them(make_tiny_model, tmp_path):
    settings = tiny_settings(
        make_tiny_model("llama"), tmp_path, n_trials=N_TRIALS, **{"optimize.workers": 2, **SLOW_TRIALS}
    )
    pipe = Pipeline(settings, log=quiet(tmp_path))
    mine = [t.index for t in pipe.run_optimization_iter()]
    study = pipe.search.study
    check_one_study(study, N_TRIALS, workers=2)
    assert finished_by_worker(study.get_trials())[os.getpid()] == mine and 0 < len(mine) < N_TRIALS
    assert settings.categories.kept == []  # global mode: refusals in every category count
    assert pipe.choose_trial().index == rule_choice(complete_trials(study), settings.optimize.kl_cap)
    events = [
        json.loads(line)["event"]
        for line in (tmp_path / "artifacts" / "logs" / "optimize-worker-1.jsonl").read_text().splitlines()
    ]
    # the extra worker ran its trials on the base scores it was handed, without generating them again
    assert events.count("trial") == N_TRIALS - len(mine) and "baseline" not in events


def test_the_optimize_stage_runs_its_workers_and_writes_outputs_over_all_their_trials(make_tiny_model, tmp_path):
    """The DVC stage's step with optimize.workers=2: the directions on disk, the study in the journal."""
    from clawly.steps import optimize

    settings = tiny_settings(
        make_tiny_model("llama"), tmp_path, n_trials=N_TRIALS, **{"optimize.workers": 2, **SLOW_TRIALS}
    )
    pipe = Pipeline(settings, log=quiet(tmp_path))
    pipe.compute_refusal_directions()  # what the stages before optimize write
    pipe.close()
    summary = optimize.run(settings, quiet(tmp_path))
    journal = str(tmp_path / "artifacts" / "study" / "journal.log")
    study = load_only_study(optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(journal)))
    check_one_study(study, N_TRIALS, workers=2)
    assert summary["trials"] == N_TRIALS
    assert settings.categories.kept == []  # global mode: refusals in every category count
    assert summary["chosen_trial"] == rule_choice(complete_trials(study), settings.optimize.kl_cap)
    assert len(pd.read_parquet(tmp_path / "artifacts" / "optimize" / "trials.parquet")) == len(complete_trials(study))


def some_answers_word(settings: Settings, model, tokenizer) -> str:
    """A word that some, not most, of the base model's answers to the optimizer's candidates contain
    (as a refusal marker it makes some of them refusals)."""
    from collections import Counter

    from clawly.measure.decoding import PromptSet
    from clawly.measure.templating import chat_prompts
    from clawly.steps.optimize import optimizer_prompts

    harmful, _ = optimizer_prompts(settings)
    texts = chat_prompts(tokenizer, harmful.text.tolist(), settings.model.system_prompt)
    answers, _ = PromptSet(tokenizer, texts, 32).generate(model, settings.optimize.max_new_tokens)
    words = Counter(w for a in answers for w in set(a.split()))
    return next(f" {w} " for w, n in words.most_common() if n <= len(answers) // 2)


def test_workers_score_the_base_refusals_the_first_worker_chose(make_tiny_model, tmp_path):
    """With optimize.harmful_choice=base_refusals the extra worker is handed the chosen prompts: both
    add trials to one study (a worker that chose again from the candidates would open another), and
    the prompts file the stage writes names that study (bench/clawly_runner.py finds it so)."""
    from clawly.paths import Paths
    from clawly.steps import optimize

    settings = tiny_settings(
        make_tiny_model("llama"),
        tmp_path,
        n_trials=N_TRIALS,
        **{"optimize.workers": 2, **SLOW_TRIALS, "harmful_prompts": 24, "optimize.harmful_choice": "base_refusals"},
    )
    pipe = Pipeline(settings, log=quiet(tmp_path))
    pipe.compute_refusal_directions()
    settings.optimize.refusal_markers = [some_answers_word(settings, *pipe.load_model())]
    pipe.close()
    summary = optimize.run(settings, quiet(tmp_path))
    journal = str(tmp_path / "artifacts" / "study" / "journal.log")
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(journal))
    study = load_only_study(storage)
    check_one_study(study, N_TRIALS, workers=2)
    used = pd.read_parquet(Paths.of(settings).optimizer_prompts)
    harmful, harmless = (used[used.set == k].reset_index(drop=True) for k in ("harmful", "harmless"))
    assert study.study_name == f"clawly-{optimize.study_fingerprint(settings, harmful, harmless)}"
    assert summary["harmful_choice"] == "base_refusals" and summary["base"]["refusals"] == len(harmful) <= 24
    # the extra worker answered nothing of its own before its trials: no candidates, no baseline
    log = (tmp_path / "artifacts" / "logs" / "optimize-worker-1.jsonl").read_text().splitlines()
    events = [json.loads(x)["event"] for x in log]
    assert not {"harmful_choice", "baseline"} & set(events)


# ------------------------------------------------------------------ the storage: one clear line, no password


def test_an_unreachable_database_is_one_line_naming_it_without_the_password():
    from clawly.search.study import StorageError, open_study

    url = "postgresql+psycopg://clawly:hunter2secret@127.0.0.1:9/clawly"  # port 9 (discard): nothing listens
    with pytest.raises(StorageError) as e:
        open_study(url, "s", 0, 2)
    message = str(e.value)
    assert "\n" not in message and "hunter2secret" not in message
    assert "postgresql+psycopg://clawly:***@127.0.0.1:9/clawly" in message and "refused" in message.lower()


def test_a_missing_database_driver_names_the_extra():
    from clawly.search.study import StorageError, open_study

    with pytest.raises(StorageError, match=r"driver 'pymysql' is not installed: pip install 'clawly\[cluster\]'"):
        open_study("mysql+pymysql://u:pw@127.0.0.1/db", "s", 0, 2)


def test_passwords_in_urls_never_reach_the_log(tmp_path, capsys):
    from clawly.log import StageLogger

    log = StageLogger("optimize", tmp_path)
    url = "postgresql+psycopg://me:hunter2secret@db.example:5432/clawly"
    log.event("start", config={"optimize": {"storage": url}})
    log.event("resume", f"study in {url}")
    log.event("storage", storage=url)
    written = (tmp_path / "optimize.jsonl").read_text() + capsys.readouterr().err
    assert "hunter2secret" not in written and written.count("me:***@db.example") == 3 + 3  # JSONL and console


# ------------------------------------------------------------------ Hydra multirun sweeps

SWEEP_TINY = [
    "data.train_per_category=8",
    "data.eval_per_category=6",
    "data.harmless_train=24",
    "data.harmless_eval=24",
    "data.tune_per_category=4",
    "data.harmless_tune=8",
    "probe.max_per_category=4",
    "probe.batch_size=8",
    "optimize.n_trials=3",
    "optimize.n_startup_trials=2",
    "optimize.harmful_prompts=8",
    "optimize.harmless_prompts=8",
    "optimize.max_new_tokens=4",
    "optimize.batch_size=8",
    "directions.method=dim",  # the presets' RDO needs refusals a tiny random model does not make
    "optimize.refusal_markers=[black,whom]",
]


def sweep(tmp: Path, model_dir: Path, *args: str, env: dict | None = None) -> Path:
    """Run `python -m stages.optimize -m ARGS` in `tmp` (a project of its own) and return the sweep dir."""
    cmd = [
        sys.executable,
        "-m",
        "stages.optimize",
        "-m",
        *args,
        f"model.name={model_dir}",
        f"model.cache_dir={tmp / 'cache'}",
        f"hydra.sweep.dir={tmp / 'multirun'}",
        *SWEEP_TINY,
    ]
    env = {**os.environ, **(env or {}), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, f"sweep failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return tmp / "multirun"


def jobs_of(sweep_dir: Path) -> dict[str, dict]:
    """Each finished job's job.json and report, keyed by its swept overrides."""
    out = {}
    for f in sorted(sweep_dir.glob("*/job.json")):
        job = json.loads(f.read_text())
        swept = " ".join(o for o in job["overrides"] if o.startswith(("+preset=", "optimize.seed=")))
        report = json.loads((Path(job["artifacts_dir"]) / "reports" / "optimize.json").read_text())
        trials = pd.read_parquet(Path(job["artifacts_dir"]) / "optimize" / "trials.parquet")
        out[swept] = {**job, "report": report, "trials": trials, "dir": f.parent}
    return out


def check_grid(jobs: dict[str, dict], grid: list[str]) -> None:
    """One job per grid point, each with its own prompts, directions and study, and its preset's roles."""
    assert sorted(jobs) == sorted(grid)
    for swept, job in jobs.items():
        assert Path(job["artifacts_dir"]).parent == job["dir"] and (job["dir"] / "prompts" / "harmful.parquet").exists()
        assert (Path(job["artifacts_dir"]) / "directions" / "orthogonalized.safetensors").exists()
        assert len(job["trials"]) == 3 and job["trials"].trial.tolist() == [0, 1, 2]
        roles = {c: r["role"] for c, r in job["report"]["by_category"].items()}
        if "preset=default" in swept:  # violence, drugs, adult targeted; self-harm kept
            assert roles["self_harm_suicide"] == "kept" and roles["violence_weapons"] == "targeted"
            assert sum(r == "targeted" for r in roles.values()) == 3
        else:
            assert set(roles.values()) == {"targeted"} and len(roles) == 8


@pytest.mark.slow
def test_a_hydra_multirun_sweeps_presets_and_seeds_one_job_each(make_tiny_model, tmp_path):
    grid = [
        "+preset=default optimize.seed=0",
        "+preset=default optimize.seed=1",
        "+preset=full optimize.seed=0",
        "+preset=full optimize.seed=1",
    ]
    sweep_dir = sweep(tmp_path, make_tiny_model("llama"), "+preset=default,full", "optimize.seed=0,1")
    jobs = jobs_of(sweep_dir)
    check_grid(jobs, grid)
    # the seed reaches Optuna: the same preset draws other trials under the other seed
    for preset in ("default", "full"):
        a, b = (jobs[f"+preset={preset} optimize.seed={s}"]["trials"] for s in (0, 1))
        drawn = [t.filter(like="param.").select_dtypes("number").round(6).values.tolist() for t in (a, b)]
        assert drawn[0] != drawn[1]
    # the sweep's table: one row per job, its chosen trial and figures as job.json says
    table = pd.read_csv(sweep_table_csv(sweep_dir))
    assert sorted(table.swept) == sorted(grid)
    for _, row in table.iterrows():
        job = jobs[row.swept]
        assert (row.chosen_trial, row.refusals) == (job["chosen_trial"], job["refusals"])
        assert row.chosen_trial == job["report"]["chosen_trial"]


@pytest.mark.slow
def test_the_same_sweep_through_submitit_local_runs_jobs_in_their_own_processes(make_tiny_model, tmp_path):
    sweep_dir = sweep(tmp_path, make_tiny_model("llama"), "hydra/launcher=local", "+preset=default,full")
    jobs = jobs_of(sweep_dir)
    check_grid(jobs, ["+preset=default", "+preset=full"])
    logs = sorted((sweep_dir / ".submitit").glob("*/*_log.out"))
    assert len(logs) == 2  # submitit's own job folders: one per job
    pids = {trial_worker(job)["pid"] for job in jobs.values()}
    assert len(pids) == 2 and os.getpid() not in pids


def trial_worker(job: dict) -> dict:
    """The worker (host, pid) that ran a job's trials, from its study."""
    storage = str(Path(job["artifacts_dir"]) / "study" / "journal.log")
    names = optuna.study.get_all_study_names(
        storage=optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(storage))
    )
    study = optuna.load_study(
        study_name=names[0], storage=optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(storage))
    )
    workers = {json.dumps(t.user_attrs[WORKER], sort_keys=True) for t in study.trials}
    assert len(workers) == 1
    return json.loads(workers.pop())


def test_with_several_gpus_each_worker_holds_its_model_on_its_own_gpu(monkeypatch, tmp_path):
    import torch

    from clawly.search.workers import worker_model
    from clawly.settings import Settings

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    s = Settings(**{"optimize.workers": 3, "model.device": "auto"})
    assert [worker_model(s, i).device for i in range(3)] == ["cuda:0", "cuda:1", "cuda:0"]
    assert worker_model(Settings(**{"optimize.workers": 1}), 0).device == "auto"  # one worker: device_map auto
    assert worker_model(Settings(**{"optimize.workers": 2, "model.device": "cpu"}), 1).device == "cpu"


# ------------------------------------------------------------------ real servers: PostgreSQL and Slurm


def cli_config(tmp: Path, model_dir: Path, n_trials: int, **optimize) -> Path:
    """A `clawly --config` file: the tiny model's run (slowed to about a second a trial, so that
    workers overlap), everything under tmp."""
    values = tiny_settings(model_dir, tmp, n_trials=n_trials, **SLOW_TRIALS).to_dict()
    values["optimize"].update(optimize)
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def load_only_study(storage) -> optuna.Study:
    names = optuna.study.get_all_study_names(storage=storage)
    assert len(names) == 1, names
    return optuna.load_study(study_name=names[0], storage=storage)


def check_chosen(tmp: Path, study: optuna.Study) -> None:
    """The run's report chose what the choice rule chooses among every worker's trials."""
    report = json.loads((tmp / "artifacts" / "reports" / "optimize.json").read_text())
    assert report["trials"] == len(complete_trials(study))
    config = yaml.safe_load((tmp / "run.yaml").read_text())
    assert not config["categories"]["weights"] and report["mode"] == "global"  # every category counts
    assert report["chosen_trial"] == rule_choice(complete_trials(study), config["optimize"]["kl_cap"])


@pytest.mark.services
@pytest.mark.slow
def test_two_cli_workers_on_a_real_postgresql_study(make_tiny_model, tmp_path, postgres_url):
    """`clawly --workers 2 --storage postgresql+psycopg://...`: two processes, one study in the server."""
    config = cli_config(tmp_path, make_tiny_model("llama"), n_trials=N_TRIALS)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "clawly.cli",
            "--config",
            str(config),
            "--non-interactive",
            "--save",
            "none",
            "--output",
            str(tmp_path / "out"),
            "--workers",
            "2",
            "--storage",
            postgres_url,
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    password = postgres_url.split("://", 1)[1].split("@", 1)[0].partition(":")[2]
    logs = proc.stdout + proc.stderr + "".join(f.read_text() for f in (tmp_path / "artifacts" / "logs").glob("*"))
    assert not password or password not in logs
    study = load_only_study(optuna.storages.RDBStorage(postgres_url))
    check_one_study(study, N_TRIALS, workers=2)
    check_chosen(tmp_path, study)
    assert "chosen by the rule" in proc.stdout


@pytest.mark.services
@pytest.mark.slow
def test_two_slurm_jobs_add_trials_to_one_study_on_a_shared_journal(make_tiny_model, tmp_path, slurm_cluster):
    """Two sbatch jobs run the CLI on one study (a journal file on the shared file system); the
    directions are made once beforehand, so both open the same study."""
    model_dir = make_tiny_model("llama")
    journal = tmp_path / "shared" / "journal.log"
    config = cli_config(tmp_path, model_dir, n_trials=N_TRIALS, storage=str(journal))
    Pipeline(Settings.from_dict(yaml.safe_load(config.read_text())), log=quiet(tmp_path)).compute_refusal_directions()
    command = (
        f"cd {ROOT} && PYTHONPATH={ROOT} {sys.executable} -m clawly.cli --config {config} --non-interactive "
        f"--save none --output {tmp_path / 'out'}"
    )
    ids = []
    for i in range(2):
        out = subprocess.run(
            [
                "sbatch",
                "--parsable",
                "--cpus-per-task=1",
                f"--output={tmp_path}/job-{i}.out",
                f"--job-name=clawly-{i}",
                "--wrap",
                command,
            ],
            capture_output=True,
            text=True,
            env=slurm_cluster,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        ids.append(out.stdout.strip().split(";")[0])
    for job in ids:  # wait for both: a job leaves the queue when it ends
        subprocess.run(
            ["bash", "-c", f"while squeue -h -j {job} 2>/dev/null | grep -q .; do sleep 2; done"],
            env=slurm_cluster,
            timeout=900,
            check=True,
        )
    for i in range(2):
        text = (tmp_path / f"job-{i}.out").read_text()
        assert "chosen by the rule" in text, text[-3000:]
    study = load_only_study(optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal))))
    check_one_study(study, N_TRIALS, workers=2)
    check_chosen(tmp_path, study)


@pytest.mark.services
@pytest.mark.slow
def test_the_sweep_through_submitit_slurm_runs_each_job_on_the_cluster(make_tiny_model, tmp_path, slurm_cluster):
    """The shipped clawly/conf/hydra/launcher/slurm.yaml, made to fit this CPU-only one-node cluster."""
    sweep_dir = sweep(
        tmp_path,
        make_tiny_model("llama"),
        "hydra/launcher=slurm",
        "hydra.launcher.gpus_per_node=null",
        "hydra.launcher.cpus_per_task=1",
        "hydra.launcher.mem_gb=2",
        "hydra.launcher.timeout_min=20",
        "+preset=default,full",
        env=slurm_cluster,
    )
    jobs = jobs_of(sweep_dir)
    check_grid(jobs, ["+preset=default", "+preset=full"])
    # each job ran as a task of one Slurm array job (its environment says so), in submitit's folder of that task
    slurm = sorted((job["slurm_job"], job["slurm_task"]) for job in jobs.values())
    assert slurm[0][0] is not None and slurm[0][0] == slurm[1][0] and [t for _, t in slurm] == ["0", "1"]
    for array, task in slurm:
        log = (sweep_dir / ".submitit" / f"{array}_{task}" / f"{array}_{task}_0_log.out").read_text()
        assert f"job_id={array}_{task}" in log
    assert "slurm_job" in pd.read_csv(sweep_table_csv(sweep_dir)).columns


def sweep_table_csv(sweep_dir: Path) -> Path:
    proc = subprocess.run(
        [sys.executable, "-m", "clawly.sweep", str(sweep_dir)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr
    return sweep_dir / "sweep.csv"
