"""The package's layout rules, checked on its source: Dagster's private modules only in
``runtime/``, and no Dagster at all in the provider client or the domain vocabulary."""

from __future__ import annotations

import ast
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
