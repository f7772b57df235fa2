"""fedsim as a user installs it: a wheel with its configs, and every import declared."""

import ast
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("fedsim", "strategies", "clients")
# Imported only inside a function, guarded, for a feature that works without it.
UNDECLARED_OPTIONAL = {"pandas"}  # fedsim.load_run returns plain lists without it
# Where a package an extra names is not installed here, the module it provides.
MODULE_OF = {"mlflow-skinny": "mlflow"}


def _project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _names(requirements: list[str]) -> set[str]:
    return {canonicalize_name(Requirement(r).name) for r in requirements}


def _imports() -> dict[str, bool]:
    """Third-party top-level modules the package imports; value: imported at module level."""
    found: dict[str, bool] = {}
    for root in SOURCES:
        for path in (REPO / root).rglob("*.py"):
            tree = ast.parse(path.read_text())
            at_top = {id(node) for node in tree.body}
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    modules = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    modules = [node.module]
                else:
                    continue
                for module in modules:
                    top = module.split(".")[0]
                    if top not in sys.stdlib_module_names and top != "fedsim":
                        found[top] = found.get(top, False) or id(node) in at_top
    return found


def test_every_runtime_import_is_a_declared_dependency() -> None:
    project = _project()
    required = _names(project["dependencies"])
    extras = {
        name: _names(reqs)
        for name, reqs in project["optional-dependencies"].items()
        if name not in ("test", "bench")
    }
    distributions = importlib.metadata.packages_distributions()
    optional_modules = {MODULE_OF.get(d, d) for deps in extras.values() for d in deps}
    undeclared = []
    for module, at_top in sorted(_imports().items()):
        names = {canonicalize_name(d) for d in distributions.get(module, [module])}
        if names & required:
            continue
        optional = module in optional_modules or any(names & deps for deps in extras.values())
        if at_top or not (optional or module in UNDECLARED_OPTIONAL):
            undeclared.append(module)
    assert not undeclared, f"imported but not in pyproject's dependencies: {undeclared}"


def test_the_demo_config_ships_inside_the_package() -> None:
    assert (REPO / "fedsim" / "configs" / "demo.toml").is_file()
    package_data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "configs/*.toml" in package_data["package-data"]["fedsim"]


def _copy_source(to: Path) -> Path:
    """Copy the project without its venv, runs and git: the build must not touch the checkout."""
    ignore = shutil.ignore_patterns(".venv", ".git", "runs", "build", "dist", "*.egg-info",
                                    "__pycache__", ".mypy_cache", ".ruff_cache")  # fmt: skip
    return Path(shutil.copytree(REPO, to, ignore=ignore, symlinks=True))


def _run(command: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    done = subprocess.run(
        command, cwd=cwd, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )  # fmt: skip
    assert done.returncode == 0, f"{command}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.mark.slow
def test_the_wheel_installs_into_a_new_venv_and_runs_the_packaged_demo(tmp_path: Path) -> None:
    source = _copy_source(tmp_path / "src")
    dist = tmp_path / "dist"
    # --no-isolation: the build backend (setuptools) comes from this venv, not a download.
    _run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist)],
         cwd=source, timeout=300)  # fmt: skip
    (wheel,) = dist.glob("fedsim-*.whl")

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], cwd=tmp_path, timeout=120)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--no-compile"]
    constraints = ["-c", str(REPO / "constraints.txt")]
    _run([*pip, *constraints, "torch"], cwd=tmp_path, timeout=600)  # the CPU build first
    _run([*pip, *constraints, str(wheel)], cwd=tmp_path, timeout=900)

    work = tmp_path / "work"  # no configs folder here: the demo comes from the package
    work.mkdir()
    fedsim = str(venv / "bin" / "fedsim")
    version = _run([fedsim, "--version"], cwd=work, timeout=60).stdout
    assert version.strip() == f"fedsim {_project()['version']}"
    _run([fedsim, "demo", "--set", "rounds=2", "--set", "progress=false"], cwd=work, timeout=300)
    summary = json.loads((work / "runs" / "demo" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds"] == 2
