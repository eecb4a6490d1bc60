"""The chaos soak and its audit.

Proves that:

- the audit (``proving.audit.audit``) reports every kind of violation it exists for, on a
  hand-made database state with one of each (a generation left running and its hold left open,
  a balance that is not grants minus captures, cached sums that disagree with the entries, an
  available balance that went negative between entries, two holds for one attempt and a hold
  ended twice, a failed generation whose hold was captured, a charge that differs from its
  capture, a second paid prediction for one attempt, a paid orphan nobody canceled, an S3 object
  whose bytes are not the emulator's and one that is missing, a stuck prediction left running),
  names whom each concerns, and finds nothing wrong with the clean generations beside them (a
  lost create that ran on after its crashed attempt was refunded is that attempt's one paid
  prediction, not a second one);
- the price checks recompute each hold from the price table and each capture from the
  provider's reported counts (predict_time, token counts, the outputs it returned), for every
  price kind, and catch a wrong charge of each kind, a wrong hold, and a failed generation that
  captured something (crafted rows);
- the soak's plan is a function of its seed: the same seed gives the same load and faults, and
  users on small balances ask for more than they can pay;
- the local S3 endpoint's outage control goes offline and comes back on the same port with every
  object, in process and through ``SIGUSR1`` to the endpoint's process;
- ``ai-handler chaos`` with two different seeds, through the real stack (PostgreSQL, emulator
  faults, run workers killed, the daemon restarted, an S3 outage, database connections
  terminated, a rate-limited phase, every kind of price), settles every generation with zero
  violations, its charges checked against the price table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from ai_handler_dagster.db import upgrade
from ai_handler_dagster.devstack.s3 import LocalS3, local_s3_client, start_local_s3
from ai_handler_dagster.pricing import load_pricing, parse_pricing
from ai_handler_dagster.proving import audit, chaos
from ai_handler_dagster.settings import DEFAULT_BUCKET

MODEL = "demo/pixel-sketch"
PNG_A = b"\x89PNG\r\n\x1a\n" + b"a" * 40
PNG_B = b"\x89PNG\r\n\x1a\n" + b"b" * 40
PNG_OTHER = b"\x89PNG\r\n\x1a\n" + b"z" * 40


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.3)
        return sock.connect_ex(("127.0.0.1", port)) == 0


# --- a hand-made database state --------------------------------------------------------------


class Books:
    """Writes accounts, holds, entries and generations with plain SQL, as a corrupting hand
    (or a bug) could."""

    def __init__(self, conn: sa.Connection) -> None:
        self.conn = conn
        self.keys = 0

    def _key(self) -> str:
        self.keys += 1
        return f"k{self.keys}"

    def account(self, user: str, balance: int, held: int = 0) -> int:
        return int(
            self.conn.execute(
                sa.text(
                    "INSERT INTO accounts (user_id, balance, held) VALUES (:u, :b, :h) RETURNING id"
                ),
                {"u": user, "b": balance, "h": held},
            ).scalar_one()
        )

    def entry(
        self,
        account: int,
        kind: str,
        amount: int,
        balance_delta: int,
        held_delta: int,
        hold: int | None = None,
    ) -> None:
        self.conn.execute(
            sa.text(
                "INSERT INTO ledger_entries (account_id, hold_id, kind, amount, balance_delta, "
                "held_delta, idempotency_key) VALUES (:a, :h, :k, :m, :bd, :hd, :key)"
            ),
            {
                "a": account,
                "h": hold,
                "k": kind,
                "m": amount,
                "bd": balance_delta,
                "hd": held_delta,
                "key": self._key(),
            },
        )

    def grant(self, account: int, amount: int, balance_delta: int | None = None) -> None:
        delta = amount if balance_delta is None else balance_delta
        self.entry(account, "grant", amount, delta, 0)

    def hold(
        self,
        account: int,
        generation: int,
        amount: int,
        *,
        ends: tuple[str, ...] = (),
        captured: int = 0,
    ) -> int:
        """A hold with its opening entry and the given ending entries (``capture`` spends
        ``captured``); its status follows the first ending."""
        status = {"capture": "captured", "release": "released", "expire": "expired"}.get(
            ends[0] if ends else "", "pending"
        )
        hold_id = int(
            self.conn.execute(
                sa.text(
                    "INSERT INTO holds (account_id, generation_id, idempotency_key, amount, "
                    "status, captured_amount, expires_at, ended_at) VALUES (:a, :g, :key, :m, "
                    ":s, :c, now() + interval '1 hour', "
                    "CASE WHEN :s = 'pending' THEN NULL ELSE now() END) RETURNING id"
                ),
                {
                    "a": account,
                    "g": generation,
                    "key": self._key(),
                    "m": amount,
                    "s": status,
                    "c": captured if status == "captured" else 0,
                },
            ).scalar_one()
        )
        self.entry(account, "hold", amount, 0, amount, hold_id)
        for kind in ends:
            spent = captured if kind == "capture" else 0
            self.entry(
                account, kind, spent if kind == "capture" else amount, -spent, -amount, hold_id
            )
        return hold_id

    def generation(
        self,
        user: str,
        status: str,
        prompt: str,
        *,
        prediction: str | None = None,
        code: str | None = None,
        charged: int = 0,
        recorded: bool = True,
    ) -> int:
        """A generation (attempt 1); its prediction is recorded as its attempt's own unless
        ``recorded`` is false."""
        gid = int(
            self.conn.execute(
                sa.text(
                    "INSERT INTO generations (user_id, model, input, status, prediction_id, "
                    "error_code, amount_charged) VALUES (:u, :m, :i, :s, :p, :c, :ch) "
                    "RETURNING id"
                ),
                {
                    "u": user,
                    "m": MODEL,
                    "i": json.dumps({"prompt": prompt}),
                    "s": status,
                    "p": prediction,
                    "c": code,
                    "ch": charged,
                },
            ).scalar_one()
        )
        if prediction is not None and recorded:
            self.attempt(gid, prediction)
        return gid

    def attempt(self, generation: int, prediction: str, attempt: int = 1) -> None:
        """An attempt's create record owning ``prediction``."""
        self.conn.execute(
            sa.text(
                "INSERT INTO create_attempts (generation_id, attempt, model, input_sha256, "
                "started_at, state, state_at, prediction_id, how) VALUES (:g, :a, :m, :sha, "
                "now(), 'owned', now(), :p, 'created')"
            ),
            {"g": generation, "a": attempt, "m": MODEL, "sha": "0" * 64, "p": prediction},
        )

    def set_output(self, generation: int, data: bytes) -> None:
        """Record one stored output of ``data`` under the generation's deterministic key."""
        self.conn.execute(
            sa.text("UPDATE generations SET outputs = :o WHERE id = :g"),
            {"o": json.dumps([_object(generation, data)]), "g": generation},
        )

    def link(self, generation: int, hold: int, amount_held: int) -> None:
        self.conn.execute(
            sa.text("UPDATE generations SET hold_id = :h, amount_held = :a WHERE id = :g"),
            {"h": hold, "a": amount_held, "g": generation},
        )


def _prediction(
    pid: str,
    prompt: str,
    status: str,
    *,
    paid: bool = True,
    faults: tuple[str, ...] = (),
    files: int = 0,
    data_removed: bool = False,
) -> dict[str, Any]:
    output = [f"http://emulator.test/files/{pid}/{i}.png" for i in range(files)] or None
    return {
        "id": pid,
        "model": MODEL,
        "input": {"prompt": prompt},
        "status": status,
        "output": None if data_removed else output,
        "data_removed": data_removed,
        "_emulator": {"paid": paid, "faults": list(faults)},
    }


def _object(gid: int, data: bytes) -> dict[str, Any]:
    key = f"generations/{gid}/0.png"
    return {
        "bucket": "audit-test",
        "key": key,
        "uri": f"s3://audit-test/{key}",
        "size": len(data),
        "sha256": _sha(data),
        "content_type": "image/png",
    }


@dataclass
class HandMade:
    engine: sa.Engine
    predictions: list[dict[str, Any]]
    files: dict[str, bytes]
    expected: dict[str, str]  # check -> subject it must name
    clean_subjects: list[str]


@pytest.fixture
def s3() -> Iterator[LocalS3]:
    with start_local_s3(bucket="audit-test") as local:
        yield local


@pytest.fixture
def hand_made(pg_url: str, s3: LocalS3) -> Iterator[HandMade]:
    upgrade(pg_url)
    engine = sa.create_engine(pg_url, poolclass=sa.pool.NullPool)
    client = s3.client()
    files: dict[str, bytes] = {}
    predictions: list[dict[str, Any]] = []
    expected: dict[str, str] = {}
    with engine.begin() as conn:
        # The database itself refuses a second ending of a hold; a hand-edited copy may not.
        conn.execute(sa.text("DROP INDEX uq_ledger_entries_hold_ending"))
        books = Books(conn)

        # alice: everything right (a success with its output, a refunded failure, a stuck
        # prediction canceled at its deadline, a refusal, a generation refunded at its queue
        # deadline before any create, a canceled orphan).
        alice = books.account("alice", 95)
        books.grant(alice, 100)
        a1 = books.generation("alice", "succeeded", "a fox", prediction="pa1", charged=5)
        books.set_output(a1, PNG_A)
        books.link(a1, books.hold(alice, a1, 5, ends=("capture",), captured=5), 5)
        client.put_object(Bucket="audit-test", Key=f"generations/{a1}/0.png", Body=PNG_A)
        predictions.append(_prediction("pa1", "a fox", "succeeded", files=1))
        files["http://emulator.test/files/pa1/0.png"] = PNG_A
        a2 = books.generation(
            "alice", "failed", "a stuck fox", prediction="pa2", code="deadline_exceeded"
        )
        books.link(a2, books.hold(alice, a2, 5, ends=("release",)), 5)
        predictions.append(_prediction("pa2", "a stuck fox", "canceled", faults=("stuck",)))
        books.generation("alice", "failed", "too poor", code="insufficient_credits")
        a3 = books.generation("alice", "failed", "no turn in time", code="deadline_exceeded")
        books.link(a3, books.hold(alice, a3, 5, ends=("release",)), 5)
        predictions.append(_prediction("pa4", "a fox", "canceled"))

        # bob: a generation left running, its hold still pending, its stuck prediction running.
        bob = books.account("bob", 100, held=5)
        books.grant(bob, 100)
        b1 = books.generation("bob", "running", "a bear", prediction="pb1")
        books.link(b1, books.hold(bob, b1, 5), 5)
        predictions.append(_prediction("pb1", "a bear", "processing", faults=("stuck",)))
        expected["terminal"] = f"generation {b1}"
        expected["open_holds"] = "hold "
        expected["stuck_canceled"] = "prediction pb1"

        # carol: a balance that is not grants minus captures.
        carol = books.account("carol", 90)
        books.grant(carol, 100)
        expected["balances"] = "user carol"

        # dave: a grant entry whose stored delta disagrees with its amount.
        dave = books.account("dave", 100)
        books.grant(dave, 100, balance_delta=50)
        expected["caches"] = "user dave"

        # erin: a hold larger than the balance (available negative until it was released).
        erin = books.account("erin", 10)
        books.grant(erin, 10)
        e1 = books.generation("erin", "failed", "an eel", code="prediction_failed")
        books.link(e1, books.hold(erin, e1, 20, ends=("release",)), 20)
        expected["available"] = "user erin"

        # frank: two holds for one attempt (both refunded); gina: one hold ended twice.
        frank = books.account("frank", 100)
        books.grant(frank, 100)
        f1 = books.generation("frank", "failed", "a frog", code="run_failed")
        books.hold(frank, f1, 5, ends=("release",))
        books.link(f1, books.hold(frank, f1, 5, ends=("release",)), 5)
        gina = books.account("gina", 100)
        books.grant(gina, 100)
        g1 = books.generation("gina", "failed", "a goat", code="run_failed")
        books.link(g1, books.hold(gina, g1, 5, ends=("release", "release")), 5)
        expected["holds"] = f"generation {f1}"

        # hank: a failed generation whose hold was captured instead of refunded.
        hank = books.account("hank", 95)
        books.grant(hank, 100)
        h1 = books.generation("hank", "failed", "a hen", code="prediction_failed")
        books.link(h1, books.hold(hank, h1, 5, ends=("capture",), captured=5), 5)
        expected["refunds"] = f"generation {h1}"

        # ivan: charged 5, captured 4.
        ivan = books.account("ivan", 96)
        books.grant(ivan, 100)
        i1 = books.generation("ivan", "succeeded", "an ibis", prediction="pi1", charged=5)
        books.set_output(i1, PNG_B)
        books.link(i1, books.hold(ivan, i1, 5, ends=("capture",), captured=4), 5)
        client.put_object(Bucket="audit-test", Key=f"generations/{i1}/0.png", Body=PNG_B)
        predictions.append(_prediction("pi1", "an ibis", "succeeded", files=1, data_removed=True))
        expected["charges"] = f"generation {i1}"

        # jane: her failed attempt's prediction, and a second one for the same input that
        # nobody owns and nobody canceled.
        jane = books.account("jane", 100)
        books.grant(jane, 100)
        j1 = books.generation("jane", "failed", "a jay", prediction="pj1", code="prediction_failed")
        books.link(j1, books.hold(jane, j1, 5, ends=("release",)), 5)
        predictions.append(_prediction("pj1", "a jay", "failed"))
        predictions.append(_prediction("pj2", "a jay", "succeeded", files=1))
        expected["paid_predictions"] = f"generation {j1}"
        # leo: a worker killed between its create and recording it, then refunded: the lost
        # create ran on, but it is the one paid prediction of the one attempt.
        leo = books.account("leo", 100)
        books.grant(leo, 100)
        l1 = books.generation("leo", "failed", "a lion", code="run_failed")
        books.link(l1, books.hold(leo, l1, 5, ends=("release",)), 5)
        predictions.append(_prediction("pl1", "a lion", "succeeded", files=1))

        # A paid prediction nobody asked for, left to finish; another left running.
        predictions.append(_prediction("pz", "nobody asked", "succeeded", files=1))
        expected["orphan_predictions"] = "prediction pz"
        predictions.append(_prediction("pq", "nobody asked either", "processing"))
        expected["unowned_running"] = "prediction pq"

        # erin's hold of 20 is not the 5 the image model's price holds for one image.
        expected["held_prices"] = f"generation {e1}"
        # mona: charged for a success that stored nothing.
        mona = books.account("mona", 95)
        books.grant(mona, 100)
        m1 = books.generation("mona", "succeeded", "a moth", prediction="pm1", charged=5)
        books.link(m1, books.hold(mona, m1, 5, ends=("capture",), captured=5), 5)
        predictions.append(_prediction("pm1", "a moth", "succeeded"))
        expected["charged_outputs"] = f"generation {m1}"
        # ... and the price of no output at all is nothing.
        expected["charged_prices"] = f"generation {m1}"

        # nina: her second generation holds a prediction recorded as her first one's.
        nina = books.account("nina", 100)
        books.grant(nina, 100)
        n1 = books.generation("nina", "failed", "a newt", prediction="pn1", recorded=False)
        n2 = books.generation("nina", "failed", "a gnat", prediction="pn2", recorded=False)
        books.attempt(n1, "pn2")
        for gid in (n1, n2):
            books.link(gid, books.hold(nina, gid, 5, ends=("release",)), 5)
        expected["shared_predictions"] = f"generation {n2}"

        # hank's failed attempt left an object behind.
        client.put_object(Bucket="audit-test", Key=f"generations/{h1}/a1/0.png", Body=PNG_B)
        expected["leftover_objects"] = f"generations/{h1}/a1/0.png"

        # kate: an S3 object whose bytes are not what the emulator produced, and one missing.
        kate = books.account("kate", 90)
        books.grant(kate, 100)
        k1 = books.generation("kate", "succeeded", "a kite", prediction="pk1", charged=5)
        books.set_output(k1, PNG_B)
        books.link(k1, books.hold(kate, k1, 5, ends=("capture",), captured=5), 5)
        client.put_object(Bucket="audit-test", Key=f"generations/{k1}/0.png", Body=PNG_B)
        predictions.append(_prediction("pk1", "a kite", "succeeded", files=1))
        files["http://emulator.test/files/pk1/0.png"] = PNG_OTHER
        k2 = books.generation("kate", "succeeded", "a koala", prediction="pk2", charged=5)
        books.set_output(k2, PNG_A)
        books.link(k2, books.hold(kate, k2, 5, ends=("capture",), captured=5), 5)
        predictions.append(_prediction("pk2", "a koala", "succeeded", files=1, data_removed=True))
        expected["outputs"] = f"generation {k1}"
        clean = [
            f"generation {a1}",
            f"generation {a2}",
            "user alice",
            "prediction pa4",
            f"generation {l1}",
            "user leo",
        ]
    try:
        yield HandMade(engine, predictions, files, expected, clean)
    finally:
        engine.dispose()
        # The local S3 keeps its objects for the whole process: leave the bucket empty.
        for key in audit.list_s3_objects(client, "audit-test"):
            client.delete_object(Bucket="audit-test", Key=key)


def test_the_audit_reports_one_violation_of_each_kind(hand_made: HandMade, s3: LocalS3) -> None:
    report = audit.audit(
        hand_made.engine,
        predictions=hand_made.predictions,
        s3_objects=audit.list_s3_objects(s3.client(), "audit-test"),
        fetch_output=hand_made.files.get,
        prices=load_pricing(),
    )
    found = [str(v) for v in report.violations]
    print("\n".join(found))
    counts = report.by_check()
    assert set(counts) == set(audit.CHECKS)
    for check, subject in hand_made.expected.items():
        assert any(v.check == check and v.subject.startswith(subject) for v in report.violations), (
            check,
            subject,
            found,
        )
    assert all(counts[name] >= 1 for name in audit.CHECKS), counts
    # The double ending of gina's hold and the missing object of kate's koala are named too.
    assert any(v.check == "holds" and "ended 2 times" in v.message for v in report.violations)
    assert any(v.check == "outputs" and "not in the bucket" in v.message for v in report.violations)
    for subject in hand_made.clean_subjects:
        assert not [v for v in report.violations if v.subject == subject], (subject, found)
    # What it saw on the way.
    assert report.statuses["succeeded"] == 5
    assert report.failed_by_code["insufficient_credits"] == 1
    # alice's two deadline failures: only the one without a prediction is a queue deadline.
    assert report.failed_by_code["deadline_exceeded"] >= 2 and report.failed_before_create == 1
    assert report.stuck_predictions == 2
    assert report.canceled_orphans == 1
    assert report.objects_compared_with_emulator == 2  # alice's fox and kate's kite
    assert not report.ok


def test_a_clean_state_passes_every_check(pg_url: str, s3: LocalS3) -> None:
    upgrade(pg_url)
    engine = sa.create_engine(pg_url, poolclass=sa.pool.NullPool)
    try:
        with engine.begin() as conn:
            books = Books(conn)
            alice = books.account("alice", 95)
            books.grant(alice, 100)
            a1 = books.generation("alice", "succeeded", "a fox", prediction="pa1", charged=5)
            books.set_output(a1, PNG_A)
            books.link(a1, books.hold(alice, a1, 5, ends=("capture",), captured=5), 5)
            a2 = books.generation("alice", "canceled", "a fox, canceled", code="run_failed")
            books.link(a2, books.hold(alice, a2, 5, ends=("release",)), 5)
        s3.client().put_object(Bucket="audit-test", Key=f"generations/{a1}/0.png", Body=PNG_A)
        report = audit.audit(
            engine,
            predictions=[_prediction("pa1", "a fox", "succeeded", files=1)],
            s3_objects=audit.list_s3_objects(s3.client(), "audit-test"),
            fetch_output={"http://emulator.test/files/pa1/0.png": PNG_A}.get,
            prices=load_pricing(),
        )
    finally:
        engine.dispose()
    assert report.violations == []
    assert report.refunded == 1 and report.captured_credits == 5 and report.granted_credits == 100
    # The image model is priced per output: one hold and one charge checked, one refund.
    assert report.price_checks == {"per_output": {"holds": 2, "charges": 1, "unpaid": 1}}


# --- the price checks, on crafted rows ----------------------------------------------------------

PRICES = parse_pricing(
    """
[models."demo/fixed"]
credits = 7

[models."demo/metered"]
credits_per_second = 2.5
max_seconds = 10

[models."demo/images"]
credits_per_output = 5
outputs_field = "num_outputs"
outputs_default = 1
outputs_max = 4

[models."demo/text"]
credits_per_input_token = 0.02
credits_per_output_token = 0.625
max_tokens_field = "max_tokens"
max_tokens_default = 64
max_tokens_max = 512
max_input_tokens = 1000
"""
)


class Crafted:
    """Rows as the audit reads them, one generation attempt at a time."""

    def __init__(self) -> None:
        self.gens: dict[int, dict[str, Any]] = {}
        self.holds: list[dict[str, Any]] = []
        self.attempts: list[dict[str, Any]] = []
        self.predictions: list[dict[str, Any]] = []

    def add(
        self,
        model: str,
        input: dict[str, Any],
        *,
        held: int,
        captured: int | None = None,
        status: str = "succeeded",
        metrics: dict[str, Any] | None = None,
        output: Any = None,
        stored: int = 1,
        removed: bool = False,
    ) -> int:
        """One generation; ``captured`` None means its hold was released. The provider's
        prediction reports ``metrics`` and returned ``output``; ``stored`` outputs are recorded."""
        gid = len(self.gens) + 1
        pid = f"p{gid}"
        succeeded = status == "succeeded"
        outputs = [{"key": f"generations/{gid}/a1/{i}.png"} for i in range(stored)]
        self.holds.append(
            {
                "id": 100 + gid,
                "generation_id": gid,
                "idempotency_key": f"gen:{gid}:a1:hold",
                "amount": held,
                "status": "released" if captured is None else "captured",
                "captured_amount": captured or 0,
            }
        )
        self.gens[gid] = {
            "id": gid,
            "model": model,
            "input": input,
            "status": status,
            "attempt": 1,
            "prediction_id": pid,
            "hold_id": 100 + gid,
            "amount_charged": captured if succeeded else 0,
            "outputs": outputs if succeeded else None,
        }
        self.attempts.append(
            {"generation_id": gid, "attempt": 1, "prediction_id": pid, "outputs": None}
        )
        self.predictions.append(
            {
                "id": pid,
                "status": status,
                "metrics": metrics or {},
                "output": None if removed else output,
                "data_removed": removed,
                "_emulator": {"paid": True, "faults": [], "completed_output": output},
            }
        )
        return gid

    def check(self) -> audit.AuditReport:
        report = audit.AuditReport()
        audit.check_prices(report, self.gens, self.holds, self.attempts, self.predictions, PRICES)
        return report


def _urls(n: int) -> list[str]:
    return [f"http://emulator.test/files/x/{i}.png" for i in range(n)]


def test_the_price_checks_recompute_each_charge_from_the_providers_counts() -> None:
    """Each kind charged right passes; a wrong charge of each kind is caught and named."""
    rows = Crafted()
    clean = [
        rows.add("demo/fixed", {"prompt": "a"}, held=7, captured=7),
        # 1.1 s at 2.5/s is 2.75: 3 credits (decimal, rounded up once).
        rows.add("demo/metered", {}, held=25, captured=3, metrics={"predict_time": 1.1}),
        # No predict_time reported: the hold is the charge.
        rows.add("demo/metered", {"p": 1}, held=25, captured=25),
        rows.add(
            "demo/images", {"num_outputs": 4}, held=20, captured=20, output=_urls(4), stored=4
        ),
        # Removed before the audit, but the provider's record keeps what it returned.
        rows.add(
            "demo/images",
            {"num_outputs": 3},
            held=15,
            captured=10,
            output=_urls(2),
            stored=2,
            removed=True,
        ),
        # 5 input tokens at 0.02 and 8 output tokens at 0.625: 5.1, so 6.
        rows.add(
            "demo/text",
            {"max_tokens": 8},
            held=25,
            captured=6,
            metrics={"input_token_count": 5, "output_token_count": 8},
            output=["a ", "haiku"],
        ),
        rows.add("demo/text", {}, held=60, status="failed"),
    ]
    report = rows.check()
    assert report.violations == []
    assert report.price_checks == {
        "fixed": {"holds": 1, "charges": 1},
        "metered": {"holds": 2, "charges": 2},
        "per_output": {"holds": 2, "charges": 2},
        "per_token": {"holds": 2, "charges": 1, "unpaid": 1},
    }
    assert report.unverified_output_counts == 0

    wrong = {
        # Rounded up twice (1.1 s -> 2 s -> 5) instead of once.
        rows.add("demo/metered", {}, held=25, captured=5, metrics={"predict_time": 1.1}): (
            "charged_prices",
            "the metered price charges 3",
        ),
        # The project charged what it stored, but the provider returned four images.
        rows.add(
            "demo/images", {"num_outputs": 4}, held=20, captured=15, output=_urls(4), stored=3
        ): ("charged_prices", "stored 3 outputs of the 4"),
        # The hold charged although the provider reported its token counts.
        rows.add(
            "demo/text",
            {},
            held=60,
            captured=60,
            metrics={"input_token_count": 10, "output_token_count": 11},
            output=["x"],
        ): ("charged_prices", "the per_token price charges 8"),
        # A fixed price held at another price (and refunded).
        rows.add("demo/fixed", {"prompt": "b"}, held=5, status="canceled"): (
            "held_prices",
            "the fixed price holds 7",
        ),
        # More images than the price allows may never be held at all.
        rows.add("demo/images", {"num_outputs": 5}, held=25, status="failed"): (
            "held_prices",
            "holds None",
        ),
        # A failed generation whose hold was captured.
        rows.add("demo/fixed", {"prompt": "c"}, held=7, captured=7, status="failed"): (
            "charged_prices",
            "failed but hold",
        ),
    }
    report = rows.check()
    found = [str(v) for v in report.violations]
    assert len(report.violations) == len(wrong), found
    for gid, (check, text) in wrong.items():
        assert any(
            v.check == check and v.subject.startswith(f"generation {gid}") and text in v.message
            for v in report.violations
        ), (gid, check, text, found)
    for gid in clean:
        assert not [v for v in report.violations if v.subject.startswith(f"generation {gid} ")]
    assert sum(t["mismatches"] for t in report.price_checks.values()) == len(wrong)


def test_provider_output_counts_follow_how_outputs_are_stored() -> None:
    count = audit.provider_output_count
    assert count({"output": _urls(3)}) == 3
    assert count({"output": ["a ", "streamed ", "text"]}) == 1
    assert count({"output": [""]}) == 0
    assert count({"output": None}) == 0
    assert count({"output": "https://emulator.test/files/x/0.png"}) == 1
    assert count({"output": {"nested": _urls(1)}}) is None
    assert count({"output": None, "data_removed": True}) is None
    removed = {"output": None, "data_removed": True, "_emulator": {"completed_output": _urls(2)}}
    assert count(removed) == 2


# --- the plan ----------------------------------------------------------------------------------


def test_the_plan_follows_the_seed_and_poor_users_cannot_pay_for_everything() -> None:
    config = chaos.ChaosConfig(seed=7, count=60)
    prices = chaos.soak_prices()
    first, again = chaos.make_plan(config, prices), chaos.make_plan(config, prices)
    other = chaos.make_plan(chaos.ChaosConfig(seed=8, count=60), prices)
    assert first == again
    assert first.requests != other.requests and first.faults != other.faults
    assert len(first.requests) == 60
    # The mix: repeats of an earlier input, empty outputs, regenerates of rich users' requests.
    distinct = {json.dumps(r.input, sort_keys=True) for r in first.requests}
    assert 0 < 60 - len(distinct) < 15
    empty = [r for r in first.requests if r.model == chaos.EMPTY_MODEL]
    assert empty and all(r.input["misbehave"] in chaos.EMPTY_KINDS for r in empty)
    assert first.regenerates
    for at, index in first.regenerates:
        target = first.requests[index]
        assert target.model != chaos.EMPTY_MODEL and not target.user.startswith("poor-")
        assert at > target.at_s
    kinds = sorted(f.kind for f in first.faults)
    assert kinds.count("kill_worker") == 5 and kinds.count("pg_terminate") == 2
    assert {"daemon_restart", "s3_outage"} <= set(kinds)

    def hold(request: chaos.Request) -> int:
        return prices.price_for(request.model).hold_amount(request.input)

    for user, grant in first.grants.items():
        mine = [r for r in first.requests if r.user == user]
        regenerated = [first.requests[i] for _, i in first.regenerates]
        asked = sum(hold(r) for r in mine + [r for r in regenerated if r.user == user])
        if user.startswith("poor-"):
            assert max(hold(r) for r in mine) <= grant < asked
            # Each poor user's requests arrive together, in two bursts.
            assert len({r.at_s for r in mine}) <= 2
        else:
            assert grant >= asked


def test_the_mix_has_every_price_kind_and_the_counted_fields_at_their_maximum() -> None:
    prices = chaos.soak_prices()
    plan = chaos.make_plan(chaos.ChaosConfig(seed=1, count=300), prices)
    mix = chaos.mix_counts(plan, prices)
    assert set(mix["price_kinds"]) == {"fixed", "metered", "per_output", "per_token"}
    # Fixed and metered prices come from the versions the soak's table prices (the empty-output
    # model is fixed too, but never succeeds).
    models = {r.model for r in plan.requests}
    assert {chaos.MODEL, chaos.TEXT_MODEL, chaos.METERED_MODEL, chaos.FIXED_MODEL} <= models
    assert prices.price_for(chaos.METERED_MODEL).kind == "metered"
    assert prices.price_for(chaos.FIXED_MODEL).kind == "fixed"
    image, text = prices.price_for(chaos.MODEL), prices.price_for(chaos.TEXT_MODEL)
    assert str(image.outputs_max) in mix["num_outputs"] and "default" in mix["num_outputs"]
    assert len(mix["num_outputs"]) >= 4
    assert str(text.max_tokens_max) in mix["max_tokens"] and "default" in mix["max_tokens"]
    assert len(mix["max_tokens"]) >= 4
    # Every request is one the price table accepts: none is refused for its count.
    for request in plan.requests:
        assert prices.price_for(request.model).input_problem(request.input) is None


def test_the_rate_limited_phase_is_a_seeded_window_inside_the_arrivals() -> None:
    prices = chaos.soak_prices()
    config = chaos.ChaosConfig(seed=3, count=300, rate_limit=12, rate_limit_burst=1)
    phase = chaos.make_plan(config, prices).rate_limit
    assert phase is not None
    assert (phase.creates_per_minute, phase.burst) == (12, 1)
    window = config.arrival_window_s
    assert 0.3 * window <= phase.start_s < phase.end_s <= 0.75 * window
    assert phase.end_s - phase.start_s >= 10
    # It lasts until enough creates met the limit, whenever the system gets to them.
    assert phase.min_creates == 15
    assert phase == chaos.make_plan(config, prices).rate_limit
    other = chaos.make_plan(chaos.ChaosConfig(seed=4, count=300), prices).rate_limit
    assert other is not None and other.start_s != phase.start_s
    # --rate-limit 0: no phase.
    assert chaos.make_plan(chaos.ChaosConfig(seed=3, rate_limit=0), prices).rate_limit is None


# --- the S3 outage control ---------------------------------------------------------------------


def test_an_outage_refuses_connections_then_serves_every_object_again(s3: LocalS3) -> None:
    client = s3.client()
    client.put_object(Bucket=s3.bucket, Key="kept.txt", Body=b"still here")
    outage = threading.Thread(target=s3.outage, args=(1.5,))
    outage.start()
    try:
        deadline = time.monotonic() + 5
        while _port_open(s3.port) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not _port_open(s3.port)
    finally:
        outage.join()
    assert _port_open(s3.port)
    assert client.get_object(Bucket=s3.bucket, Key="kept.txt")["Body"].read() == b"still here"


def test_sigusr1_takes_the_endpoint_process_offline_and_back_with_its_objects(
    tmp_path: Path,
) -> None:
    port_file = tmp_path / "s3.port"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ai_handler_dagster.devstack.s3",
            "--port",
            "0",
            "--port-file",
            str(port_file),
            "--outage-seconds",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while not port_file.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        port = int(port_file.read_text())
        client = local_s3_client(f"http://127.0.0.1:{port}")
        client.put_object(Bucket=DEFAULT_BUCKET, Key="k", Body=b"v")
        proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 10
        while _port_open(port):
            assert time.monotonic() < deadline, "the endpoint never went offline"
            time.sleep(0.02)
        while not _port_open(port):
            assert time.monotonic() < deadline, "the endpoint did not come back"
            time.sleep(0.05)
        assert client.get_object(Bucket=DEFAULT_BUCKET, Key="k")["Body"].read() == b"v"
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# --- the soak ----------------------------------------------------------------------------------


def _run_soak(seed: int, count: int, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    from tests.support.db import PG_ADMIN_URL

    parser = argparse.ArgumentParser()
    chaos.register(parser.add_subparsers())
    args = parser.parse_args(
        [
            "chaos",
            "--seed",
            str(seed),
            "--count",
            str(count),
            # Predictions long enough that work is in flight whenever a process fault is due,
            # however fast the machine settles the rest.
            "--latency",
            "3",
            # Three kills (not five) leave room between faults in this short window.
            "--worker-kills",
            "3",
            "--pg-url",
            PG_ADMIN_URL,
            "--json",
        ]
    )
    code = args.handler(args)
    out = capsys.readouterr().out
    report = json.loads(out.strip().splitlines()[-1])
    print(out)
    assert code == (0 if report["violations"] == 0 else 1)
    assert report["violations"] == len(report["violation_details"]) + len(
        report["fault_shortfalls"]
    )
    return report


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.parametrize(("seed", "count"), [(11, 32), (23, 36)])
def test_a_seeded_soak_settles_with_no_violation(
    seed: int, count: int, pg_available: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    if not pg_available:
        pytest.skip("PostgreSQL is not reachable")
    report = _run_soak(seed, count, capsys)
    # The money and state invariants must hold, always.
    assert report["violation_details"] == [], report["violation_details"]
    assert (report["seed"], report["count"]) == (seed, count)
    assert report["succeeded"] + report["failed"] == count
    # A process fault needs work in flight at its moment; at this small N on a busy machine the
    # work may all have settled before one is due. `ai-handler chaos` (N = 300) counts such a
    # shortfall as a failure; here the soak must still have injected most of its faults.
    faults = report["faults"]
    assert len(report["fault_shortfalls"]) <= 2, report["fault_shortfalls"]
    assert faults["worker_kill"] >= 3
    assert faults["daemon_restart"] + faults["s3_outage"] + faults["pg_terminate"] >= 2
    assert faults["http_500"] + faults["http_429"] > 0
    assert report["failed_by_code"].get("insufficient_credits", 0) >= 1
    assert report["succeeded"] > 0
    assert all(n == 0 for n in report["checks"].values()), report["checks"]
    # Every succeeded attempt's charge was recomputed from the provider's counts, over more
    # than one kind of price, with no mismatch; and the rate-limited phase ran.
    prices = report["price_checks"]
    assert len(prices) >= 3, prices
    assert sum(t["charges"] for t in prices.values()) >= report["succeeded"]
    assert all(t["mismatches"] == 0 for t in prices.values()), prices
    assert report["unverified_output_counts"] == 0
    phase = report["rate_limit_phase"]
    assert phase is not None and None not in phase["window_s"], phase
