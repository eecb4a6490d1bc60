"""``ai-handler demo --json``: the demo is an application of the HTTP API.

It runs as a user runs it (the command, on the embedded stack of its state folder), with the
recording proxy (``proxy.py``) slipped between it and the API, cutting three of its event
streams after one event, and keep-alive comments every second. Proves: every grant, submit and
read went through the API with the stack's key; every generation was followed through its
stream, each state once and in order (no keep-alive taken for an event), across the cuts (each
resumed with the ``Last-Event-ID`` of the last event received); the JSON result and the summary
say what happened, and what the app database holds afterwards agrees with them; the key is
revoked when the demo ends.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from ai_handler_dagster import cli, demo
from ai_handler_dagster.api import keys
from ai_handler_dagster.db.engine import make_engine, session_scope
from ai_handler_dagster.db.models import Generation
from tests.examples.proxy import RecordingProxy

pytestmark = pytest.mark.e2e

DROPS = 3
#: demo/pixel-sketch is 5 credits an image: 1 + 1 + 2 + 1 images succeed.
PIXEL_CHARGED = 25


def test_the_demo_drives_the_api_and_follows_every_stream(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("AI_HANDLER_STATE_DIR", str(tmp_path))
    # Keep-alive comments every second, so the streams carry some between their events.
    monkeypatch.setenv("AI_HANDLER_API_EVENTS_PING_S", "1")
    drive = demo._drive
    proxies: list[RecordingProxy] = []
    seen: list[demo._Seen] = []

    async def through_a_proxy(api_url: str, *args: Any, **kwargs: Any) -> demo._Seen:
        with RecordingProxy(api_url, drop_streams=DROPS).running() as proxy:
            proxies.append(proxy)
            seen.append(await drive(proxy.url, *args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(demo, "_drive", through_a_proxy)
    code = cli.main(["demo", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    result = json.loads(out)
    assert result.pop("wall_s") > 0
    charged = result.pop("credits_charged")
    assert result == {
        "submitted": 8,
        "succeeded": 6,
        "failed": 2,
        "refunded": 2,
        "credits_before": 500,
        "credits_after": 500 - charged,
        "ledger_violations": 0,
        "s3_objects": 7,
        "s3_checksum_errors": 0,
        "ok": True,
        "problems": [],
    }
    # Two haiku succeed too, each charged for its tokens (at most its hold of 60).
    assert PIXEL_CHARGED + 2 <= charged <= PIXEL_CHARGED + 2 * 60

    # Through the API only, with the stack's key, which the summary printed.
    [proxy], [followed] = proxies, seen
    [key] = re.findall(r"API key \(admin\) +(aih_\S+)", err)
    parsed = keys.parse(key)
    assert parsed is not None
    key_id = parsed[0]
    assert proxy.seen and all(s.authorization == f"Bearer {key}" for s in proxy.seen)
    [user] = {m for s in proxy.seen for m in re.findall(r"^/v1/users/([^/]+)/", s.path)}
    assert [(s.method, s.path) for s in proxy.seen[:9]] == [
        ("POST", f"/v1/users/{user}/grants"),
        *[("POST", "/v1/generations")] * 8,
    ]

    # Every stream told its generation's whole story, once, although three were cut.
    ids = [g.id for g in followed.followed]
    expected = [status for _, _, status in demo.DEMO_REQUESTS]
    assert [g.status for g in followed.followed] == expected
    assert [g.states for g in followed.followed] == [
        ["pending", "queued", "running", status] for status in expected
    ]
    streams = [s for s in proxy.seen if re.fullmatch(r"/v1/generations/\d+/events", s.path)]
    dropped = [s for s in streams if s.dropped]
    assert len(dropped) == DROPS and all(len(s.event_ids) == 1 for s in dropped)
    for cut in dropped:
        later = [s for s in streams[streams.index(cut) + 1 :] if s.path == cut.path]
        assert later and later[0].last_event_id == cut.event_ids[-1]
    delivered: dict[str, list[str]] = {}
    for stream in streams:
        delivered.setdefault(stream.path, []).extend(stream.event_ids)
    assert [len(delivered[f"/v1/generations/{i}/events"]) for i in ids] == [4] * 8
    assert all(len(set(events)) == 4 for events in delivered.values())
    assert not [s for s in streams if s.status != 200]
    assert sum(s.comments for s in streams) > 0

    # The summary, and the app database afterwards, say the same.
    assert f"Submitted 8 generations for {user} through the API" in err
    assert "All as expected" in err
    engine = make_engine(f"sqlite:///{tmp_path / 'demo' / 'app.db'}")
    try:
        with session_scope(engine) as session:
            rows = list(session.scalars(sa.select(Generation).where(Generation.user_id == user)))
            revoked = session.scalar(
                sa.text("SELECT revoked_at FROM api_keys WHERE key_id = :k"),
                {"k": key_id},
            )
    finally:
        engine.dispose()
    assert sorted(row.id for row in rows) == ids
    assert sum(row.amount_charged for row in rows) == charged
    assert sorted(str(row.request_id) for row in rows) == sorted(
        f"key:{key_id}:demo:{user}:{index}" for index in range(8)
    )
    for row in rows:
        status = next(g.status for g in followed.followed if g.id == row.id)
        assert row.status == status
        assert re.search(rf"^  {row.id} +{re.escape(row.model)} +{row.status} ", err, re.M)
    assert revoked is not None
