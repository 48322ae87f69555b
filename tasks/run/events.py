"""The `tokenmill.corpus.updated` event a data team emits when it publishes new data.

Any HTTP client can send it: POST a JSON list of events to `$PREFECT_API_URL/events`
(see deploy/README.md). The deployment `retrain-on-corpus-update` is triggered by it and
takes the corpus name from `event.payload.corpus`.
"""

from __future__ import annotations

import datetime
import uuid

from tokenmill.credentials import prefect_headers, redact, refusal
from tokenmill.errors import TokenmillError

CORPUS_UPDATED = "tokenmill.corpus.updated"


def corpus_updated(corpus: str, note: str = "") -> dict:
    """The event as Prefect's events API takes it."""
    return {
        "id": str(uuid.uuid4()),
        "occurred": datetime.datetime.now(datetime.UTC).isoformat(),
        "event": CORPUS_UPDATED,
        "resource": {"prefect.resource.id": f"tokenmill.corpus.{corpus}", "prefect.resource.name": corpus},
        "payload": {"corpus": corpus, "note": note},
    }


def emit(api_url: str | None, event: dict, timeout: float = 15.0) -> None:
    """POST one event to a Prefect server with the credentials Prefect's client would send
    (PREFECT_API_AUTH_STRING, or PREFECT_API_KEY for Prefect Cloud); a user error when there is
    no server or it refuses."""
    import httpx

    if not api_url:
        raise TokenmillError("no Prefect server to notify: set PREFECT_API_URL (e.g. http://127.0.0.1:4200/api)")
    url = f"{api_url.rstrip('/')}/events"
    try:
        response = httpx.post(url, json=[event], headers=prefect_headers(), timeout=timeout)
        response.raise_for_status()
    except httpx.HTTPStatusError as exc:
        raise (
            refusal(exc)
            or TokenmillError(
                f"the Prefect server at {redact(api_url)} refused the event "
                f"(HTTP {exc.response.status_code}): {exc.response.text[:200]}"
            )
        ) from None
    except httpx.HTTPError as exc:
        raise TokenmillError(
            f"cannot reach the Prefect server at {redact(api_url)} ({type(exc).__name__}); check PREFECT_API_URL"
        ) from None
