"""The code each DVC stage runs, computed from the imports: what dvc.yaml must list as its deps.

    python -m stages.deps            # list what differs from dvc.yaml
    python -m stages.deps --write    # rewrite the code deps in dvc.yaml (data deps are kept)

A stage's code is `stages/<stage>.py` and every project module it imports, transitively: imports
at any depth of a module count (they run when the stage calls that code), except inside a
package's `__init__.py`, where only module-level imports run on import (clawly/__init__.py's
lazy `Pipeline` attribute is never touched by a stage). Importing `a.b.c` runs `a/__init__.py`
and `a/b/__init__.py` too. Only files under clawly/ and stages/ are project code.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("clawly", "stages")


def module_file(name: str) -> Path | None:
    """The project file of a dotted module name, or None (not project code, or not a module)."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Dotted names of every module `path` imports (`from a import b` yields a and, if a module, a.b)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    nodes = tree.body if path.name == "__init__.py" else list(ast.walk(tree))
    names: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def code_closure(entry: Path) -> list[str]:
    """Repository paths of `entry` and every project file it runs on import, sorted."""
    seen: set[Path] = set()
    todo = [entry]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in imported_modules(path) | {_module_name(path)}:
            parts = name.split(".")
            for i in range(1, len(parts) + 1):  # the packages on the way run too
                found = module_file(".".join(parts[:i]))
                if found is not None and found not in seen:
                    todo.append(found)
    return sorted(str(p.relative_to(ROOT)) for p in seen)


def is_code(dep: str) -> bool:
    return dep.endswith(".py") and dep.split("/")[0] in PACKAGES


def stage_code(stage: str) -> list[str]:
    return code_closure(ROOT / "stages" / f"{stage.replace('-', '_')}.py")


def expected_deps(dvc_yaml: Path = ROOT / "dvc.yaml") -> dict[str, list[str]]:
    """Stage -> the deps dvc.yaml should list: its code (computed), then its data deps as listed."""
    stages = yaml.safe_load(dvc_yaml.read_text())["stages"]
    return {
        name: stage_code(name) + [d for d in spec.get("deps", []) if not is_code(d)] for name, spec in stages.items()
    }


def rewrite(dvc_yaml: Path = ROOT / "dvc.yaml") -> str:
    """dvc.yaml's text with each stage's deps list replaced by `expected_deps` (all else as it was)."""
    expected = expected_deps(dvc_yaml)
    out, stage, in_deps = [], None, False
    for line in dvc_yaml.read_text().splitlines():
        if line.startswith("  ") and not line.startswith("   ") and line.rstrip().endswith(":"):
            stage, in_deps = line.strip()[:-1], False
        if in_deps and line.startswith("    - "):
            continue
        in_deps = in_deps and line.startswith("    - ")
        out.append(line)
        if stage in expected and line == "    deps:":
            out += [f"    - {d}" for d in expected[stage]]
            in_deps = True
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    text = rewrite()
    if "--write" in sys.argv[1:]:
        (ROOT / "dvc.yaml").write_text(text)
        print("rewrote the code deps in dvc.yaml")
    else:
        current = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
        for name, deps in expected_deps().items():
            listed = current[name].get("deps", [])
            missing, extra = sorted(set(deps) - set(listed)), sorted(set(listed) - set(deps))
            if missing or extra:
                print(f"{name}: missing {missing}, not imported {extra}")
        print(
            "dvc.yaml lists exactly the code each stage imports"
            if text == (ROOT / "dvc.yaml").read_text()
            else "run `python -m stages.deps --write`"
        )
