"""One message per failed or degraded run, to a webhook (Slack-compatible payload).

A run is *degraded* when it succeeded with failures it tolerated (compile failures or
drivers their kernel refused, within ``max_failures``) or published drivers its kernel
refused because ``vm_tests=warn``. Clean runs send nothing: nobody reads a message a
night. The webhook is an Airflow connection (:func:`drivers.airflow.glue.notify_run`).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from drivers.domain.errors import DriversError

_OPENER = urllib.request.build_opener()


class NotifyError(DriversError):
    pass


def run_message(dag_id: str, run_id: str, verdict: dict[str, Any], run_url: str | None):
    """The payload for a run's verdict (``pipeline.report``), or None for a clean run."""
    warnings = verdict.get("warnings") or []
    failed = verdict["status"] == "failed"
    if not failed and not warnings:  # success, or cpaas "unchanged"
        return None
    state = "FAILED" if failed else "DEGRADED"
    lines = [f"*{dag_id}* run `{run_id}`: *{state}*"]
    lines += [f"• {reason}" for reason in verdict.get("reasons", [])]
    lines += [f"• {warning}" for warning in warnings]
    links = [f"<{run_url}|the run in Airflow>"] if run_url else []
    lines.append(" · ".join([*links, f"report: {verdict['report']}"]))
    return {"text": "\n".join(lines), "username": "collector-drivers"}


def post(url: str, payload: dict[str, Any], timeout: float = 10.0) -> None:
    """POST the payload as JSON; raise NotifyError saying what the webhook answered."""
    request = urllib.request.Request(
        url, json.dumps(payload).encode(), {"Content-Type": "application/json"}, method="POST"
    )
    try:
        _OPENER.open(request, timeout=timeout).close()
    except urllib.error.HTTPError as e:
        raise NotifyError(f"webhook {url.split('?')[0]} answered HTTP {e.code}") from None
    except OSError as e:
        raise NotifyError(f"webhook {url.split('?')[0]} unreachable: {e}") from None
