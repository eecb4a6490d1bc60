"""The audit after a chaos soak: what the money, the outputs and the provider say, checked from
outside the code that moved them.

Nothing here imports the ledger, the generation transitions or the ORM models: the audit reads
the app database with plain SQL over its tables, lists the outputs bucket through boto3, and takes
the provider's view from the emulator's ``/_emulator/predictions`` (every prediction it ever
created, paid or not, with the faults it applied). A bug in ``ledger.py`` or ``generations.py``
therefore cannot hide itself by also being in the check.

Prices are the one thing the audit takes from the project: the price table (a ``PriceBook``) is
the specification of what each generation should cost, so it is asked through its public API
(``Price.hold_amount``, ``Price.charge_for``) with the counts the provider reported, read from the
emulator's final state of each prediction (``metrics.predict_time``, the token counts, the
outputs it returned), never with what the project recorded about them.

Entry deltas are recomputed from each entry's kind and its hold (a grant adds its amount, a
capture spends its amount, a hold or its ending moves the hold's amount in and out of ``held``)
instead of trusting the stored deltas, and balances are replayed entry by entry to prove that the
available balance was never negative at any point, not only at the end.

Each check has a name (``CHECKS``); :func:`audit` returns an :class:`AuditReport` whose
``violations`` name the check they break, so a report can say which invariant failed and for whom.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

if TYPE_CHECKING:
    from ai_handler_dagster.pricing import Price, PriceBook

#: Every invariant the audit checks: name -> what holds when it passes.
CHECKS: dict[str, str] = {
    "terminal": "every generation ended (none pending, queued or running)",
    "open_holds": "no hold is left pending",
    "balances": "each user's balance = grants - captured amounts, exactly",
    "caches": "cached balance and held equal the sums of the entries",
    "available": "available credits never negative, at any entry",
    "holds": "at most one hold per attempt, opened once and ended exactly once",
    "refunds": "refunds = the holds of failed and canceled attempts",
    "charges": "succeeded generations captured exactly what they charged",
    "charged_outputs": "every capture is of an attempt that stored outputs",
    "shared_predictions": "no two generations or attempts share a prediction",
    "paid_predictions": "paid predictions of a request <= its attempts",
    "unowned_running": "no paid prediction is left running unowned",
    "orphan_predictions": "paid predictions matching no request were canceled",
    "outputs": "succeeded attempts have their S3 objects with the emulator's sha256",
    "leftover_objects": "no S3 object of an attempt that did not succeed",
    "stuck_canceled": "stuck predictions were canceled",
    "held_prices": "each hold = the price table's hold for its input",
    "charged_prices": "each capture = the price table's charge for the provider's counts",
}

OUTPUTS_PREFIX = "generations/"
# The audit spells out the stored words itself (not from ``domain.py``): it checks the tables
# as the database holds them, independently of the code that wrote them.
UNFINISHED = ("pending", "queued", "running")
REFUND_KINDS = ("release", "expire")
ENDING_KINDS = ("capture", *REFUND_KINDS)


@dataclass(frozen=True)
class Violation:
    """One broken invariant: the check, whom it concerns, and what was found."""

    check: str
    subject: str
    message: str

    def __str__(self) -> str:
        return f"[{self.check}] {self.subject}: {self.message}"


@dataclass
class AuditReport:
    """The audit's findings and the outcome counts it saw on the way."""

    violations: list[Violation] = field(default_factory=list)
    generations: int = 0
    users: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    failed_by_code: dict[str, int] = field(default_factory=dict)
    #: Failed with ``deadline_exceeded`` before any prediction was created: the queue deadline
    #: (no turn at the create throttle in time; or a hold that ended before its run started).
    failed_before_create: int = 0
    refunded: int = 0
    captured_credits: int = 0
    granted_credits: int = 0
    predictions: int = 0
    paid_predictions: int = 0
    canceled_orphans: int = 0
    #: Paid, owned by no generation, not canceled, but made for a request (matched by input).
    unrecorded_predictions: int = 0
    stuck_predictions: int = 0
    objects_checked: int = 0
    objects_compared_with_emulator: int = 0
    #: Price kind -> what the price checks looked at: ``holds`` (each hold against the table),
    #: ``charges`` (each capture against the provider's counts), ``unpaid`` (failed or canceled
    #: attempts, which must capture nothing) and ``mismatches`` (violations among them).
    price_checks: dict[str, Counter[str]] = field(default_factory=dict)
    #: Captures whose provider output count could not be read (an output of no shape the audit
    #: counts, or removed with no record of it): checked against the stored count instead.
    unverified_output_counts: int = 0

    def add(self, check: str, subject: str, message: str) -> None:
        if check not in CHECKS:
            raise ValueError(f"unknown check {check!r}")
        self.violations.append(Violation(check, subject, message))

    def by_check(self) -> dict[str, int]:
        """Violations per check, every check listed (0 when it holds)."""
        counts = Counter(v.check for v in self.violations)
        return {name: counts.get(name, 0) for name in CHECKS}

    @property
    def ok(self) -> bool:
        return not self.violations


# --- reading -------------------------------------------------------------------------------


def _rows(conn: sa.Connection, sql: str, **params: Any) -> list[Mapping[str, Any]]:
    return [dict(row._mapping) for row in conn.execute(sa.text(sql), params)]


def _json(value: Any) -> Any:
    """A JSON column as Python (drivers return text on SQLite, objects on PostgreSQL)."""
    if isinstance(value, str | bytes):
        return json.loads(value)
    return value


def _normalized(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def sha256(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class S3Object:
    """An object of the outputs bucket as the S3 API returned it."""

    size: int
    sha256: str


def list_s3_objects(client: Any, bucket: str, prefix: str = OUTPUTS_PREFIX) -> dict[str, S3Object]:
    """Every object under ``prefix`` with the sha256 of its bytes, read through the S3 API."""
    found: dict[str, S3Object] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            body = client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
            found[item["Key"]] = S3Object(size=len(body), sha256=sha256(body))
    return found


# --- the audit -----------------------------------------------------------------------------


def audit(
    engine: sa.Engine,
    *,
    predictions: list[dict[str, Any]],
    s3_objects: Mapping[str, S3Object],
    fetch_output: Callable[[str], bytes | None],
    prices: PriceBook | None = None,
) -> AuditReport:
    """Check every invariant of ``CHECKS`` over a settled system.

    ``predictions`` is the emulator's ``/_emulator/predictions``; ``s3_objects`` the outputs
    bucket (:func:`list_s3_objects`); ``fetch_output(url)`` the bytes of an emulator output file,
    or None when the emulator no longer has it; ``prices`` the price table the stack ran with
    (without it the two price checks are skipped and ``price_checks`` stays empty).
    """
    report = AuditReport()
    with engine.connect() as conn:
        generations = _rows(
            conn,
            "SELECT id, user_id, model, input, status, attempt, prediction_id, hold_id, "
            "amount_held, amount_charged, outputs, error_code FROM generations ORDER BY id",
        )
        accounts = _rows(conn, "SELECT id, user_id, balance, held FROM accounts ORDER BY id")
        holds = _rows(
            conn,
            "SELECT id, account_id, generation_id, idempotency_key, amount, status, "
            "captured_amount FROM holds ORDER BY id",
        )
        attempts = _rows(
            conn,
            "SELECT generation_id, attempt, prediction_id, outputs FROM create_attempts "
            "ORDER BY generation_id, attempt",
        )
        entries = _rows(
            conn,
            "SELECT id, account_id, hold_id, kind, amount, balance_delta, held_delta "
            "FROM ledger_entries ORDER BY id",
        )
    gens = {
        g["id"]: dict(g, input=_json(g["input"]), outputs=_json(g["outputs"])) for g in generations
    }
    report.generations = len(gens)
    report.users = len(accounts)
    report.statuses = dict(Counter(g["status"] for g in gens.values()))
    report.failed_by_code = dict(
        sorted(
            Counter(
                g["error_code"] or g["status"]
                for g in gens.values()
                if g["status"] in ("failed", "canceled")
            ).items()
        )
    )
    report.failed_before_create = sum(
        1
        for g in gens.values()
        if g["status"] == "failed"
        and g["error_code"] == "deadline_exceeded"
        and g["prediction_id"] is None
    )
    holds_by_id = {h["id"]: h for h in holds}
    entries_by_hold: dict[int, list[Mapping[str, Any]]] = defaultdict(list)
    for entry in entries:
        if entry["hold_id"] is not None:
            entries_by_hold[entry["hold_id"]].append(entry)

    delivered = {
        (a["generation_id"], a["attempt"]): _json(a["outputs"]) or []
        for a in attempts
        if a["outputs"] is not None
    }
    _check_terminal(report, gens)
    _check_money(report, accounts, holds, entries, holds_by_id)
    _check_holds(report, gens, holds, entries_by_hold)
    _check_settlements(report, gens, holds, holds_by_id, entries_by_hold, accounts, delivered)
    _check_predictions(report, gens, attempts, predictions)
    _check_outputs(report, gens, attempts, predictions, s3_objects, fetch_output)
    if prices is not None:
        check_prices(report, gens, holds, attempts, predictions, prices)
    return report


def _hold_attempt(hold: Mapping[str, Any]) -> int | None:
    """The attempt a generation's hold was taken for (its key reads ``gen:<id>:a<n>:hold``)."""
    parts = str(hold["idempotency_key"]).split(":")
    if len(parts) == 4 and parts[0] == "gen" and parts[2].startswith("a"):
        return int(parts[2][1:]) if parts[2][1:].isdigit() else None
    return None


def _check_terminal(report: AuditReport, gens: Mapping[int, dict[str, Any]]) -> None:
    for gid, g in gens.items():
        if g["status"] in UNFINISHED:
            report.add("terminal", f"generation {gid}", f"left {g['status']}")


def _entry_deltas(entry: Mapping[str, Any], hold: Mapping[str, Any] | None) -> tuple[int, int]:
    """(balance, held) change an entry stands for, from its kind and its hold alone."""
    kind, amount = entry["kind"], entry["amount"]
    if kind == "grant":
        return amount, 0
    hold_amount = hold["amount"] if hold is not None else 0
    if kind == "hold":
        return 0, hold_amount
    if kind == "capture":
        return -amount, -hold_amount
    return 0, -hold_amount  # release, expire


def _check_money(
    report: AuditReport,
    accounts: list[Mapping[str, Any]],
    holds: list[Mapping[str, Any]],
    entries: list[Mapping[str, Any]],
    holds_by_id: Mapping[int, Mapping[str, Any]],
) -> None:
    users = {a["id"]: a["user_id"] for a in accounts}
    grants: Counter[int] = Counter()
    captures: Counter[int] = Counter()
    running: dict[int, list[int]] = defaultdict(lambda: [0, 0])  # account -> [balance, held]
    stored: dict[int, list[int]] = defaultdict(lambda: [0, 0])
    flagged: set[int] = set()
    for entry in entries:  # id order is commit order per account: entries are written locked
        account = entry["account_id"]
        if entry["kind"] == "grant":
            grants[account] += entry["amount"]
        elif entry["kind"] == "capture":
            captures[account] += entry["amount"]
        d_balance, d_held = _entry_deltas(entry, holds_by_id.get(entry["hold_id"]))
        state = running[account]
        state[0] += d_balance
        state[1] += d_held
        stored[account][0] += entry["balance_delta"]
        stored[account][1] += entry["held_delta"]
        if state[0] - state[1] < 0 and account not in flagged:
            flagged.add(account)
            report.add(
                "available",
                f"user {users.get(account, account)}",
                f"available went to {state[0] - state[1]} at ledger entry {entry['id']} "
                f"({entry['kind']})",
            )
    pending_held: Counter[int] = Counter()
    for h in holds:
        if h["status"] == "pending":
            pending_held[h["account_id"]] += h["amount"]
    report.granted_credits = sum(grants.values())
    report.captured_credits = sum(captures.values())
    for account in accounts:
        aid, subject = account["id"], f"user {account['user_id']}"
        expected = grants[aid] - captures[aid]
        if account["balance"] != expected:
            report.add(
                "balances",
                subject,
                f"balance {account['balance']} != grants {grants[aid]} - captured "
                f"{captures[aid]} = {expected}",
            )
        replayed_balance, replayed_held = running[aid]
        sums = stored[aid]
        if (account["balance"], account["held"]) != (replayed_balance, replayed_held) or (
            sums[0],
            sums[1],
        ) != (replayed_balance, replayed_held):
            report.add(
                "caches",
                subject,
                f"cached balance/held {account['balance']}/{account['held']}, stored deltas "
                f"sum to {sums[0]}/{sums[1]}, entries replayed give "
                f"{replayed_balance}/{replayed_held}",
            )
        elif account["held"] != pending_held[aid]:
            report.add(
                "caches",
                subject,
                f"held {account['held']} but its pending holds total {pending_held[aid]}",
            )
        if account["balance"] - account["held"] < 0 and aid not in flagged:
            report.add(
                "available",
                subject,
                f"available {account['balance'] - account['held']} is negative",
            )


def _check_holds(
    report: AuditReport,
    gens: Mapping[int, dict[str, Any]],
    holds: list[Mapping[str, Any]],
    entries_by_hold: Mapping[int, list[Mapping[str, Any]]],
) -> None:
    per_generation: Counter[int] = Counter()
    for h in holds:
        subject = f"hold {h['id']}"
        if h["generation_id"] is not None:
            per_generation[h["generation_id"]] += 1
        if h["status"] == "pending":
            report.add("open_holds", subject, f"still pending (generation {h['generation_id']})")
        kinds = [e["kind"] for e in entries_by_hold.get(h["id"], [])]
        openings = kinds.count("hold")
        endings = [k for k in kinds if k in ENDING_KINDS]
        if openings != 1:
            report.add("holds", subject, f"opened {openings} times (entries {kinds})")
        if h["status"] != "pending" and len(endings) != 1:
            report.add("holds", subject, f"{h['status']} but ended {len(endings)} times {kinds}")
        elif h["status"] == "pending" and endings:
            report.add("holds", subject, f"pending but has ending entries {endings}")
        elif endings:
            expected = {"capture": "captured", "release": "released", "expire": "expired"}
            if expected[endings[0]] != h["status"]:
                report.add(
                    "holds", subject, f"status {h['status']} but its ending entry is {endings[0]}"
                )
            capture = [e for e in entries_by_hold[h["id"]] if e["kind"] == "capture"]
            if capture and capture[0]["amount"] != h["captured_amount"]:
                report.add(
                    "holds",
                    subject,
                    f"captured_amount {h['captured_amount']} but its capture entry spent "
                    f"{capture[0]['amount']}",
                )
    for gid, count in per_generation.items():
        g = gens.get(gid)
        if g is not None and count > g["attempt"]:
            report.add(
                "holds",
                f"generation {gid}",
                f"{count} holds for {g['attempt']} attempt(s)",
            )


def _check_settlements(
    report: AuditReport,
    gens: Mapping[int, dict[str, Any]],
    holds: list[Mapping[str, Any]],
    holds_by_id: Mapping[int, Mapping[str, Any]],
    entries_by_hold: Mapping[int, list[Mapping[str, Any]]],
    accounts: list[Mapping[str, Any]],
    delivered: Mapping[tuple[int, int], list[Any]],
) -> None:
    refunded = {
        h["id"]
        for h in holds
        if any(e["kind"] in REFUND_KINDS for e in entries_by_hold.get(h["id"], []))
    }
    report.refunded = len(refunded)
    # Which holds must have been refunded: the current attempt's of a failed or canceled
    # generation, and an earlier attempt's unless that attempt delivered outputs (a regenerate
    # of a succeeded generation keeps its charge).
    should_refund: set[int] = set()
    earlier_captures: Counter[str] = Counter()
    account_user = {a["id"]: a["user_id"] for a in accounts}
    for h in holds:
        g = gens.get(h["generation_id"]) if h["generation_id"] is not None else None
        if g is None:
            continue
        if g["hold_id"] == h["id"]:
            if g["status"] in ("failed", "canceled"):
                should_refund.add(h["id"])
            continue
        attempt = _hold_attempt(h)
        if attempt is None or not delivered.get((g["id"], attempt)):
            should_refund.add(h["id"])
        elif h["status"] == "captured":
            earlier_captures[account_user.get(h["account_id"], "?")] += h["captured_amount"]
        if h["status"] == "captured" and not delivered.get((g["id"], attempt or 0)):
            report.add(
                "charged_outputs",
                f"hold {h['id']}",
                f"captured {h['captured_amount']} for generation {g['id']} attempt {attempt}, "
                "which stored no outputs",
            )
    for hold_id in sorted(should_refund - refunded):
        h = holds_by_id[hold_id]
        g = gens[h["generation_id"]]
        report.add(
            "refunds",
            f"generation {g['id']}",
            f"{g['status']} but hold {hold_id} was not refunded (it is {h['status']})",
        )
    for hold_id in sorted(refunded - should_refund):
        h = holds_by_id[hold_id]
        report.add(
            "refunds",
            f"hold {hold_id}",
            f"refunded but generation {h['generation_id']} is "
            f"{gens[h['generation_id']]['status'] if h['generation_id'] in gens else 'unknown'}",
        )

    charged_by_user: Counter[str] = Counter(earlier_captures)
    for gid, g in gens.items():
        subject = f"generation {gid}"
        if g["status"] != "succeeded":
            if g["amount_charged"]:
                report.add("charges", subject, f"{g['status']} but charged {g['amount_charged']}")
            continue
        charged_by_user[g["user_id"]] += g["amount_charged"]
        if not g["outputs"]:
            report.add("charged_outputs", subject, "charged without any output stored")
        hold = holds_by_id.get(g["hold_id"]) if g["hold_id"] is not None else None
        if hold is None:
            report.add("charges", subject, "succeeded without a hold")
            continue
        if hold["generation_id"] != gid:
            report.add(
                "charges", subject, f"its hold {hold['id']} is generation {hold['generation_id']}'s"
            )
        if hold["status"] != "captured" or hold["captured_amount"] != g["amount_charged"]:
            report.add(
                "charges",
                subject,
                f"charged {g['amount_charged']} but hold {hold['id']} is {hold['status']} with "
                f"{hold['captured_amount']} captured",
            )
    captured_by_user: Counter[str] = Counter()
    for h in holds:
        if h["status"] == "captured":
            captured_by_user[account_user.get(h["account_id"], "?")] += h["captured_amount"]
    for user in sorted(set(charged_by_user) | set(captured_by_user)):
        if charged_by_user[user] != captured_by_user[user]:
            report.add(
                "charges",
                f"user {user}",
                f"succeeded generations charged {charged_by_user[user]} but holds captured "
                f"{captured_by_user[user]}",
            )


def _check_predictions(
    report: AuditReport,
    gens: Mapping[int, dict[str, Any]],
    attempts: list[Mapping[str, Any]],
    predictions: list[dict[str, Any]],
) -> None:
    owner: dict[str, tuple[int, int]] = {}
    for a in attempts:
        pid, mine = a["prediction_id"], (a["generation_id"], a["attempt"])
        if not pid:
            continue
        if pid in owner:
            report.add(
                "shared_predictions",
                f"prediction {pid}",
                f"owned by generation {owner[pid][0]} attempt {owner[pid][1]} and by "
                f"generation {mine[0]} attempt {mine[1]}",
            )
        owner[pid] = mine
    for gid, g in gens.items():
        pid = g["prediction_id"]
        if pid and owner.get(pid) != (gid, g["attempt"]):
            report.add(
                "shared_predictions",
                f"generation {gid}",
                f"attempt {g['attempt']} holds prediction {pid}, recorded as "
                f"{'owned by ' + str(owner[pid]) if pid in owner else 'nobody'}",
            )
    # Requests by input (identical inputs form one group): a prediction nobody owns is counted
    # against the group it was made for, whose attempts bound how many may have been paid.
    group_of: dict[str, list[int]] = defaultdict(list)
    for gid, g in gens.items():
        group_of[_normalized(g["input"])].append(gid)
    paid_in_group: dict[str, list[str]] = defaultdict(list)
    report.predictions = len(predictions)
    for p in predictions:
        private = p.get("_emulator") or {}
        if "stuck" in (private.get("faults") or []):
            report.stuck_predictions += 1
            if p["status"] != "canceled":
                report.add(
                    "stuck_canceled", f"prediction {p['id']}", f"stuck prediction is {p['status']}"
                )
        if not private.get("paid"):
            continue
        report.paid_predictions += 1
        key = _normalized(p.get("input"))
        if p["id"] in owner:
            paid_in_group[key].append(f"{p['id']} (owned, {p['status']})")
            continue
        if p["status"] in ("starting", "processing"):
            report.add(
                "unowned_running",
                f"prediction {p['id']}",
                f"paid, owned by no attempt, and still {p['status']}",
            )
        if p["status"] == "canceled":
            report.canceled_orphans += 1
            continue
        if key in group_of:
            report.unrecorded_predictions += 1
            paid_in_group[key].append(f"{p['id']} (owned by no attempt, {p['status']})")
        else:
            report.add(
                "orphan_predictions",
                f"prediction {p['id']}",
                f"paid, owned by no generation, matches no request's input, and {p['status']} "
                "instead of canceled",
            )
    for key, paid in sorted(paid_in_group.items()):
        members = group_of.get(key, [])
        allowed = sum(gens[gid]["attempt"] for gid in members)
        if members and len(paid) > allowed:
            report.add(
                "paid_predictions",
                f"generation{'s' if len(members) > 1 else ''} {', '.join(map(str, members))}",
                f"{len(paid)} paid predictions for {allowed} attempt(s): {', '.join(paid)}",
            )


def _check_outputs(
    report: AuditReport,
    gens: Mapping[int, dict[str, Any]],
    attempts: list[Mapping[str, Any]],
    predictions: list[dict[str, Any]],
    s3_objects: Mapping[str, S3Object],
    fetch_output: Callable[[str], bytes | None],
) -> None:
    by_id = {p["id"]: p for p in predictions}
    # What every attempt that succeeded delivered: the current one's record is on its
    # generation, an earlier one's (before a regenerate) on its create attempt.
    delivered: dict[tuple[int, int], tuple[list[Any], str | None]] = {}
    for a in attempts:
        outputs = _json(a["outputs"])
        if outputs is not None:
            delivered[(a["generation_id"], a["attempt"])] = (outputs, a["prediction_id"])
    for gid, g in gens.items():
        if g["status"] == "succeeded":
            delivered[(gid, g["attempt"])] = (g["outputs"] or [], g["prediction_id"])
    for (gid, attempt), (outputs, prediction_id) in sorted(delivered.items()):
        subject = f"generation {gid} attempt {attempt}"
        if not outputs:
            report.add("outputs", subject, "succeeded without any output recorded")
            continue
        prediction = by_id.get(prediction_id or "")
        if prediction is None:
            report.add("outputs", subject, f"its prediction {prediction_id} is unknown")
            emulator_urls: list[str] = []
        else:
            emulator_urls = _output_urls(prediction)
            if emulator_urls and len(emulator_urls) != len(outputs):
                report.add(
                    "outputs",
                    subject,
                    f"{len(outputs)} objects recorded for {len(emulator_urls)} emulator outputs",
                )
        for index, recorded in enumerate(outputs):
            key = recorded.get("key")
            stored = s3_objects.get(key) if isinstance(key, str) else None
            if stored is None:
                report.add("outputs", subject, f"object {key!r} is not in the bucket")
                continue
            report.objects_checked += 1
            if stored.sha256 != recorded.get("sha256") or stored.size != recorded.get("size"):
                report.add(
                    "outputs",
                    subject,
                    f"{key}: S3 holds {stored.size} bytes sha256 {stored.sha256[:12]}, recorded "
                    f"{recorded.get('size')} bytes sha256 {str(recorded.get('sha256'))[:12]}",
                )
                continue
            original = fetch_output(emulator_urls[index]) if index < len(emulator_urls) else None
            if original is None:
                continue  # the emulator removed it: the recorded checksum is the evidence
            report.objects_compared_with_emulator += 1
            if sha256(original) != stored.sha256:
                report.add(
                    "outputs",
                    subject,
                    f"{key}: sha256 {stored.sha256[:12]} differs from the emulator's output "
                    f"{sha256(original)[:12]}",
                )
    for key in sorted(s3_objects):
        owner = _attempt_of_key(key)
        if owner is not None and owner not in delivered:
            report.add(
                "leftover_objects",
                key,
                f"generation {owner[0]} attempt {owner[1]} did not succeed, its object stays",
            )


def check_prices(
    report: AuditReport,
    gens: Mapping[int, Mapping[str, Any]],
    holds: Iterable[Mapping[str, Any]],
    attempts: Iterable[Mapping[str, Any]],
    predictions: Iterable[Mapping[str, Any]],
    prices: PriceBook,
) -> None:
    """Each hold against the price table, each capture against what the table charges for the
    provider's reported counts, and nothing captured for a failed or canceled attempt.

    ``gens`` maps generation ids to rows with decoded ``input`` and ``outputs``; the other rows
    are as :func:`audit` reads them (``create_attempts.outputs`` may still be JSON text).
    """
    by_id = {p["id"]: p for p in predictions}
    records = {(a["generation_id"], a["attempt"]): a for a in attempts}
    for h in holds:
        g = gens.get(h["generation_id"]) if h["generation_id"] is not None else None
        if g is None:
            continue
        subject = f"generation {g['id']}"
        price = prices.find(g["model"])
        if price is None:
            report.add(
                "held_prices",
                subject,
                f"hold {h['id']} of {h['amount']} for {g['model']!r}, which has no price",
            )
            continue
        tally = report.price_checks.setdefault(price.kind, Counter())
        payload = g["input"] if isinstance(g["input"], dict) else {}
        tally["holds"] += 1
        try:
            expected_hold: int | None = price.hold_amount(payload)
        except ValueError:
            expected_hold = None  # the input is out of the price's range: nothing may be held
        if h["amount"] != expected_hold:
            tally["mismatches"] += 1
            report.add(
                "held_prices",
                subject,
                f"hold {h['id']} is {h['amount']}, the {price.kind} price holds "
                f"{expected_hold} for its input",
            )
        current = g["hold_id"] == h["id"]
        attempt = g["attempt"] if current else _hold_attempt(h)
        if current and g["status"] in ("failed", "canceled"):
            tally["unpaid"] += 1
            if h["status"] == "captured" or h["captured_amount"] or g["amount_charged"]:
                tally["mismatches"] += 1
                report.add(
                    "charged_prices",
                    subject,
                    f"{g['status']} but hold {h['id']} is {h['status']} with "
                    f"{h['captured_amount']} captured and {g['amount_charged']} charged",
                )
            continue
        if h["status"] != "captured":
            continue
        if current:
            prediction_id, stored = g["prediction_id"], g["outputs"]
        else:
            record = records.get((g["id"], attempt or 0), {})
            prediction_id, stored = record.get("prediction_id"), _json(record.get("outputs"))
        tally["charges"] += 1
        problem = _charge_problem(
            report, price, payload, h, prediction=by_id.get(prediction_id or ""), stored=stored
        )
        if problem is None and current and g["amount_charged"] != h["captured_amount"]:
            problem = f"charged {g['amount_charged']} but hold {h['id']} captured " + str(
                h["captured_amount"]
            )
        if problem is not None:
            tally["mismatches"] += 1
            report.add("charged_prices", f"{subject} attempt {attempt}", problem)


def _charge_problem(
    report: AuditReport,
    price: Price,
    payload: Mapping[str, Any],
    hold: Mapping[str, Any],
    *,
    prediction: Mapping[str, Any] | None,
    stored: Any,
) -> str | None:
    """Why a hold's capture is not the price of what the provider reports, or None."""
    if prediction is None:
        return f"hold {hold['id']} captured {hold['captured_amount']} for an unknown prediction"
    metrics = prediction.get("metrics") or {}
    stored_count = len(stored) if isinstance(stored, list) else 0
    returned = provider_output_count(prediction)
    if returned is None:
        report.unverified_output_counts += 1
        returned = stored_count
    elif price.kind == "per_output" and returned != stored_count:
        return (
            f"stored {stored_count} outputs of the {returned} prediction {prediction['id']} "
            f"returned (hold {hold['id']} captured {hold['captured_amount']})"
        )
    try:
        expected = price.charge_for(
            metrics.get("predict_time"), input=payload, metrics=metrics, stored_outputs=returned
        )
    except ValueError:  # a reported time that is no duration: the hold is charged
        expected = hold["amount"]
    if hold["captured_amount"] == expected:
        return None
    counts = {
        name: metrics.get(name)
        for name in ("predict_time", "input_token_count", "output_token_count")
        if name in metrics
    }
    return (
        f"hold {hold['id']} captured {hold['captured_amount']}, the {price.kind} price charges "
        f"{expected} for prediction {prediction['id']} ({returned} outputs, metrics {counts})"
    )


def provider_output_count(prediction: Mapping[str, Any]) -> int | None:
    """How many outputs the provider returned for ``prediction``, counted as the project
    stores them (each file URL one output, streamed text chunks one text), or None when
    unknown: removed without a record of it, or a structured output."""
    private = prediction.get("_emulator") or {}
    if "completed_output" in private:
        output = private["completed_output"]
    elif prediction.get("data_removed"):
        return None
    else:
        output = prediction.get("output")
    if output is None or output == "" or output == []:
        return 0
    if isinstance(output, str):
        return 1
    if isinstance(output, list) and all(isinstance(v, str) for v in output):
        files = [v for v in output if v.startswith(("http://", "https://", "data:"))]
        if len(files) == len(output):
            return len(files)
        if not files:
            return 1 if "".join(output) else 0
    return None


def _attempt_of_key(key: str) -> tuple[int, int] | None:
    """(generation, attempt) of an output key ``[...]generations/<id>/a<attempt>/<file>``."""
    parts = key.split("/")
    for i in range(len(parts) - 3):
        gid, attempt = parts[i + 1], parts[i + 2]
        if (
            parts[i] == "generations"
            and gid.isdigit()
            and attempt.startswith("a")
            and attempt[1:].isdigit()
        ):
            return int(gid), int(attempt[1:])
    return None


def _output_urls(prediction: Mapping[str, Any]) -> list[str]:
    output = prediction.get("output")
    if prediction.get("data_removed") or not output:
        return []
    items: Iterable[Any] = output if isinstance(output, list) else [output]
    return [u for u in items if isinstance(u, str) and "/files/" in u]
