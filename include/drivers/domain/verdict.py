"""A run's verdict, judged the same way in every DAG.

Each step of a run returns a small summary (counts, and the name of the report document
it wrote). The DAG's last task, its *watcher* (trigger rule ``all_done``, as in Airflow's
own system tests), receives every step's summary and the tasks that failed; the flow
judges them into a :class:`Verdict`, writes ``report.json`` from
:meth:`Verdict.document`, and the watcher fails the run when the verdict is ``failed``
(:func:`drivers.airflow.glue.watch`), so a run is never green while something upstream
failed.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

SUCCESS, FAILED, UNCHANGED = "success", "failed", "unchanged"
Status = Literal["success", "failed", "unchanged"]


@dataclass(frozen=True)
class Verdict:
    """``failed`` when there is a reason; ``unchanged`` when there was nothing to do
    (a CPaaS image already taken); else ``success``, with warnings when degraded."""

    status: Status
    reasons: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()

    @classmethod
    def judge(
        cls,
        failed_tasks: Iterable[str],
        problems: Iterable[str],
        warnings: Iterable[str] = (),
        *,
        unchanged: bool = False,
    ) -> Verdict:
        """The verdict on a run whose ``failed_tasks`` failed and whose step summaries
        showed ``problems`` (each a reason to fail it) and ``warnings``."""
        failed = sorted(failed_tasks)
        reasons = [f"task(s) failed: {', '.join(failed)}"] if failed else []
        reasons += problems
        status: Status = FAILED if reasons else UNCHANGED if unchanged else SUCCESS
        return cls(status, tuple(reasons), tuple(warnings))

    @property
    def failed(self) -> bool:
        return self.status == FAILED

    def document(
        self, run_id: str, params: dict[str, Any], steps: dict[str, Any], **details: Any
    ) -> dict[str, Any]:
        """``report.json``: the same head in every DAG's report (the verdict, the run's
        parameters, every step's summary), then what the flow adds (``details``)."""
        return {
            "run_id": run_id,
            "status": self.status,
            "reasons": list(self.reasons),
            "warnings": list(self.warnings),
            "params": params,
            "steps": steps,
            **details,
            "finished": datetime.now(UTC).isoformat(),
        }

    def to_json(self, report: str) -> dict[str, Any]:
        """What the watcher returns (its XCom) and notifies with: the verdict and the URI
        of the report it is written in."""
        return {
            "status": self.status,
            "reasons": list(self.reasons),
            "warnings": list(self.warnings),
            "report": report,
        }
