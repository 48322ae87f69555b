"""The `tokenmill.corpus.updated` event a data team emits when it publishes new data.

Any HTTP client can send it: POST a JSON list of events to `$PREFECT_API_URL/events`
(see deploy/README.md). The deployment `retrain-on-corpus-update` is triggered by it and
takes the corpus name from `event.payload.corpus`.
"""

from __future__ import annotations

import datetime
import uuid

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


def emit(api_url: str | None, event: dict, api_key: str | None = None, timeout: float = 15.0) -> None:
    """POST one event to a Prefect server; a user error when there is none or it refuses."""
    import httpx

    if not api_url:
        raise TokenmillError("no Prefect server to notify: set PREFECT_API_URL (e.g. http://127.0.0.1:4200/api)")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.post(f"{api_url.rstrip('/')}/events", json=[event], headers=headers, timeout=timeout)
    except httpx.HTTPError as exc:
        raise TokenmillError(f"cannot reach the Prefect server at {api_url} ({exc}); check PREFECT_API_URL") from None
    if response.status_code >= 300:
        raise TokenmillError(
            f"the Prefect server refused the event (HTTP {response.status_code}): {response.text[:200]}"
        )
