"""Job-end notifications: an outbox row is written with the job's final status (same
transaction), and the API's sweeper POSTs it, signed, retrying with backoff. Every attempt is
recorded in the job's event log."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from datetime import timedelta

import httpx
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.db import session_scope
from app.models import DeliveryStatus, Job, Notification, utcnow
from app.settings import get_settings

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Finetune-Signature"
# A delivery attempt is claimed for this long, so that two sweepers never send the same one.
CLAIM_S = 60.0


def sign(body: bytes, secret: str) -> str:
    """The header value a receiver recomputes: `sha256=<hex HMAC-SHA256 of the raw body>`."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def queue_notification(session: Session, job_id: str, status: str, message: str) -> None:
    """Called with every final status change; adds an outbox row if the job asked for one."""
    job = session.get(Job, job_id, populate_existing=True)  # the values just written
    url = job.spec.get("notify_url") if job is not None else None
    if not url:
        return
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
    from app.services.events import add_event

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
            claimed = session.execute(
                update(Notification)
                .where(Notification.id == notification_id, Notification.next_attempt_at == seen_next)
                .values(next_attempt_at=now + timedelta(seconds=CLAIM_S), attempts=Notification.attempts + 1)
            ).rowcount
            if not claimed:
                continue  # another sweeper has it
            notification = session.get(Notification, notification_id)
            url, payload, attempt = notification.url, notification.payload, notification.attempts
            job_id = notification.job_id
        attempted += 1
        body = json.dumps({**payload, "attempt": attempt}, separators=(",", ":")).encode()
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: sign(body, settings.notify_secret),
            "User-Agent": "finetune-service",
        }
        try:
            response = httpx.post(url, content=body, headers=headers, timeout=10)
            ok, outcome = response.is_success, f"HTTP {response.status_code}"
        except httpx.HTTPError as exc:
            ok, outcome = False, f"{type(exc).__name__}: {exc}"
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
