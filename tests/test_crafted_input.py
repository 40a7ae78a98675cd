"""Crafted input that was a 500 or reached the server's own network (issue 27, items 2 and 3):
page cursors the API never handed out, upload names longer than a file system allows, and
IPv6 spellings of private IPv4 addresses as a `notify_url`. No request leaves loopback: the
public-address verdicts are `url_problem`'s, which only parses a literal address."""

from __future__ import annotations

import base64
import re

import pytest

from app.services import outbound
from app.services.dataset_files import dataset_file
from tests.conftest import bearer, reset_caches
from tests.test_datasets import CHAT, jsonl
from tests.test_notifications import resolve_as


def cursor(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode()


JOB_ID = "job_" + "0" * 24
BAD_CURSORS = {
    "naive time": cursor("2024-01-01T00:00:00|x"),  # MjAyNC0wMS0wMVQwMDowMDowMHx4
    "naive time, well-formed id": cursor(f"2024-01-01T00:00:00|{JOB_ID}"),
    "NUL in the id": cursor(f"2024-01-01T00:00:00+00:00|{JOB_ID}\x00"),
    "id of another shape": cursor("2024-01-01T00:00:00+00:00|x"),
    "id longer than the column": cursor("2024-01-01T00:00:00+00:00|job_" + "0" * 400),
    "not base64": "%%%not-base64!",
}


@pytest.mark.parametrize("route", ["/jobs", "/datasets"])
@pytest.mark.parametrize("crafted", BAD_CURSORS.values(), ids=BAD_CURSORS.keys())
def test_a_cursor_the_api_did_not_hand_out_is_refused_naming_the_cursor(client, route, crafted):
    response = client.get(route, params={"cursor": crafted})

    assert response.status_code == 422, response.text
    assert response.json()["error"] == "invalid_cursor" and "cursor" in response.json()["detail"]


@pytest.mark.parametrize("route", ["/jobs", "/datasets"])
@pytest.mark.parametrize("time", ["0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59.999999-14:00"])
def test_a_well_formed_cursor_at_the_ends_of_time_is_an_empty_page(client, route, time):
    row_id = JOB_ID if route == "/jobs" else "ds_" + "0" * 24
    response = client.get(route, params={"cursor": cursor(f"{time}|{row_id}")})

    assert response.status_code == 200 and response.json()["items"] == [], response.text


def test_a_cursor_the_api_handed_out_pages_on(client):
    for _ in range(3):
        assert client.post("/datasets", files={"file": ("a.jsonl", jsonl(CHAT))}).status_code == 201

    first = client.get("/datasets", params={"limit": 2}).json()
    rest = client.get("/datasets", params={"limit": 2, "cursor": first["next"]}).json()

    assert len(first["items"]) == 2 and len(rest["items"]) == 1 and rest["next"] is None


@pytest.mark.parametrize("route", ["/v1/files", "/v1/fine_tuning/jobs"])
@pytest.mark.parametrize("after", ["ds_\x00", f"{JOB_ID}\x00", "x" * 300, "../etc", JOB_ID[:-1]])
def test_an_openai_after_of_the_wrong_shape_is_a_400_naming_after(client, route, after):
    """Checked for shape before any query (a guard: these were already refused)."""
    response = client.get(route, params={"after": after})

    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "after"


LONG_NAME = "é" * 130 + ".jsonl"  # 266 bytes in UTF-8: over the 255 a file name may have


@pytest.mark.parametrize("route", ["/datasets", "/v1/files"])
def test_an_upload_named_past_the_file_systems_limit_is_stored_under_a_shortened_name(client, route):
    content = jsonl(CHAT)

    response = client.post(route, files={"file": (LONG_NAME, content)}, data={"purpose": "fine-tune"})

    assert response.status_code == (201 if route == "/datasets" else 200), response.text
    dataset = client.get(f"/datasets/{response.json()['id']}").json()
    name = dataset["filename"]
    assert name.endswith(".jsonl") and set(name.removesuffix(".jsonl")) == {"é"}
    assert len(f".{name}.part".encode()) < 255 and len(name) < len(LONG_NAME)
    assert dataset["status"] == "ready" and dataset["report"]["records"] == len(CHAT)
    assert dataset_file(dataset["id"]).read_bytes() == content  # what a worker trains on
    assert client.get(f"/datasets/{dataset['id']}/content").content == content


STORABLE_ODD_NAMES = ["a\x00b.jsonl", "../../etc/x.jsonl", "/abs/y.jsonl", "a\\..\\b.jsonl"]
UNUSABLE_NAMES = ["..jsonl", "....", "..", "/", " ", ".jsonl"]


@pytest.mark.parametrize("sent", STORABLE_ODD_NAMES + UNUSABLE_NAMES)
def test_odd_upload_names_are_stored_as_one_plain_component_or_refused(client, sent):
    """A guard (none of these was a 500): the last path component, word characters only."""
    response = client.post("/datasets", files={"file": (sent, jsonl(CHAT))})

    if sent in UNUSABLE_NAMES:
        assert response.status_code == 422 and response.json()["detail"][0]["field"] == "file", response.text
    else:
        assert response.status_code == 201, response.text
        assert re.fullmatch(r"[\w-][\w.-]*\.jsonl", response.json()["filename"])  # not hidden, no "/"


# IPv6 forms that carry a private IPv4 address (issue 27 item 2), each accepted before.
EMBEDDING_PRIVATE = [
    "::127.0.0.1",  # IPv4-compatible
    "::a9fe:a9fe",  # IPv4-compatible 169.254.169.254, the metadata service
    "::a00:1",  # IPv4-compatible 10.0.0.1
    "::ffff:127.0.0.1",  # IPv4-mapped
    "64:ff9b::7f00:1",  # NAT64 well-known prefix
    "64:ff9b::a9fe:a9fe",
    "64:ff9b::a00:1",
    "64:ff9b:1::a00:1",  # NAT64 local-use prefix
    "2002:7f00:1::",  # 6to4 of 127.0.0.1
    "2002:a9fe:a9fe::",  # 6to4 of 169.254.169.254
    "2001:0:4136:e378:8000:63bf:f5ff:fffe",  # Teredo, client 10.0.0.1
]


@pytest.mark.parametrize("address", EMBEDDING_PRIVATE)
def test_ipv6_forms_of_private_ipv4_addresses_are_refused(address):
    assert outbound.url_problem(f"http://[{address}]/hook") is not None


def test_a_name_resolving_to_an_ipv6_form_of_a_private_address_is_refused(monkeypatch):
    """Resolved addresses are judged like literal ones (and delivery connects only to those)."""
    resolve_as(monkeypatch, {"hooks.example.com": "64:ff9b::a9fe:a9fe"})

    assert "resolves to a loopback, private" in (outbound.url_problem("https://hooks.example.com/") or "")


@pytest.mark.parametrize("address", ["64:ff9b::808:808", "::ffff:8.8.8.8", "2002:808:808::", "::8.8.8.8"])
def test_ipv6_forms_of_public_ipv4_addresses_are_not_refused(address):
    assert outbound.url_problem(f"http://[{address}]/hook") is None  # only parsed, never contacted


@pytest.fixture
def notifying_api(service_env, monkeypatch):
    from fastapi.testclient import TestClient

    from app.api.main import create_app

    monkeypatch.setenv("FINETUNE_NOTIFY_SECRET", "whsec_" + base64.b64encode(b"crafted-input-test").decode())
    reset_caches()
    with TestClient(create_app(), headers=bearer()) as test_client:
        yield test_client
    reset_caches()


def test_a_notify_url_at_an_ipv6_form_of_a_private_address_is_a_422_naming_notify_url(notifying_api):
    for address in EMBEDDING_PRIVATE:
        response = notifying_api.post("/jobs", json={"notify_url": f"http://[{address}]/hook"})

        assert response.status_code == 422, (address, response.text)
        assert [d["field"] for d in response.json()["detail"]] == ["notify_url"], address
    assert notifying_api.get("/jobs").json()["items"] == []
