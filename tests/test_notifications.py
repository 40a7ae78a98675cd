"""Job-end notifications go to public addresses only (checked at submission and again on the
connection each delivery makes), follow no redirect, and are signed the Standard Webhooks way.
Every request in these tests goes to loopback: "public" names are resolved by a stub."""

from __future__ import annotations

import base64
import json
import socket
from collections.abc import Iterator

import pytest
from standardwebhooks import Webhook

from app.services import outbound
from app.services.notifications import deliver_due
from tests.conftest import bearer, reset_caches
from tests.servers import WebhookReceiver as Receiver
from tests.test_datasets import queued_messages

SECRET = "whsec_" + base64.b64encode(b"a-secret-for-the-notification-test").decode()
PUBLIC_IP = "93.184.215.14"  # what the stub resolver answers for PUBLIC_NAME at submission
PUBLIC_NAME = "hooks.example.com"


@pytest.fixture
def receivers() -> Iterator[list[Receiver]]:
    made: list[Receiver] = []
    yield made
    for receiver in made:
        receiver.close()


@pytest.fixture
def notifying(service_env, monkeypatch) -> Iterator[None]:
    monkeypatch.setenv("FINETUNE_NOTIFY_SECRET", SECRET)
    reset_caches()
    yield
    reset_caches()


@pytest.fixture
def api(notifying):
    from fastapi.testclient import TestClient

    from app.api.main import create_app

    with TestClient(create_app(), headers=bearer()) as test_client:
        yield test_client


def resolve_as(monkeypatch, mapping: dict[str, str]) -> None:
    """Answer getaddrinfo for the names in `mapping` with the given address (no DNS query)."""
    real = socket.getaddrinfo

    def getaddrinfo(host, port, *args, **kwargs):
        if host in mapping:
            return real(mapping[host], port, *args, **kwargs)
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(outbound.socket, "getaddrinfo", getaddrinfo)


def finished_job_notifying(api, url: str) -> str:
    """A job with `notify_url`, cancelled while queued: its notification is due at once."""
    response = api.post("/jobs", json={"notify_url": url})
    assert response.status_code == 201, response.text
    job_id = response.json()["id"]
    assert api.post(f"/jobs/{job_id}/cancel").status_code == 202
    return job_id


def delivery_events(api, job_id: str) -> list[str]:
    events = api.get(f"/jobs/{job_id}/events").json()["items"]
    return [e["message"] for e in events if e["message"].startswith("notification")]


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:6379/",  # the service's own Redis
        "http://localhost:8000/jobs",
        "http://[::1]/",
        "http://0.0.0.0/",
        "http://2130706433/",  # 127.0.0.1 in decimal
        "http://0x7f000001/",
        "http://169.254.169.254/latest/meta-data/",  # a cloud's metadata service
        "http://10.1.2.3/",
        "http://192.168.0.10/",
        "http://[::ffff:127.0.0.1]/",
        "http://[fd00::1]/",
        "http://no-such-host.invalid/",
    ],
)
def test_a_notify_url_to_the_servers_own_network_is_refused_at_submission(api, service_env, url):
    """Finding 2: these were accepted and contacted; each outcome landed in the event log."""
    response = api.post("/jobs", json={"notify_url": url})

    assert response.status_code == 422, response.text
    assert [d["field"] for d in response.json()["detail"]] == ["notify_url"]
    assert api.get("/jobs").json()["items"] == [] and queued_messages(service_env) == 0


def test_a_name_that_rebinds_to_loopback_after_submission_is_not_contacted(api, receivers, monkeypatch):
    receiver = Receiver()
    receivers.append(receiver)
    resolve_as(monkeypatch, {PUBLIC_NAME: PUBLIC_IP})
    job_id = finished_job_notifying(api, f"http://{PUBLIC_NAME}:{receiver.port}/hook")

    resolve_as(monkeypatch, {PUBLIC_NAME: "127.0.0.1"})  # the DNS answer changes (rebinding)
    assert deliver_due() == 1

    assert receiver.requests == []
    [event] = delivery_events(api, job_id)
    assert "attempt 1: refused" in event and "resolves to a loopback" in event


def test_redirects_are_not_followed(api, receivers, monkeypatch):
    monkeypatch.setenv("FINETUNE_NOTIFY_ALLOW_PRIVATE", "true")
    reset_caches()
    target = Receiver()
    redirecting = Receiver(statuses=(307,), location=target.url)
    receivers.extend([target, redirecting])
    job_id = finished_job_notifying(api, redirecting.url)

    assert deliver_due() == 1

    assert len(redirecting.requests) == 1 and target.requests == []
    assert "HTTP 307 (redirects are not followed)" in delivery_events(api, job_id)[0]


def test_an_operator_may_allow_private_receivers_and_they_get_standard_webhooks(api, receivers, monkeypatch):
    """Finding 12: the signature covered the body only, so a captured notification could be
    replayed; now the id and timestamp are signed too."""
    monkeypatch.setenv("FINETUNE_NOTIFY_ALLOW_PRIVATE", "true")
    reset_caches()
    receiver = Receiver()
    receivers.append(receiver)
    job_id = finished_job_notifying(api, receiver.url)

    assert deliver_due() == 1

    [(headers, body)] = receiver.requests
    payload = Webhook(SECRET).verify(body, headers)
    assert (payload["job_id"], payload["status"]) == (job_id, "cancelled")
    assert headers["webhook-id"].startswith(f"msg_{job_id}_")
    assert "X-Finetune-Signature" not in headers
    assert json.loads(body)["attempt"] == 1
    assert "delivered" in delivery_events(api, job_id)[0]


def test_embedded_and_reserved_addresses_are_not_public():
    import ipaddress

    for text in ("::ffff:10.0.0.1", "2002:7f00:1::", "100.64.0.1", "224.0.0.1", "fe80::1", "198.18.0.1"):
        assert not outbound.is_public(ipaddress.ip_address(text)), text
    for text in (PUBLIC_IP, "2606:2800:21f:cb07:6820:80da:af6b:8b2c", "::ffff:93.184.215.14"):
        assert outbound.is_public(ipaddress.ip_address(text)), text
