"""Job-end notifications: an outbox row is written with the job's final status (same
transaction), and the API's sweeper POSTs it, signed the Standard Webhooks way (id, timestamp,
signature: receivers can reject replays), to public addresses only (`outbound`), retrying with
backoff. Every attempt is recorded in the job's event log."""

from __future__ import annotations

import json
import logging
from datetime import datetime, timedelta

import httpcore
from sqlalchemy import select, update
from sqlalchemy.orm import Session
from standardwebhooks import Webhook

from app.db import changed_rows, session_scope
from app.models import DeliveryStatus, Job, Notification, utcnow
from app.services import outbound
from app.services.events import add_event
from app.settings import get_settings
from app.spec import stored_spec

log = logging.getLogger(__name__)

# A delivery attempt is claimed for this long, so that two sweepers never send the same one.
CLAIM_S = 60.0
TIMEOUT_S = 10.0


def signer(secret: str) -> Webhook:
    """A Standard Webhooks secret (`whsec_<base64>`) as such; any other text as its UTF-8 bytes
    (a receiver then verifies with `Webhook(secret.encode())`)."""
    return Webhook(secret if secret.startswith("whsec_") else secret.encode())


def signed_headers(message_id: str, body: bytes, secret: str, now: datetime) -> dict[str, str]:
    """`webhook-id` (the same on every attempt of one notification), `webhook-timestamp` (this
    attempt's, seconds) and `webhook-signature` (`v1,<base64 HMAC-SHA256 of id.timestamp.body>`)."""
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": signer(secret).sign(message_id, now, body.decode()),
    }


def queue_notification(session: Session, job_id: str, status: str, message: str) -> None:
    """Called with every final status change; adds an outbox row if the job asked for one."""
    job = session.get(Job, job_id, populate_existing=True)  # the values just written
    if job is None or (notify_url := stored_spec(job.spec).notify_url) is None:
        return
    url = str(notify_url)
    payload = {
        "event": "job.finished",
        "job_id": job_id,
        "status": status,
        "message": message,
        "error": job.error,
        "current_step": job.current_step,
        "total_steps": job.total_steps,
        "adapter_sha256": job.adapter_sha256,
        "finished_at": (job.finished_at or utcnow()).isoformat(),
    }
    session.add(Notification(job_id=job_id, url=url, payload=payload))


def deliver_due() -> int:
    """Send every notification that is due; returns how many were attempted."""
    settings = get_settings()
    now = utcnow()
    with session_scope() as session:
        due = session.execute(
            select(Notification.id, Notification.next_attempt_at).where(
                Notification.status == DeliveryStatus.PENDING, Notification.next_attempt_at <= now
            )
        ).all()
    attempted = 0
    for notification_id, seen_next in due:
        with session_scope() as session:
            claimed = changed_rows(
                session,
                update(Notification)
                .where(Notification.id == notification_id, Notification.next_attempt_at == seen_next)
                .values(next_attempt_at=now + timedelta(seconds=CLAIM_S), attempts=Notification.attempts + 1),
            )
            if not claimed:
                continue  # another sweeper has it
            notification = session.get(Notification, notification_id)
            assert notification is not None  # claimed just now, in this transaction
            url, payload, attempt = notification.url, notification.payload, notification.attempts
            job_id = notification.job_id
        attempted += 1
        body = json.dumps({**payload, "attempt": attempt}, separators=(",", ":")).encode()
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "finetune-service",
            **signed_headers(f"msg_{job_id}_{notification_id}", body, settings.notify_secret, utcnow()),
        }
        try:
            status_code = outbound.post(url, body, headers, TIMEOUT_S)
            ok, outcome = 200 <= status_code < 300, f"HTTP {status_code}"
            if 300 <= status_code < 400:
                outcome += " (redirects are not followed)"
        except outbound.OutboundRefused as exc:
            ok, outcome = False, f"refused: {exc}"
        except httpcore.TimeoutException:
            ok, outcome = False, "no answer in time"
        except httpcore.NetworkError:
            ok, outcome = False, "could not connect"
        except httpcore.ProtocolError:
            ok, outcome = False, "not an HTTP answer"
        with session_scope() as session:
            if ok:
                status, next_at, note = DeliveryStatus.DELIVERED, now, "delivered"
            elif attempt >= settings.notify_max_attempts:
                status, next_at, note = DeliveryStatus.FAILED, now, "giving up"
            else:
                delay = settings.notify_retry_s * 2 ** (attempt - 1)
                status, next_at = DeliveryStatus.PENDING, utcnow() + timedelta(seconds=delay)
                note = f"next try in {delay:g} s"
            session.execute(
                update(Notification)
                .where(Notification.id == notification_id)
                .values(status=status, next_attempt_at=next_at)
            )
            add_event(
                session,
                job_id,
                f"notification to {url}, attempt {attempt}: {outcome}; {note}",
                data={"notification": notification_id, "attempt": attempt, "delivered": ok},
            )
        if not ok:
            log.warning("job %s: notification attempt %d to %s failed: %s", job_id, attempt, url, outcome)
    return attempted
