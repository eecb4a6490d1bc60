"""The package's layout rules, checked on its source: Dagster's private modules only in
``runtime/``, and no Dagster at all in the provider client or the domain vocabulary."""

from __future__ import annotations

import ast
import os
import pickle
import subprocess
import sys
from pathlib import Path

import ai_handler_dagster

PACKAGE = Path(ai_handler_dagster.__file__).parent


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_only_runtime_imports_dagsters_private_modules() -> None:
    offenders = {
        str(path.relative_to(PACKAGE)): sorted(
            n for n in _imports(path) if n.startswith("dagster._")
        )
        for path in _modules()
        if path.relative_to(PACKAGE).parts[0] != "runtime"
    }
    assert {k: v for k, v in offenders.items() if v} == {}
    runtime = [p for p in _modules() if p.relative_to(PACKAGE).parts[0] == "runtime"]
    assert any(n.startswith("dagster._") for p in runtime for n in _imports(p))


def test_the_domain_vocabulary_imports_no_framework() -> None:
    for name in ("domain.py", "errors.py"):
        imported = _imports(PACKAGE / name)
        assert not {n for n in imported if n.split(".")[0] in {"dagster", "sqlalchemy"}}, name


def test_step_outputs_pickled_before_the_ops_moved_still_load() -> None:
    # The S3 pickle IO manager stores step outputs under their class's module path; a run
    # retried after the upgrade reads what its crashed try wrote under orchestration.ops.
    from ai_handler_dagster.orchestration.generation import AwaitedPrediction, Held

    for value in (Held(7, 2), AwaitedPrediction(7, 2, "p1", ["x"], 1.5)):
        written = pickle.dumps(value, protocol=2)  # names its class as text: "module\nname"
        old = written.replace(
            b"ai_handler_dagster.orchestration.generation", b"ai_handler_dagster.orchestration.ops"
        )
        assert old != written
        assert pickle.loads(old) == value


def test_an_awaited_prediction_pickled_before_it_carried_metrics_still_loads() -> None:
    """Regression guard: a run retried after the upgrade reads the await step's output written
    before ``AwaitedPrediction.metrics`` existed; it must load (metrics None, so a per-token
    price charges the hold) rather than fail the retried step."""
    from ai_handler_dagster.orchestration.generation import AwaitedPrediction

    new = AwaitedPrediction(7, 2, "p1", ["x"], 1.5, metrics={"predict_time": 1.5})
    before = object.__new__(AwaitedPrediction)
    before.__dict__.update({k: v for k, v in vars(new).items() if k != "metrics"})
    loaded = pickle.loads(pickle.dumps(before, protocol=2))
    assert loaded == AwaitedPrediction(7, 2, "p1", ["x"], 1.5)
    assert loaded.metrics is None


def test_a_deployment_written_before_the_move_still_starts(tmp_path: Path) -> None:
    # dagster.yaml files written by `ai-handler instance write` before runtime/ existed name
    # ai_handler_dagster.launcher, and process managers run `python -m ai_handler_dagster.daemon`.
    from ai_handler_dagster import instance

    home = tmp_path / "home"
    config = instance.local_config()
    config["run_launcher"]["module"] = "ai_handler_dagster.launcher"
    instance.write(home, config)
    probe = (
        "import warnings; warnings.simplefilter('error', FutureWarning)\n"
        "from dagster import DagsterInstance\n"
        "try:\n"
        "    DagsterInstance.get().run_launcher\n"
        "except Exception as exc:\n"
        "    print('refused:', 'deprecated' in str(exc), 'runtime.launcher' in str(exc))\n"
    )
    env = {**os.environ, "DAGSTER_HOME": str(home)}
    out = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.stdout.strip() == "refused: True True", out.stderr
    loads = "from dagster import DagsterInstance; print(type(DagsterInstance.get().run_launcher))"
    out = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", loads], env=env, capture_output=True, text=True
    )
    assert "runtime.launcher.LocalRunLauncher" in out.stdout, out.stderr
    out = subprocess.run(
        [sys.executable, "-m", "ai_handler_dagster.daemon", "run", "--help"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "python -m ai_handler_dagster.runtime.daemon" in out.stderr
    assert "--workspace" in out.stdout or "-w" in out.stdout
