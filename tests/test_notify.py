"""Run notifications: one Slack-compatible message per failed or degraded run."""

from __future__ import annotations

import pytest

from drivers.ops import notify
from webhook import webhook

REPORT = "gs://collector-work/reports/r1/report.json"


@pytest.mark.parametrize("status", ["success", "unchanged"])
def test_a_clean_run_sends_nothing(status):
    verdict = {"status": status, "reasons": [], "warnings": [], "report": REPORT}
    assert notify.run_message("upstream_drivers", "r1", verdict, None) is None


def test_failed_and_degraded_runs_say_why_with_links():
    failed = {"status": "failed", "reasons": ["3 compile failure(s) > max_failures=0"],
              "warnings": [], "report": REPORT}  # fmt: skip
    text = notify.run_message("upstream_drivers", "r1", failed, "http://af/dags/x/runs/r1")["text"]
    assert "*FAILED*" in text and "3 compile failure(s)" in text
    assert "<http://af/dags/x/runs/r1|the run in Airflow>" in text and REPORT in text
    degraded = {"status": "success", "reasons": [], "report": REPORT,
                "warnings": ["2 failure(s) tolerated (max_failures=5)"]}  # fmt: skip
    assert "*DEGRADED*" in notify.run_message("cpaas_drivers", "r2", degraded, None)["text"]


def test_the_payload_reaches_the_webhook_and_a_refusal_is_an_error():
    payload = {"text": "hello"}
    with webhook() as (url, received):
        notify.post(url, payload)
    assert received == [payload]
    with webhook(status=500) as (url, _), pytest.raises(notify.NotifyError, match="HTTP 500"):
        notify.post(url, payload)
