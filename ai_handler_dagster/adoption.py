"""One paid prediction per attempt: create it, adopt it when the answer was lost, cancel orphans.

Replicate's create has no idempotency key. A create whose answer is lost (a timeout, a dropped
connection, a 5xx from a proxy) may still have started a paid prediction, and the only way to
find it is the provider's list of recent predictions, which has no owner field. The rules here
decide which listed prediction an attempt may take, using what the database remembers of every
create attempt ever made (``create_attempts``):

- A candidate was made through the API, has the attempt's input, its requested version or one
  of the model names creates of this reference were answered with (Replicate answers some
  official models under another name; with none known yet, input and time alone decide), and
  was created at or after the attempt's first create, minus a clock allowance
  (``adopt_window_s`` of the client's settings). The nearest in time is tried first.
- Nobody else owns it: a prediction id is owned by one attempt, ever, enforced by a unique index;
  a requeue starts a new attempt and never forgets the old one's prediction. Taking a candidate
  is that unique write, so two attempts racing for the same one cannot both win.
- A deployment's prediction names its deployment (``deployment: "owner/name"``) and reports the
  model and version the deployment runs. A deployment attempt takes only a prediction that
  names its deployment, a model attempt never one that names a deployment. A listed prediction
  of the input that names none could be a lost deployment create's (should the provider leave
  the field out) as well as the plain model's: it is never taken, and while it is owned by no
  attempt nothing is created again either; the attempt fails (refunded) instead.
- While another attempt of the same model and input has a create in flight (state ``creating``,
  at most ``timeout_s`` plus a grace), its answer may name one of the candidates: the attempt that
  lost its answer waits for it rather than guess.

An orphan is a running prediction that one of our attempts could have made (the rules above) and
that no attempt owns: it is canceled at the end of a create step that lost an answer, and by
reconciliation. A listed prediction that matches none of our attempts is never touched: the
account may be shared with other applications.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa

from ai_handler_dagster import generations as gens
from ai_handler_dagster.db.engine import session_scope
from ai_handler_dagster.db.models import CreateAttempt, utcnow
from ai_handler_dagster.domain import PREDICTION_RUNNING, AttemptState, parse_model_ref
from ai_handler_dagster.errors import INTERNAL_ERROR, PROVIDER_UNAVAILABLE, GenerationError
from ai_handler_dagster.replicate.client import MATCH, CreatePacer, ReplicateClient, listed_match
from ai_handler_dagster.replicate.snapshot import PredictionSnapshot, parse_time

#: Seconds beyond the client's read timeout that a sibling's in-flight create is waited for.
CREATE_GRACE_S = 5.0
#: Pages of the provider's list (100 each) an orphan sweep reads at most.
ORPHAN_MAX_PAGES = 20

Log = Callable[[str], None]


@dataclass(frozen=True)
class Attempt:
    """What the create step knows of one generation attempt."""

    generation_id: int
    attempt: int
    model: str
    input: dict[str, Any]


class _Adopter:
    """``adopt()`` for :meth:`ReplicateClient.create`: finds and takes the prediction a lost
    create of this attempt made, or returns None."""

    def __init__(
        self,
        engine: sa.Engine,
        client: ReplicateClient,
        attempt: Attempt,
        started_at: datetime,
        log: Log,
    ) -> None:
        self.engine = engine
        self.client = client
        self.attempt = attempt
        self.started_at = started_at
        self.log = log
        self.adopted: PredictionSnapshot | None = None
        self.grace_s = client.settings.timeout_s + CREATE_GRACE_S

    def __call__(self) -> PredictionSnapshot | None:
        a = self.attempt
        with session_scope(self.engine) as session:
            gens.create_lost(session, a.generation_id, a.attempt)
        self._wait_for_siblings()
        with session_scope(self.engine) as session:
            # Still looking, as of now (the wait may have taken the whole grace).
            gens.create_lost(session, a.generation_id, a.attempt)
            names = gens.learned_model_names(session, a.model)
        search = self.client.lost_create_search(
            a.model,
            a.input,
            started_at=self.started_at.timestamp(),
            model_names=names or None,
        )
        candidates = search.candidates
        if not candidates and not search.indistinct:
            return None
        with session_scope(self.engine) as session:
            owned = gens.owned_predictions(
                session, [c.id for c in (*candidates, *search.indistinct)]
            )
        for candidate in candidates:
            if candidate.id in owned:
                continue
            try:
                with session_scope(self.engine) as session:
                    gens.record_prediction(
                        session,
                        a.generation_id,
                        candidate.id,
                        candidate.model,
                        candidate.version,
                        attempt=a.attempt,
                        how="adopted",
                    )
            except gens.PredictionOwned:
                continue  # another attempt took it a moment ago: try the next one
            self.log(
                f"generation {a.generation_id}: the create answer was lost; adopted prediction "
                f"{candidate.id} ({len(candidates)} candidate(s)) instead of creating another"
            )
            self.adopted = candidate
            return candidate
        unowned = [c.id for c in search.indistinct if c.id not in owned]
        if unowned:
            # It may be the lost create's prediction, or the plain model's (another
            # application's): neither taking it nor creating another is safe.
            raise GenerationError(
                PROVIDER_UNAVAILABLE,
                f"the create's answer was lost, and the provider's list shows "
                f"{len(unowned)} prediction(s) of this input that name no deployment "
                f"({', '.join(unowned[:3])}): one may be this attempt's, but it cannot be told "
                f"apart from another's, so none is adopted and nothing is created again",
            )
        return None

    def _wait_for_siblings(self) -> None:
        deadline = time.monotonic() + self.grace_s
        while True:
            fresh_after = utcnow() - timedelta(seconds=self.grace_s)
            with session_scope(self.engine) as session:
                waiting = gens.creating_siblings(
                    session,
                    self.attempt.generation_id,
                    self.attempt.attempt,
                    fresh_after=fresh_after,
                )
            if waiting == 0 or time.monotonic() >= deadline:
                return
            time.sleep(0.25)


def obtain(
    engine: sa.Engine,
    client: ReplicateClient,
    attempt: Attempt,
    *,
    webhook: str | None,
    cancel_after_s: float | None = None,
    log: Log,
    pacer: CreatePacer | None = None,
) -> tuple[PredictionSnapshot, bool]:
    """The attempt's one prediction, recorded as its own, and whether an answer was lost.

    Created, or adopted when an earlier try's answer (in this call, an earlier op try or an
    earlier run) may have started one. Raises ``GenerationError`` (the generation fails with it)
    and ``gens.InvalidTransition`` when the generation no longer runs this attempt (nothing is
    left to do for it; a prediction created for it meanwhile is canceled here).

    ``pacer`` is the shared create throttle (``throttle.py``): every create of this attempt
    waits for its turn, and its answers feed the throttle.
    """
    with session_scope(engine) as session:
        earlier = gens.begin_create(session, attempt.generation_id, attempt=attempt.attempt)
    adopter = _Adopter(engine, client, attempt, earlier or utcnow(), log)
    first = earlier is None

    def in_flight() -> None:
        # Right before every create request, after its turn at the throttle: the attempt's
        # state_at is now (siblings, the orphan sweep), and so is the first create's time
        # (its prediction's deadline and the adoption window), however long the turn took.
        nonlocal first
        with session_scope(engine) as session:
            sent_at = gens.create_in_flight(
                session, attempt.generation_id, attempt.attempt, first=first
            )
        if first and sent_at is not None:
            adopter.started_at = sent_at
        first = False

    snapshot = client.create(
        attempt.model,
        attempt.input,
        webhook=webhook,
        webhook_events_filter=["completed"] if webhook else None,
        adopt=adopter,
        maybe_created=earlier is not None,
        cancel_after_s=cancel_after_s,
        before_try=in_flight,
        pacer=pacer,
    )
    lost = adopter.adopted is not None or earlier is not None
    if adopter.adopted is not None and adopter.adopted.id == snapshot.id:
        return snapshot, True
    try:
        with session_scope(engine) as session:
            gens.record_prediction(
                session,
                attempt.generation_id,
                snapshot.id,
                snapshot.model,
                snapshot.version,
                attempt=attempt.attempt,
            )
    except gens.PredictionOwned:
        # Our own answer names a prediction another attempt already took as its lost one (it
        # waited past our create's timeout): it is theirs now, and theirs is ours to find.
        adopted = adopter()
        if adopted is None:
            raise GenerationError(
                INTERNAL_ERROR,
                f"prediction {snapshot.id} was taken by another attempt and no other was found",
            ) from None
        return adopted, True
    except gens.InvalidTransition:
        # The generation ended meanwhile: this prediction is ours and nobody's use.
        client.cancel(snapshot.id)
        raise
    return snapshot, lost


def _model_matches(model_ref: str, item: dict[str, Any], names: set[str]) -> bool:
    # Only a clear match: a deployment's prediction that does not say so is never canceled.
    return listed_match(parse_model_ref(model_ref), item, names or None) == MATCH


def cancel_orphans(
    engine: sa.Engine,
    client: ReplicateClient,
    *,
    since: datetime,
    log: Log,
) -> list[str]:
    """Cancel running predictions that one of our attempts started since ``since`` could have
    made and that no attempt owns; return their ids (see the module docstring)."""
    window = timedelta(seconds=client.settings.adopt_window_s)
    items = [
        item
        for item in client.recent_predictions(
            (since - window).timestamp(), max_pages=ORPHAN_MAX_PAGES
        )
        if item.get("status") in PREDICTION_RUNNING
        and item.get("source", "api") == "api"
        and item.get("id")
    ]
    if not items:
        return []
    with session_scope(engine) as session:
        owned = gens.owned_predictions(session, [str(i["id"]) for i in items])
        unowned = [i for i in items if i["id"] not in owned]
        by_sha: dict[str, list[dict[str, Any]]] = {}
        for item in unowned:
            by_sha.setdefault(_sha_or_none(item.get("input")) or "", []).append(item)
        by_sha.pop("", None)
        attempts = _attempts(session, since - window, by_sha)
        names = {a.model: gens.learned_model_names(session, a.model) for a in attempts}
    grace = timedelta(seconds=client.settings.timeout_s + CREATE_GRACE_S)
    busy_after = utcnow() - grace
    canceled: list[str] = []
    for sha, group in by_sha.items():
        mine = [a for a in attempts if a.input_sha256 == sha]
        for item in group:
            created = parse_time(item.get("created_at"))
            # An attempt can have made a prediction from its first create until its last
            # state change (plus an answer's flight and the clock allowance), not later.
            could_be = [
                a
                for a in mine
                if created is not None
                and (a.started_at - window).timestamp()
                <= created
                <= (a.state_at + grace + window).timestamp()
                and _model_matches(a.model, item, names[a.model])
            ]
            if not could_be:
                continue  # not one of ours: never touched
            if any(
                a.state in (AttemptState.CREATING, AttemptState.LOST) and a.state_at >= busy_after
                for a in could_be
            ):
                continue  # an attempt may still take it (an answer in flight, a search)
            client.cancel(str(item["id"]))
            canceled.append(str(item["id"]))
            log(f"canceled orphan prediction {item['id']}: one of ours, owned by no attempt")
    return canceled


def _sha_or_none(value: Any) -> str | None:
    try:
        return gens.input_sha256(value)
    except (TypeError, ValueError, RecursionError):
        return None


def _attempts(session: Any, since: datetime, by_sha: Mapping[str, Any]) -> list[CreateAttempt]:
    if not by_sha:
        return []
    rows = session.scalars(
        sa.select(CreateAttempt).where(
            # An attempt resumed by a later run may create long after its first try.
            CreateAttempt.started_at >= since - timedelta(hours=6),
            CreateAttempt.input_sha256.in_(list(by_sha)),
            # An attempt that got its answer every time left nothing behind.
            sa.or_(CreateAttempt.lost_at.is_not(None), CreateAttempt.state != AttemptState.OWNED),
        )
    ).all()
    session.expunge_all()
    return list(rows)
