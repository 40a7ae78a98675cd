"""`ServiceClient.follow`, what `finetune logs --follow` reads: the live metric stream over a
fake transport that sends the wire format the API sends (app/api/logs.py), drops the
connection, or answers with something that is no event stream."""

from __future__ import annotations

import json

import httpx
import pytest

from app.client.http import RequestFailed, ServiceClient


def row(step: int, **fields: object) -> str:
    return json.dumps({"step": step, "loss": 2.0, "eval_loss": None, **fields})


def client_over(handler) -> ServiceClient:
    client = ServiceClient("http://service.test")
    client.http.close()
    client.http = httpx.Client(base_url="http://service.test", transport=httpx.MockTransport(handler))
    return client


def sse(*events: str) -> httpx.Response:
    body = "".join(": ping\r\n\r\n" + event for event in events)  # a ping before each event
    return httpx.Response(200, headers={"content-type": "text/event-stream; charset=utf-8"}, text=body)


def test_follow_reopens_a_dropped_stream_after_the_last_step_and_stops_at_the_end():
    asked = []

    def handler(request: httpx.Request) -> httpx.Response:
        asked.append(request.url.params["after_step"])
        if len(asked) == 1:  # two rows, then the connection closes with no `end`
            return sse(
                f"id: 1\r\nevent: metric\r\ndata: {row(1)}\r\n\r\n",
                f"id: 2\r\nevent: metric\r\ndata: {row(2)}\r\n\r\n",
            )
        return sse(
            f"event: eval\r\ndata: {row(2, eval_loss=1.5)}\r\n\r\n",
            f"id: 3\r\nevent: metric\r\ndata: {row(3)}\r\n\r\n",
            f"event: end\r\ndata: {json.dumps({'status': 'succeeded', 'error': None})}\r\n\r\n",
        )

    with client_over(handler) as client:
        events = [(e.event, e.id, e.data.get("step"), e.data.get("eval_loss")) for e in client.follow("job")]

    assert asked == ["-1", "2"]
    assert events == [
        ("metric", "1", 1, None),
        ("metric", "2", 2, None),
        ("eval", None, 2, 1.5),  # the first event of its connection: no id yet
        ("metric", "3", 3, None),
        ("end", "3", None, None),  # (an event with no `id:` line keeps the last id)
    ]


def test_follow_fails_at_once_on_an_answer_that_is_no_event_stream():
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "text/html"}, text="<html>a proxy</html>")

    with client_over(handler) as client, pytest.raises(RequestFailed, match="text/event-stream") as failed:
        list(client.follow("job", retry_for_s=0))
    assert failed.value.status == 200


def test_follow_passes_on_a_client_error():
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(404, json={"error": "job_not_found", "detail": "no such job"})

    with client_over(handler) as client, pytest.raises(RequestFailed, match="404 job_not_found"):
        list(client.follow("job"))
