"""The house rules that keep the pipeline honest: dvc.yaml's code deps come from the imports, each
stage runs its own step module, no import cycles, imports at the top unless deferred on purpose."""

import ast
from pathlib import Path

import pytest
import yaml

from stages.deps import ROOT, code_closure, imported_modules, module_file, rewrite, stage_code

DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())
STAGES = list(DVC["stages"])


def test_dvc_yaml_lists_exactly_the_code_each_stage_imports():
    assert (ROOT / "dvc.yaml").read_text() == rewrite(), (
        "dvc.yaml's code deps differ from what the stages import: run `python -m stages.deps` to see how, "
        "`python -m stages.deps --write` to fix"
    )


@pytest.mark.parametrize("stage", STAGES)
def test_a_stage_is_one_hop_from_its_step_and_only_it_runs_that_step(stage):
    module = stage.replace("-", "_")
    spec = DVC["stages"][stage]
    assert spec["cmd"] == f"python -m stages.{module} ${{hydra}}"
    step = f"clawly/steps/{module}.py"
    assert step in spec["deps"] and step in stage_code(stage)
    assert "def run(" in (ROOT / step).read_text()
    others = [s for s in STAGES if s != stage and step in DVC["stages"][s]["deps"]]
    assert not others, f"{step} would rerun {others} too"


def test_params_name_keys_that_exist_and_never_the_machines_model_cache():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for stage, spec in DVC["stages"].items():
        for key in spec.get("params", []):
            node = params
            for part in key.split("."):
                assert isinstance(node, dict) and part in node, f"{stage}: no param {key} in params.yaml"
                node = node[part]
            assert key not in ("model", "model.cache_dir"), f"{stage}: {key} reruns it when only the cache moves"


def test_the_closure_follows_function_level_imports_and_package_inits(tmp_path, monkeypatch):
    import stages.deps as deps

    pkg = tmp_path / "clawly"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("def __getattr__(name):\n    from clawly import heavy\n")
    (pkg / "heavy.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from clawly import shared\n")
    (pkg / "shared.py").write_text("")
    (pkg / "sub" / "step.py").write_text("def run():\n    from clawly.late import thing\n")
    (pkg / "late.py").write_text("import clawly.leaf\n")
    (pkg / "leaf.py").write_text("import os\n")
    monkeypatch.setattr(deps, "ROOT", tmp_path)
    assert deps.code_closure(pkg / "sub" / "step.py") == [
        "clawly/__init__.py",
        "clawly/late.py",
        "clawly/leaf.py",
        "clawly/shared.py",
        "clawly/sub/__init__.py",
        "clawly/sub/step.py",
    ]  # not heavy.py: a package __init__'s function bodies do not run on import


def _project_modules() -> dict[str, Path]:
    out = {}
    for path in sorted((ROOT / "clawly").rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def test_clawly_has_no_import_cycles():
    modules = _project_modules()
    graph = {name: {m for m in imported_modules(path) if m in modules and m != name} for name, path in modules.items()}
    # a package imports its submodules only lazily (clawly/__init__.py's Pipeline), never in cycles
    state: dict[str, int] = {}

    def visit(name, trail):
        if state.get(name) == 1:
            raise AssertionError("import cycle: " + " -> ".join([*trail, name]))
        if state.get(name) == 2:
            return
        state[name] = 1
        for dep in sorted(graph[name]):
            visit(dep, [*trail, name])
        state[name] = 2

    for name in modules:
        visit(name, [])


# Who may import whom: a module imports its own package and the layers below, never a layer above
# or a sibling of its own layer (docs/architecture.md draws it). The top-level modules that are not
# doors are the core.
LAYERS = [
    (
        "core",
        {
            "clawly",
            "clawly.errors",
            "clawly.io",
            "clawly.log",
            "clawly.paths",
            "clawly.redact",
            "clawly.settings",
            "clawly.settings_docs",
        },
    ),
    ("data", {"clawly.data"}),
    ("model", {"clawly.model"}),  # one layer, two packages
    ("measure", {"clawly.measure"}),
    ("ablate", {"clawly.ablate"}),
    ("search", {"clawly.search"}),
    ("save", {"clawly.save"}),  # one layer
    ("steps", {"clawly.steps"}),
    ("doors", {"clawly.api", "clawly.cli", "clawly.sweep", "clawly.web"}),
]
RANK = {"core": 0, "data": 1, "model": 1, "measure": 2, "ablate": 3, "search": 4, "save": 4, "steps": 5, "doors": 6}


def layer_of(module: str) -> str:
    """The layer of a dotted clawly module (the longest package or module named in LAYERS)."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        for layer, names in LAYERS:
            if prefix in names:
                return layer
    raise AssertionError(f"{module} is in no layer: add it to LAYERS (tests/test_layout.py)")


def import_direction_problems(root: Path) -> list[str]:
    """Every import (module level or in a function) that goes up a layer or sideways between two
    packages of one layer; clawly/__init__.py's lazy public names are the one exception."""
    problems = []
    for path in sorted((root / "clawly").rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if name == "clawly":
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("clawly"):
                targets = [node.module if node.module != "clawly" else f"clawly.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("clawly")]
            else:
                continue
            for target in targets:
                if target == "clawly" or target in ("clawly.__version__",):
                    continue
                mine, theirs = layer_of(name), layer_of(target)
                if RANK[theirs] > RANK[mine] or (RANK[theirs] == RANK[mine] and theirs != mine):
                    problems.append(
                        f"{path.relative_to(root)}:{node.lineno}: {name} ({mine}) imports {target} ({theirs})"
                    )
    return problems


def test_imports_go_down_the_layers():
    assert import_direction_problems(ROOT) == []


def test_the_layer_check_sees_a_lower_package_importing_a_door(tmp_path):
    """The same check on a scratch copy in which the model package imports the CLI must fail."""
    import shutil

    shutil.copytree(ROOT / "clawly", tmp_path / "clawly")
    loading = tmp_path / "clawly" / "model" / "loading.py"
    loading.write_text(
        loading.read_text() + "\n\ndef _door():\n    from clawly.cli import main  # deferred: a test\n    return main\n"
    )
    problems = import_direction_problems(tmp_path)
    assert problems == [
        f"clawly/model/loading.py:{len(loading.read_text().splitlines()) - 1}: clawly.model.loading "
        "(model) imports clawly.cli (doors)"
    ]


def test_every_package_says_what_lives_there_and_what_it_may_import():
    for init in sorted((ROOT / "clawly").glob("*/__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert len(doc) > 120, f"{init.relative_to(ROOT)}: say what lives here and what it may import"
        if init.parent.name not in ("steps", "web"):
            assert "import" in doc.lower(), f"{init.relative_to(ROOT)}: say what it may import"


def test_imports_are_at_the_top_unless_deferred_with_a_reason():
    """A deferred import says why in a comment (on its line or the three before): a heavy engine
    kept out of `clawly --help`, an optional package, a lazy attribute."""
    for path in _project_modules().values():
        lines = path.read_text().splitlines()
        tree = ast.parse("\n".join(lines))
        top = set(map(id, tree.body))
        guarded = {id(n) for node in tree.body if isinstance(node, ast.If) for n in node.body}  # TYPE_CHECKING
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top | guarded:
                context = " ".join(lines[max(0, node.lineno - 4) : node.lineno]).lower()
                assert any(w in context for w in ("deferred", "optional", "lazy")), (
                    f"{path.relative_to(ROOT)}:{node.lineno}: move the import to the top, or say why it waits"
                )


def test_every_stage_module_resolves():
    for stage in STAGES:
        assert module_file(f"stages.{stage.replace('-', '_')}") is not None
        assert code_closure(ROOT / "stages" / f"{stage.replace('-', '_')}.py")


def _defined_names(path: Path) -> set[str]:
    """Names a module defines at its top level (functions, classes, assignments, imports, __all__)."""
    names: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
            if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "__all__" for t in node.targets):
                names.update(ast.literal_eval(node.value))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.If):  # `if TYPE_CHECKING:` and the like
            names.update(_defined_names_of(node.body))
    return names


def _defined_names_of(body: list) -> set[str]:
    out = set()
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            out.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            out.add(node.name)
    return out


def test_every_import_of_project_code_names_a_module_or_name_that_exists():
    """A module moved without updating an import is caught here, even where an installed copy of
    older code (an editable install of another checkout) would satisfy the import at run time."""
    wrong = []
    for folder in ("clawly", "stages", "bench", "tests", "examples"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    targets = [(a.name, None) for a in node.names if a.name.split(".")[0] in ("clawly", "stages")]
                elif (
                    isinstance(node, ast.ImportFrom)
                    and node.level == 0
                    and node.module
                    and node.module.split(".")[0] in ("clawly", "stages")
                ):
                    targets = [(node.module, a.name) for a in node.names]
                else:
                    continue
                for module, name in targets:
                    where = f"{path.relative_to(ROOT)}:{node.lineno}"
                    file = module_file(module)
                    if file is None:
                        wrong.append(f"{where}: no module {module}")
                    elif (
                        name
                        and name != "*"
                        and module_file(f"{module}.{name}") is None
                        and name not in _defined_names(file)
                    ):
                        wrong.append(f"{where}: {module} has no {name}")
    assert not wrong, "imports of code that does not exist:\n" + "\n".join(wrong)
