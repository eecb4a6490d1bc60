"""The ``ai-handler`` commands work end to end on a real SQLite database and fail clearly.

Proves, through ``cli.main([...])`` with ``AI_HANDLER_DATABASE_URL`` pointing at a fresh SQLite
file: ``db upgrade`` migrates; ``credits grant|show`` move and report credits (idempotent with
--key); ``submit`` prints the new id and ``status`` prints the row as JSON; bad input of every
kind ends with ``error: ...`` and exit code 2, an unmigrated database with exit code 1; ``ledger
verify`` passes on a consistent ledger and exits 1 naming the problem after a cached balance is
corrupted or an entry is deleted by raw SQL; every command, the other parts' included, is
registered and listed by ``--help``, and a command module that cannot be imported stops the CLI
with an ImportError (regression: the CLI skipped a missing one, whose commands then vanished
without a word).
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from ai_handler_dagster import cli, db
from ai_handler_dagster.db.engine import dispose_engines, make_engine
from ai_handler_dagster.domain import InvalidText
from ai_handler_dagster.errors import GenerationError


@pytest.fixture
def db_url(sqlite_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setenv("AI_HANDLER_DATABASE_URL", sqlite_url)
    monkeypatch.delenv("AI_HANDLER_PRICING_FILE", raising=False)
    yield sqlite_url
    dispose_engines()


@pytest.fixture
def migrated(db_url: str, capsys: pytest.CaptureFixture[str]) -> str:
    assert cli.main(["db", "upgrade"]) == 0
    capsys.readouterr()
    return db_url


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_db_upgrade_reports_the_revision(db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "db", "upgrade")
    assert code == 0
    head = db.head_revision()
    assert f"is at revision {head} (head {head})" in out
    assert sa.inspect(make_engine(db_url)).has_table("generations")


def test_credits_grant_and_show(migrated: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "credits", "grant", "alice", "100", "--key", "welcome")
    assert code == 0
    assert "granted 100 credits" in out and "alice: balance 100, held 0, available 100" in out
    # Same key again: no second grant.
    assert run(capsys, "credits", "grant", "alice", "100", "--key", "welcome")[0] == 0
    assert run(capsys, "credits", "grant", "alice", "20")[0] == 0
    code, out, _ = run(capsys, "credits", "show", "alice", "--json")
    assert code == 0
    assert json.loads(out) == {"user": "alice", "balance": 120, "held": 0, "available": 120}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["credits", "grant", "alice", "ten"],
            "AMOUNT must be a whole number of credits, got 'ten'",
        ),
        (["credits", "grant", "alice", "-5"], "AMOUNT must be a whole number"),
        (["credits", "grant", "alice", "1.5"], "AMOUNT must be a whole number"),
        (["credits", "grant", "alice", "0"], "amount must be between 1 and"),
        (["credits", "grant", "alice", "1" + "0" * 16], "amount must be between 1 and"),
        (["credits", "show", "nobody"], "unknown user 'nobody'"),
        (["status", "abc"], "ID must be a generation id"),
        (["status", "999"], "unknown generation 999"),
    ],
)
def test_credit_and_status_errors(
    migrated: str, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert err.startswith("error: ") and message in err
    assert out == ""


def test_grant_key_reused_for_another_amount_is_refused(
    migrated: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(capsys, "credits", "grant", "alice", "100", "--key", "k")[0] == 0
    code, _, err = run(capsys, "credits", "grant", "alice", "50", "--key", "k")
    assert code == 2 and "grant key 'k' was already used for 100 credits" in err


def test_submit_then_status(migrated: str, capsys: pytest.CaptureFixture[str]) -> None:
    run(capsys, "credits", "grant", "alice", "100")
    code, out, _ = run(
        capsys,
        "submit",
        "--user",
        "alice",
        "--model",
        "demo/pixel-sketch",
        "--input",
        '{"prompt": "a fox", "seed": 7}',
        "--request-id",
        "r1",
    )
    assert code == 0
    gid = int(out.strip())
    # The same request id again prints the same id.
    again = run(
        capsys,
        "submit",
        "--user",
        "alice",
        "--model",
        "demo/pixel-sketch",
        "--input",
        '{"prompt": "a fox", "seed": 7}',
        "--request-id",
        "r1",
    )
    assert again[:2] == (0, f"{gid}\n")
    code, out, _ = run(capsys, "status", str(gid))
    assert code == 0
    data = json.loads(out)
    assert data["id"] == gid
    assert (data["status"], data["user_id"], data["model"]) == (
        "pending",
        "alice",
        "demo/pixel-sketch",
    )
    assert data["input"] == {"prompt": "a fox", "seed": 7}


def test_submit_reads_input_from_a_file(
    migrated: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    run(capsys, "credits", "grant", "alice", "100")
    payload = tmp_path / "input.json"
    payload.write_text('{"prompt": "from a file"}')
    code, out, _ = run(
        capsys,
        "submit",
        "--user",
        "alice",
        "--model",
        "demo/pixel-sketch",
        "--input",
        f"@{payload}",
    )
    assert code == 0
    assert json.loads(run(capsys, "status", out.strip())[1])["input"] == {"prompt": "from a file"}


@pytest.mark.parametrize(
    ("user", "model", "payload", "message"),
    [
        ("alice", "demo/pixel-sketch", "{not json", "--input is not valid JSON"),
        ("alice", "demo/pixel-sketch", "@/nonexistent/in.json", "cannot read input file"),
        ("alice", "demo/pixel-sketch", '["a"]', "input must be a JSON object"),
        ("alice", "demo/pixel-sketch", '{"prompt": "\\u0007"}', "control character U+0007"),
        ("alice", "pixel-sketch", "{}", "is not 'owner/name'"),
        ("alice", "deployment:acme/sketcher:v1", "{}", "a deployment has no ':version'"),
        ("alice", "deployment:acme", "{}", "is not 'deployment:owner/name'"),
        # Parsed, then refused by the default table, which prices no deployment.
        ("alice", "deployment:acme/sketcher", "{}", "'deployment:acme/sketcher' has no price"),
        ("alice", "demo/nope", "{}", "has no price"),
        ("nobody", "demo/pixel-sketch", "{}", "unknown user 'nobody'"),
        ("poor", "demo/haiku-text", "{}", "3 available, 60 needed"),
        (
            "alice",
            "demo/pixel-sketch",
            '{"prompt": "x", "num_outputs": 9}',
            "input field 'num_outputs' must be a whole number from 1 to 4",
        ),
    ],
)
def test_submit_errors(
    migrated: str,
    capsys: pytest.CaptureFixture[str],
    user: str,
    model: str,
    payload: str,
    message: str,
) -> None:
    run(capsys, "credits", "grant", "alice", "100")
    run(capsys, "credits", "grant", "poor", "3")
    code, out, err = run(capsys, "submit", "--user", user, "--model", model, "--input", payload)
    assert code == 2
    assert err.startswith("error: ") and message in err
    assert out == ""
    with make_engine(migrated).connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM generations").scalar() == 0


def test_submit_names_a_deployment_priced_by_the_table(
    migrated: str,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    table = tmp_path / "prices.toml"
    table.write_text('[models."deployment:acme/sketcher"]\ncredits = 7\n')
    monkeypatch.setenv("AI_HANDLER_PRICING_FILE", str(table))
    run(capsys, "credits", "grant", "alice", "10")
    code, out, err = run(
        capsys,
        "submit",
        "--user",
        "alice",
        "--model",
        "deployment:acme/sketcher",
        "--input",
        '{"prompt": "a fox"}',
    )
    assert (code, err) == (0, "")
    data = json.loads(run(capsys, "status", out.strip())[1])
    assert (data["model"], data["amount_held"]) == ("deployment:acme/sketcher", 7)


def test_missing_arguments_are_usage_errors(
    migrated: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, "submit", "--user", "alice")
    assert code == 2 and "required" in err
    assert run(capsys, "credits")[0] == 2
    assert run(capsys, "--help")[0] == 0


#: Every command of ``ai-handler``: this module's, then those the other parts register.
COMMANDS = (
    *("db", "ledger", "credits", "submit", "status", "cancel", "demo", "instance"),
    *("dev", "bench", "webhooks", "chaos", "priority", "usage", "serve", "keys"),
)

#: The modules of the other parts whose ``register`` adds commands.
COMMAND_MODULES = (
    "ai_handler_dagster.devstack.commands",
    "ai_handler_dagster.proving.bench",
    "ai_handler_dagster.webhooks.commands",
    "ai_handler_dagster.proving.chaos",
    "ai_handler_dagster.priorities",
    "ai_handler_dagster.usage",
    "ai_handler_dagster.api.commands",
)


def test_every_registered_command_is_listed_by_help(capsys: pytest.CaptureFixture[str]) -> None:
    parser = cli.build_parser()
    [commands] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert tuple(commands.choices) == COMMANDS
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for name in commands.choices:
        assert re.search(rf"^    {name} +\S", out, re.MULTILINE), f"{name} is not in --help"


@pytest.mark.parametrize("module", COMMAND_MODULES)
def test_a_missing_command_module_is_an_import_error(
    module: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    package, _, name = module.rpartition(".")
    # As if the module did not exist: None in sys.modules makes importing it fail.
    monkeypatch.delattr(importlib.import_module(package), name, raising=False)
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(ImportError, match=re.escape(module)):
        cli.build_parser()


def test_unmigrated_database_is_reported(db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "credits", "show", "alice")
    assert code == 1
    assert "no such table" in err and "ai-handler db upgrade" in err


def test_bad_environment_is_a_config_error(
    migrated: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AI_HANDLER_DATABASE_URL")
    monkeypatch.setenv("AI_HANDLER_ENV", "production")
    code, _, err = run(capsys, "credits", "show", "alice")
    assert code == 2 and "AI_HANDLER_DATABASE_URL must be set" in err


def _ledger_with_activity(capsys: pytest.CaptureFixture[str], url: str) -> None:
    from ai_handler_dagster import generations, ledger
    from ai_handler_dagster.db.engine import session_scope
    from ai_handler_dagster.pricing import load_pricing

    run(capsys, "credits", "grant", "alice", "100")
    prices = load_pricing()
    with session_scope(make_engine(url)) as session:
        row = generations.submit(
            session, user_id="alice", model="demo/pixel-sketch", input={"p": 1}, prices=prices
        )
        generations.start_attempt(session, row.id, run_id="r", prices=prices)
        assert ledger.balance(session, "alice").held == 5


def test_ledger_verify_passes_then_catches_a_corrupted_balance(
    migrated: str, capsys: pytest.CaptureFixture[str]
) -> None:
    _ledger_with_activity(capsys, migrated)
    code, out, _ = run(capsys, "ledger", "verify")
    assert code == 0
    assert out.startswith("ledger OK: 1 accounts, 1 holds, 2 entries, 1 generations checked")
    with make_engine(migrated).begin() as conn:
        conn.exec_driver_sql("UPDATE accounts SET balance = balance + 50")
    code, out, _ = run(capsys, "ledger", "verify")
    assert code == 1
    assert "1 violation(s)" in out
    assert "account 1 (user 'alice'): cached balance 150 != 100" in out


def test_ledger_verify_catches_a_deleted_entry(
    migrated: str, capsys: pytest.CaptureFixture[str]
) -> None:
    _ledger_with_activity(capsys, migrated)
    with make_engine(migrated).begin() as conn:
        conn.exec_driver_sql("DELETE FROM ledger_entries WHERE kind = 'grant'")
    code, out, _ = run(capsys, "ledger", "verify")
    assert code == 1
    assert "cached balance 100 != 0, the sum of its ledger entries" in out


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (GenerationError("provider_unavailable", "Replicate answered HTTP 503"), 1),
        (InvalidText("user id contains control character U+0001 at position 3"), 2),
        (RuntimeError("a bug"), None),
    ],
)
def test_the_project_s_errors_map_to_exit_codes_and_bugs_keep_their_traceback(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    error: Exception,
    code: int | None,
) -> None:
    # One base class (AiHandlerError) replaced a hand-kept tuple of exception classes; a
    # provider failure is not the input's fault (1), a refusal is (2), anything else is a bug.
    def failing(_args: argparse.Namespace) -> int:
        raise error

    monkeypatch.setattr(cli, "cmd_status", failing)
    if code is None:
        with pytest.raises(RuntimeError, match="a bug"):
            cli.main(["status", "1"])
        return
    assert cli.main(["status", "1"]) == code
    assert capsys.readouterr().err.strip() == f"error: {error}"
