"""``requirements.lock`` pins what ``pyproject.toml`` asks for.

``make install`` installs exactly the locked set (hash-checked); a dependency added to or changed
in ``pyproject.toml`` without ``make lock`` would otherwise be missing or another release than
the one asked for, and only a fresh clone would find out.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def _locked() -> dict[str, str]:
    pins = re.findall(
        r"^([A-Za-z0-9_.\-]+)==([^\s;\\]+)", (ROOT / "requirements.lock").read_text(), re.M
    )
    return {canonicalize_name(name): version for name, version in pins}


def test_every_dependency_is_locked_at_an_allowed_release() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [*project["dependencies"], *project["optional-dependencies"]["dev"]]
    locked = _locked()
    for line in wanted:
        requirement = Requirement(line)
        name = canonicalize_name(requirement.name)
        assert name in locked, f"{name} is not in requirements.lock: run make lock"
        assert requirement.specifier.contains(locked[name], prereleases=True), (
            f"requirements.lock has {name}=={locked[name]}, pyproject.toml asks {requirement}"
        )


def test_the_lock_names_no_index() -> None:
    # Installs follow the installer's configured index; the file carries only names and hashes.
    text = (ROOT / "requirements.lock").read_text()
    assert "--index-url" not in text and "://" not in text
    assert all("--hash=sha256:" in block for block in re.split(r"\n(?=\S)", text) if "==" in block)
