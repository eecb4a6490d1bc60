"""The emulator's state: predictions, the hardware queue, faults, outputs and counters.

All state sits behind one lock and every operation under it is short. Time passes through the
:class:`Scheduler` (progress ticks, completion, deadlines, output expiry); model work runs on a
small render pool; webhooks go out through the :class:`WebhookDispatcher`. The HTTP layer
(``server.py``) only translates requests into calls on :class:`Engine`.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import copy
import functools
import json
import logging
import random
import secrets
import threading
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from .config import EmulatorConfig, deployment_target
from .models import MODELS, DemoModel, OutputFile
from .scheduler import ScheduledCall, Scheduler
from .webhooks import WEBHOOK_EVENTS, WebhookDispatcher

log = logging.getLogger(__name__)

STATUSES = ("starting", "processing", "succeeded", "failed", "canceled")
TERMINAL = frozenset({"succeeded", "failed", "canceled"})
FAIL_TRIGGER = "[fail]"
"""A prompt containing this always fails (after running, so it is paid), whatever the rates."""
STUCK_TRIGGER = "[stuck]"
"""A prompt containing this never finishes until canceled or past its deadline."""

# The order faults are drawn in for one create; changing it would change every seeded schedule.
_FAULT_STREAMS = (
    "failure", "stuck", "slow", "remove_output", "drop_create",
    "http_500", "http_429", "seed", "latency",
)  # fmt: skip


class ApiError(Exception):
    """An error answered as ``application/problem+json``."""

    def __init__(
        self,
        status: int,
        title: str,
        detail: str,
        *,
        invalid_fields: list[dict[str, str]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(f"{status} {title}: {detail}")
        self.status = status
        self.title = title
        self.detail = detail
        self.invalid_fields = invalid_fields
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """The problem document."""
        slug = self.title.lower().replace(" ", "-")
        doc: dict[str, Any] = {
            "type": f"urn:replicate-emulator:problem:{slug}",
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
        }
        if self.invalid_fields is not None:
            doc["invalid_fields"] = self.invalid_fields
        return doc


def not_found(what: str = "The requested resource could not be found.") -> ApiError:
    """A 404 problem."""
    return ApiError(404, "Not found", what)


def validation_error(invalid_fields: list[dict[str, str]]) -> ApiError:
    """A 422 "Input validation failed" problem listing each invalid field."""
    detail = "".join(f"- {f['field']}: {f['description']}\n" for f in invalid_fields)
    return ApiError(422, "Input validation failed", detail, invalid_fields=invalid_fields)


def iso(ts: float | None) -> str | None:
    """Replicate's timestamp format: ISO 8601, microseconds, ``Z``."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def now() -> float:
    """Wall-clock time quantized to the microsecond, so a timestamp read back from the JSON
    (``created_after`` filters) compares equal to the one stored."""
    return datetime.fromtimestamp(time.time(), UTC).timestamp()


def _prediction_id() -> str:
    # Replicate ids are 26 lowercase base32 characters (16 random bytes, unpadded).
    return base64.b32encode(secrets.token_bytes(16)).decode().rstrip("=").lower()


@dataclass(eq=False)
class Prediction:
    """One prediction's full state (public fields plus the emulator's own bookkeeping)."""

    seq: int
    id: str
    model: DemoModel
    input: Any
    inputs: dict[str, Any]
    seed: int
    created_at: float
    created_mono: float
    webhook: str | None = None
    webhook_events: frozenset[str] = WEBHOOK_EVENTS
    faults: frozenset[str] = frozenset()
    deadline_s: float | None = None
    status: str = "starting"
    started_at: float | None = None
    started_mono: float | None = None
    completed_at: float | None = None
    completed_mono: float | None = None
    output: Any = None
    #: The output as the prediction succeeded with it, kept after its files are removed: what
    #: the provider returned (an audit counts the outputs it was owed from it).
    completed_output: Any = None
    logs: str = ""
    error: str | None = None
    data_removed: bool = False
    metrics: dict[str, Any] = field(default_factory=dict)
    files: dict[int, OutputFile] = field(default_factory=dict)
    paid: bool = False
    response_dropped: bool = False
    hide_version: bool = False
    #: The model name the API shows (an official model's alias), if not ``model.ref``.
    shown_model: str | None = None
    #: ``api``, or ``web`` for a prediction made on the website (not by this account's code).
    source: str = "api"
    #: The deployment (``owner/name``) it was made through, if any.
    deployment: str | None = None
    canceled_by: str | None = None
    preview: list[str] | None = None
    done: threading.Event = field(default_factory=threading.Event)
    timers: list[ScheduledCall] = field(default_factory=list)


@dataclass(frozen=True)
class Page:
    """One page of ``GET /v1/predictions``."""

    results: list[dict[str, Any]]
    next_cursor: str | None
    previous_cursor: str | None


def encode_cursor(direction: str, seq: int) -> str:
    """An opaque cursor: ``b`` = older than ``seq``, ``a`` = newer than ``seq``."""
    return base64.urlsafe_b64encode(json.dumps({direction: seq}).encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[str, int]:
    """Inverse of :func:`encode_cursor`; 400 on garbage."""
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        data = json.loads(base64.urlsafe_b64decode(padded))
        ((direction, seq),) = data.items()
        if direction not in ("a", "b") or not isinstance(seq, int):
            raise ValueError(cursor)
    except (ValueError, TypeError, binascii.Error):
        raise ApiError(400, "Bad request", "Invalid cursor") from None
    return direction, seq


class Engine:
    """Runs predictions on emulated hardware and keeps the books. Thread-safe."""

    def __init__(self, config: EmulatorConfig, base_url: str) -> None:
        self.base_url = base_url.rstrip("/")
        self._lock = threading.RLock()
        self._config = config
        self._rngs: dict[str, random.Random] = {}
        self._seed_rngs(config.faults.seed)
        self._predictions: dict[str, Prediction] = {}
        self._order: list[Prediction] = []  # index == seq, oldest first
        self._queue: deque[Prediction] = deque()
        self._running = 0
        self._max_running = 0
        self._status_counts: Counter[str] = Counter()
        self._counters: Counter[str] = Counter()
        self._requests: Counter[str] = Counter()
        self._responses: Counter[str] = Counter()
        self._faults_applied: Counter[str] = Counter()
        #: Deployment -> (the model it runs, its release number, the release's time).
        self._releases: dict[str, tuple[str, int, str | None]] = {}
        self._stopped = False
        self.scheduler = Scheduler()
        self.webhooks = WebhookDispatcher(lambda: self._config, self.scheduler)
        self._render_pool = ThreadPoolExecutor(
            config.render_workers, thread_name_prefix="emulator-render"
        )

    # ----------------------------------------------------------------------------- config

    @property
    def config(self) -> EmulatorConfig:
        """The settings in force now."""
        return self._config

    def configure(self, **changes: Any) -> EmulatorConfig:
        """Apply setting changes at runtime (see :meth:`EmulatorConfig.updated`)."""
        with self._lock:
            old = self._config
            new = old.updated(**changes)
            self._config = new
            if new.faults.seed != old.faults.seed:
                self._seed_rngs(new.faults.seed)
            if new.retention_s != old.retention_s:
                # Expiry timers re-read the setting when they fire; re-arm them for the
                # new (possibly earlier) deadline.
                for pred in self._order:
                    if pred.status in TERMINAL and not pred.data_removed:
                        self._schedule_expiry(pred)
            # More slots may be free now.
            self._dispatch()
            return new

    def _seed_rngs(self, seed: int) -> None:
        self._rngs = {name: random.Random(f"{seed}:{name}") for name in _FAULT_STREAMS}

    def draw(self, stream: str, rate: float) -> bool:
        """One reproducible coin flip from a fault stream (always drawn, so that changing a
        rate does not shift the other decisions of the schedule)."""
        with self._lock:
            hit = self._rngs[stream].random() < rate
            if hit:
                self._faults_applied[stream] += 1
            return hit

    # ----------------------------------------------------------------------------- API

    def create(
        self,
        model: DemoModel,
        raw_input: Any,
        *,
        webhook: str | None = None,
        webhook_events: frozenset[str] = WEBHOOK_EVENTS,
        deadline_s: float | None = None,
        by_model_path: bool = False,
        source: str = "api",
        deployment: str | None = None,
    ) -> tuple[Prediction, dict[str, Any], bool]:
        """Validate and enqueue a prediction.

        Returns the prediction, its create-time JSON (``starting``) and whether the HTTP layer
        must drop the response (the ``drop_create`` fault). ``by_model_path``: created through
        ``/v1/models/{owner}/{name}/predictions`` (official models then hide their version, and
        a model with an alias answers under it). ``source="web"``: made on the website, never
        dropped. ``deployment``: made through that deployment (``owner/name``), which runs
        ``model``.
        """
        inputs, problems = model.validate(raw_input)
        if problems:
            with self._lock:
                self._counters["validation_errors"] += 1
            raise validation_error(problems)
        with self._lock:
            faults_cfg = self._config.faults
            prompt = str(inputs.get("prompt", ""))
            faults: set[str] = set()
            if self.draw("failure", faults_cfg.failure_rate) or FAIL_TRIGGER in prompt:
                faults.add("fail")
            if self.draw("stuck", faults_cfg.stuck_rate) or STUCK_TRIGGER in prompt:
                faults.add("stuck")
            if self.draw("slow", faults_cfg.slow_rate):
                faults.add("slow")
            if self.draw("remove_output", faults_cfg.remove_output_rate):
                faults.add("remove_output")
            drop = source == "api" and self.draw("drop_create", faults_cfg.drop_create_rate)
            random_seed = self._rngs["seed"].randrange(2**31)
            seed = inputs["seed"] if inputs.get("seed") is not None else random_seed
            created = now()
            pred = Prediction(
                seq=len(self._order),
                id=_prediction_id(),
                model=model,
                input=raw_input,
                inputs=inputs,
                seed=seed,
                created_at=created,
                created_mono=time.monotonic(),
                webhook=webhook,
                webhook_events=webhook_events,
                faults=frozenset(faults),
                deadline_s=deadline_s,
                response_dropped=drop,
                hide_version=by_model_path and model.ref in self._config.official_models,
                shown_model=self._config.model_aliases.get(model.ref) if by_model_path else None,
                source=source,
                deployment=deployment,
            )
            self._predictions[pred.id] = pred
            self._order.append(pred)
            self._queue.append(pred)
            self._status_counts["starting"] += 1
            self._counters["creates"] += 1
            if drop:
                self._counters["create_responses_dropped"] += 1
            if deadline_s is not None:
                pred.timers.append(
                    self.scheduler.call_later(deadline_s, lambda: self._deadline(pred))
                )
            # The create answer says "starting" even when a slot is free right away, as
            # Replicate's does.
            snapshot = self.to_json(pred)
            self._dispatch()
            return pred, snapshot, drop

    def get(self, prediction_id: str) -> Prediction:
        """The prediction, or a 404 problem."""
        with self._lock:
            pred = self._predictions.get(prediction_id)
        if pred is None:
            raise not_found()
        return pred

    def snapshot(self, prediction_id: str, *, hide_progress: bool = False) -> dict[str, Any]:
        """The public JSON of one prediction.

        ``hide_progress`` reports an unfinished prediction as ``starting``: what a create with
        ``Prefer: wait`` answers when the wait runs out.
        """
        pred = self.get(prediction_id)
        with self._lock:
            doc = self.to_json(pred)
        if hide_progress and doc["status"] not in TERMINAL:
            doc["status"] = "starting"
        return doc

    def cancel(self, prediction_id: str, *, reason: str = "api") -> dict[str, Any]:
        """Cancel unless already finished; either way answer the prediction as it now is."""
        pred = self.get(prediction_id)
        with self._lock:
            lag = self._config.cancel_lag_s
            if pred.status not in TERMINAL and lag > 0:
                # Answered as it is now; it ends canceled once the cancel lands.
                if pred.canceled_by is None:
                    pred.canceled_by = reason
                    self.scheduler.call_later(lag, lambda: self._land_cancel(pred))
                return self.to_json(pred)
            if pred.status not in TERMINAL:
                pred.canceled_by = reason
                self._append_log(pred, "Prediction canceled.")
                self._finish(pred, "canceled")
            return self.to_json(pred)

    def _land_cancel(self, pred: Prediction) -> None:
        with self._lock:
            if pred.status not in TERMINAL:
                self._append_log(pred, "Prediction canceled.")
                self._finish(pred, "canceled")

    def list_page(
        self,
        cursor: str | None,
        *,
        created_after: float | None = None,
        created_before: float | None = None,
    ) -> Page:
        """A page of predictions, newest first, with cursors to the older and newer pages."""
        direction, seq = decode_cursor(cursor) if cursor else ("b", None)

        def matches(p: Prediction) -> bool:
            if created_after is not None and p.created_at <= created_after:
                return False
            return created_before is None or p.created_at < created_before

        with self._lock:
            size = self._config.page_size
            order = self._order
            if direction == "b":
                start = len(order) - 1 if seq is None else min(seq, len(order)) - 1
                indices = range(start, -1, -1)
            else:
                indices = range(max(seq + 1, 0) if seq is not None else 0, len(order))
            page: list[Prediction] = []
            more = False
            for i in indices:
                if not matches(order[i]):
                    continue
                if len(page) == size:
                    more = True
                    break
                page.append(order[i])
            if direction == "a":
                page.reverse()
            results = [self.to_json(p) for p in page]
            if not page:
                return Page(results, None, None)
            newest, oldest = page[0].seq, page[-1].seq
            if created_after is None and created_before is None:
                has_older, has_newer = oldest > 0, newest < len(order) - 1
            else:
                has_older = (direction == "b" and more) or any(map(matches, order[:oldest]))
                has_newer = (direction == "a" and more) or any(map(matches, order[newest + 1 :]))
            return Page(
                results,
                encode_cursor("b", oldest) if has_older else None,
                encode_cursor("a", newest) if has_newer else None,
            )

    def file(self, prediction_id: str, index: int, ext: str) -> OutputFile:
        """An output file, or 404 once outputs are removed (or if it never existed)."""
        with self._lock:
            pred = self._predictions.get(prediction_id)
            out = pred.files.get(index) if pred is not None else None
        if out is None or out.ext != ext or out.gone or out.url is not None:
            raise not_found("No such output file (it may have expired).")
        return out

    def expire_outputs(self, prediction_ids: list[str] | None = None) -> int:
        """Delete outputs now (as if retention had passed); returns how many were removed."""
        with self._lock:
            targets = (
                [self._predictions[i] for i in prediction_ids if i in self._predictions]
                if prediction_ids is not None
                else list(self._order)
            )
            count = 0
            for pred in targets:
                if pred.status in TERMINAL and not pred.data_removed:
                    self._remove_outputs(pred)
                    count += 1
            return count

    def run_count(self, model_ref: str) -> int:
        """How many predictions a model has had (the model's ``run_count``)."""
        with self._lock:
            return sum(1 for p in self._order if p.model.ref == model_ref)

    # ----------------------------------------------------------------------------- records

    def record_request(self, route: str, status: int | str) -> None:
        """Count one HTTP exchange (``route`` is ``METHOD /template``)."""
        with self._lock:
            self._requests[route] += 1
            self._responses[str(status)] += 1
            if status == 429:
                self._counters["http_429"] += 1
            elif status == 500:
                self._counters["http_500"] += 1

    def count(self, name: str, n: int = 1) -> None:
        """Bump a named counter shown in :meth:`stats`."""
        with self._lock:
            self._counters[name] += n

    def stats(self) -> dict[str, Any]:
        """Counters for audits and benchmarks."""
        with self._lock:
            counts = self._counters
            statuses = {s: self._status_counts[s] for s in STATUSES}
            return {
                "requests": dict(sorted(self._requests.items())),
                "requests_total": sum(self._requests.values()),
                "responses_by_status": dict(sorted(self._responses.items())),
                "creates": counts["creates"],
                "create_responses_dropped": counts["create_responses_dropped"],
                "validation_errors": counts["validation_errors"],
                "paid_predictions": counts["paid_predictions"],
                "predictions_total": len(self._order),
                "predictions_by_status": statuses,
                "final_status": {s: statuses[s] for s in ("succeeded", "failed", "canceled")},
                "running": self._running,
                "queued": statuses["starting"],
                "max_running": self._max_running,
                "http_429": counts["http_429"],
                "http_500": counts["http_500"],
                "rate_limited": counts["rate_limited"],
                # Create requests past authentication, and those of them answered 429.
                "create_requests": counts["create_requests"],
                "creates_throttled": counts["creates_throttled"],
                "outputs_removed": counts["outputs_removed"],
                "deadline_canceled": counts["deadline_canceled"],
                "faults_applied": dict(sorted(self._faults_applied.items())),
                "webhooks": self.webhooks.stats(),
                "scheduler_pending": self.scheduler.pending(),
            }

    def predictions(self) -> list[dict[str, Any]]:
        """Every prediction, oldest first, with the emulator's private view under ``_emulator``."""
        with self._lock:
            docs = []
            for pred in self._order:
                doc = self.to_json(pred)
                doc["_emulator"] = {
                    "seq": pred.seq,
                    "paid": pred.paid,
                    "faults": sorted(pred.faults),
                    "seed": pred.seed,
                    "response_dropped": pred.response_dropped,
                    "canceled_by": pred.canceled_by,
                    "completed_output": copy.deepcopy(pred.completed_output),
                    "deadline_s": pred.deadline_s,
                    "webhook": pred.webhook,
                    "webhook_events_filter": sorted(pred.webhook_events),
                }
                docs.append(doc)
        for doc in docs:
            doc["_emulator"]["webhook_deliveries"] = self.webhooks.history(doc["id"])
        return docs

    def to_json(self, pred: Prediction) -> dict[str, Any]:
        """The prediction as Replicate's API shows it. Call with the lock held."""
        urls = {
            "get": f"{self.base_url}/v1/predictions/{pred.id}",
            "cancel": f"{self.base_url}/v1/predictions/{pred.id}/cancel",
            "web": f"{self.base_url}/p/{pred.id}",
        }
        doc = {
            "id": pred.id,
            "model": pred.shown_model or pred.model.ref,
            # Replicate's official models answer "hidden" instead of a version id.
            "version": "hidden" if pred.hide_version else pred.model.version_id,
            "input": pred.input,
            "output": pred.output,
            "logs": pred.logs,
            "error": pred.error,
            "status": pred.status,
            "source": pred.source,
            "created_at": iso(pred.created_at),
            "started_at": iso(pred.started_at),
            "completed_at": iso(pred.completed_at),
            "data_removed": pred.data_removed,
            "metrics": dict(pred.metrics),
            "urls": urls,
        }
        if pred.deployment is not None and self._config.name_deployments:
            doc["deployment"] = pred.deployment
        return doc

    def deployment(self, owner: str, name: str) -> tuple[DemoModel, dict[str, Any]]:
        """The model deployment ``owner/name`` runs and the deployment's JSON, or a 404 problem
        (Replicate answers 404 for a deployment the account does not have)."""
        key = f"{owner}/{name}"
        with self._lock:
            target = self._config.deployments.get(key)
            if target is None:
                raise not_found(f"Deployment {key} does not exist.")
            model = deployment_target(target)
            release = self._releases.get(key)
            if release is None or release[0] != target:
                number = 1 if release is None else release[1] + 1
                release = (target, number, iso(now()))
                self._releases[key] = release
            _, number, created_at = release
            concurrency = self._config.concurrency
        account = {"type": "organization", "username": owner, "name": owner, "github_url": None}
        doc = {
            "owner": owner,
            "name": name,
            "current_release": {
                "number": number,
                "model": model.ref,
                "version": model.version_id,
                "created_at": created_at,
                "created_by": account,
                "configuration": {
                    "hardware": "cpu",
                    "min_instances": 0,
                    "max_instances": max(1, concurrency),
                },
            },
        }
        return model, doc

    # ----------------------------------------------------------------------------- lifecycle

    def _dispatch(self) -> None:
        """Give free hardware slots to queued predictions, oldest first. Lock held."""
        while self._queue and self._running < self._config.concurrency and not self._stopped:
            pred = self._queue.popleft()
            if pred.status == "starting":  # canceled ones stay in the deque until popped here
                self._start(pred)

    def _set_status(self, pred: Prediction, status: str) -> None:
        self._status_counts[pred.status] -= 1
        self._status_counts[status] += 1
        pred.status = status

    def _start(self, pred: Prediction) -> None:
        cfg = self._config
        self._set_status(pred, "processing")
        pred.started_at = now()
        pred.started_mono = time.monotonic()
        pred.paid = True
        self._running += 1
        self._max_running = max(self._max_running, self._running)
        self._counters["paid_predictions"] += 1
        self._append_log(pred, f"Using seed: {pred.seed}")
        pred.preview = pred.model.preview(pred.inputs, pred.seed)
        jitter = 1.0 + cfg.latency_jitter * (2 * self._rngs["latency"].random() - 1)
        run_time = cfg.latency_s * jitter
        if "slow" in pred.faults:
            run_time *= cfg.faults.slow_factor
        self._event(pred, "start")
        for step in (1, 2):
            pred.timers.append(
                self.scheduler.call_later(
                    run_time * step / 3, functools.partial(self._progress, pred, step)
                )
            )
        if "stuck" not in pred.faults:
            pred.timers.append(self.scheduler.call_later(run_time, lambda: self._run_model(pred)))

    def _progress(self, pred: Prediction, step: int) -> None:
        with self._lock:
            if pred.status != "processing":
                return
            self._append_log(pred, f"{step * 33:3d}%|{'#' * step * 3:<9}| {step}/3")
            self._event(pred, "logs")
            if pred.preview:
                shown = pred.preview[: len(pred.preview) * step // 3]
                if shown and shown != pred.output:
                    pred.output = shown
                    self._event(pred, "output")

    def _run_model(self, pred: Prediction) -> None:
        # On the scheduler thread: hand the work to the pool so other timers stay punctual.
        with contextlib.suppress(RuntimeError):  # RuntimeError: the pool is shut down
            self._render_pool.submit(self._complete, pred)

    def _complete(self, pred: Prediction) -> None:
        with self._lock:
            if pred.status != "processing":
                return
            failing = "fail" in pred.faults
        result = None
        error = None
        if failing:
            trigger = FAIL_TRIGGER in str(pred.inputs.get("prompt", ""))
            error = (
                f"Prediction failed: the prompt asked for it with {FAIL_TRIGGER}"
                if trigger
                else "Prediction failed: CUDA out of memory (emulated model failure)"
            )
        else:
            try:
                result = pred.model.run(pred.inputs, pred.seed)
            except Exception as exc:  # a model bug surfaces as a failed prediction, like Cog
                log.exception("emulated model %s crashed", pred.model.ref)
                error = f"Prediction failed: {type(exc).__name__}: {exc}"
        with self._lock:
            if pred.status != "processing":  # canceled while the model ran
                return
            if result is None:
                pred.error = error
                self._append_log(pred, f"Traceback (most recent call last):\n{error}")
                self._finish(pred, "failed")
                return
            self._append_log(pred, f"100%|{'#' * 9}| 3/3")
            output: Any
            if result.raw_output:
                output = result.output
            elif result.files:
                pred.files = dict(enumerate(result.files))
                output = [
                    f.url or f"{self.base_url}/files/{pred.id}/{i}.{f.ext}"
                    for i, f in pred.files.items()
                ]
            else:
                output = list(result.chunks or [])
            pred.completed_output = copy.deepcopy(output)
            if output != pred.output:
                pred.output = output
                self._event(pred, "output")
            pred.metrics.update(result.metrics)
            self._finish(pred, "succeeded")
            if "remove_output" in pred.faults or result.remove_outputs:
                # Gone right after success: whoever did not download at once finds nothing.
                self.scheduler.call_later(0, lambda: self._expire(pred, force=True))

    def _finish(self, pred: Prediction, status: str) -> None:
        """The one terminal transition: frees the slot, stamps metrics, notifies. Lock held."""
        was_running = pred.status == "processing"
        self._set_status(pred, status)
        pred.completed_at = now()
        pred.completed_mono = time.monotonic()
        for timer in pred.timers:
            timer.cancel()
        pred.timers.clear()
        if was_running:
            self._running -= 1
        if pred.started_mono is not None:
            # A test model may report a time of its own (see ``test/bad-output``).
            pred.metrics.setdefault(
                "predict_time", round(pred.completed_mono - pred.started_mono, 6)
            )
        pred.metrics["total_time"] = round(pred.completed_mono - pred.created_mono, 6)
        if status != "succeeded":
            pred.preview = None
        pred.done.set()
        self._event(pred, "completed")
        self._schedule_expiry(pred)
        self._dispatch()

    def _deadline(self, pred: Prediction) -> None:
        with self._lock:
            if pred.status in TERMINAL:
                return
            pred.canceled_by = "deadline"
            self._counters["deadline_canceled"] += 1
            self._append_log(
                pred, f"Prediction canceled: ran past Cancel-After {pred.deadline_s}s."
            )
            self._finish(pred, "canceled")

    def _schedule_expiry(self, pred: Prediction) -> None:
        assert pred.completed_mono is not None
        delay = pred.completed_mono + self._config.retention_s - time.monotonic()
        self.scheduler.call_later(delay, lambda: self._expire(pred))

    def _expire(self, pred: Prediction, *, force: bool = False) -> None:
        with self._lock:
            if pred.data_removed or pred.completed_mono is None:
                return
            due = pred.completed_mono + self._config.retention_s
            if not force and time.monotonic() < due - 0.001:
                return  # retention was raised since this timer was set; a newer one exists
            self._remove_outputs(pred)

    def _remove_outputs(self, pred: Prediction) -> None:
        pred.output = None
        pred.files = {}
        pred.data_removed = True
        self._counters["outputs_removed"] += 1

    def _append_log(self, pred: Prediction, line: str) -> None:
        pred.logs = f"{pred.logs}{line}\n"

    def _event(self, pred: Prediction, event: str) -> None:
        """Send a webhook for ``event`` if the prediction asked for it. Lock held."""
        if not pred.webhook or event not in pred.webhook_events:
            return
        body = json.dumps(self.to_json(pred), separators=(",", ":")).encode()
        self.webhooks.submit(pred.webhook, event, pred.id, body)

    def stop(self) -> None:
        """Stop timers, workers and wake anyone waiting on a prediction."""
        with self._lock:
            self._stopped = True
            waiting = list(self._order)
        self.scheduler.stop()
        self.webhooks.stop()
        self._render_pool.shutdown(wait=False, cancel_futures=True)
        for pred in waiting:
            pred.done.set()


def model_for(ref: str) -> DemoModel:
    """The model called ``owner/name``, or a 404 problem."""
    model = MODELS.get(ref)
    if model is None:
        raise not_found(f"Model {ref} does not exist.")
    return model
