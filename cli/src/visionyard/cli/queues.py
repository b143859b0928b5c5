"""`visionyard queue`: every queue's depth by project and priority, or where one job stands (GET /queues, GET job)."""

from __future__ import annotations

from typing import Any

from visionyard.cli.client import API_PREFIX, ApiClient

PRIORITY_ORDER = {"high": 100, "normal": 50, "low": 0}


def _priority_key(level: str) -> int:
    return PRIORITY_ORDER.get(level, int(level) if level.lstrip("-").isdigit() else 0)


def _quota(project: dict[str, Any]) -> str:
    parts = []
    if project.get("max_running_jobs") is not None:
        parts.append(f"{project['running']}/{project['max_running_jobs']} jobs")
    if project.get("max_gpus") is not None:
        parts.append(f"{project['gpus_in_use']}/{project['max_gpus']} GPUs")
    return ", ".join(parts) or "-"


def format_queues(summary: dict[str, Any]) -> str:
    """The `GET /queues` answer as a table: one row per queue, project and priority."""
    capacity = summary.get("capacity") or {}
    lines = []
    if summary.get("updated_at") is None:
        return "no scheduler has reported yet: is an API running?"
    state = "STALE: no scheduler has reported for a while" if summary.get("stale") else f"scheduler {summary.get('scheduler')}"
    lines.append(f"{state}; runners {capacity.get('runners', 0)}, slots {capacity.get('free_slots', 0)} free of "
                 f"{capacity.get('slots', 0)}, GPUs {capacity.get('free_gpus', 0)} free of {capacity.get('gpus', 0)}; "
                 f"{summary.get('admitted_per_second', 0):.1f} starts/s")
    rows = [("QUEUE", "PROJECT", "PRIORITY", "WAITING", "RUNNING", "WEIGHT", "QUOTA")]
    for queue in summary.get("queues", []):
        for project in queue.get("projects", []):
            name = f"{project['project_id']} {project.get('project_name') or ''}".strip()
            levels = sorted(project.get("by_priority", {}).items(), key=lambda item: -_priority_key(item[0]))
            if not levels:
                levels = [("-", 0)]
            for index, (level, count) in enumerate(levels):
                first = index == 0
                rows.append((queue["queue"] if first else "", name if first else "", level, str(count),
                             str(project["running"]) if first else "", str(project["weight"]) if first else "",
                             _quota(project) if first else ""))
    if len(rows) == 1:
        lines.append("no job is waiting or running")
        return "\n".join(lines)
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    for row in rows:
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    return "\n".join(lines)


def format_position(job: dict[str, Any]) -> str:
    """Where one job stands."""
    queue = job.get("queue")
    head = f"job {job['id']} ({job.get('priority_name') or job.get('priority')} priority) is {job['status']}"
    if not queue:
        return head
    if queue["reason"] == "dispatching":
        return f"{head}: handed to the runners, starting"
    line = f"{head}: position {queue['position']} in {queue['queue']} ({queue['jobs_ahead']} ahead); waits on " \
           f"{queue['reason']}: {queue['detail']}"
    if queue.get("estimated_start_seconds") is not None:
        line += f"; starts in about {queue['estimated_start_seconds']:.0f} s"
    if queue.get("stale"):
        line += " (stale: no scheduler has reported for a while)"
    return line


def show_queues(client: ApiClient) -> str:
    """GET /queues, formatted."""
    return format_queues(client.request("GET", f"{API_PREFIX}/queues"))


def show_job(client: ApiClient, job_id: str) -> str:
    """GET /training/jobs/{id}, its place in the queue formatted."""
    return format_position(client.get_job(job_id))
