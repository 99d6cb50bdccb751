"""`fedq status`: the running aggregator's job, version, accuracy, workers and backlog.

Read from the aggregator's HTTP endpoint (/metrics, and /status for the job ids) and, with
--broker, from RabbitMQ (a passive queue declaration: the messages ready in a queue).
"""

from __future__ import annotations

import argparse
import json
import os
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from broker.topology import Topology
from shared.errors import FedqError
from shared.ops import finite, json_text

# Metric name (as the parser gives samples) -> key in the status.
_GAUGES = {
    "fedq_aggregator_model_version": "version",
    "fedq_aggregator_round": "round",
    "fedq_aggregator_eval_accuracy_ratio": "accuracy",
    "fedq_aggregator_eval_loss": "loss",
    "fedq_aggregator_workers_active": "workers_active",
    "fedq_aggregator_last_model_age_seconds": "last_model_age_s",
    "fedq_aggregator_updates_accepted_total": "updates_accepted_total",
    "fedq_aggregator_jobs_completed_total": "jobs_completed_total",
}
_TIMEOUT_S = 5.0


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=_TIMEOUT_S) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as e:
        with e:
            return e.code, e.read().decode(errors="replace")


def parse_metrics(text: str) -> dict[str, Any]:
    """The status figures from a Prometheus exposition of the aggregator."""
    out: dict[str, Any] = {"updates_rejected_total": 0.0, "rejected_by_reason": {}}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in _GAUGES:
                out[_GAUGES[sample.name]] = sample.value
            elif sample.name == "fedq_aggregator_job_state" and sample.value == 1:
                out["state"] = sample.labels.get("state")
            elif sample.name == "fedq_aggregator_updates_rejected_total":
                out["updates_rejected_total"] += sample.value
                out["rejected_by_reason"][sample.labels.get("reason", "")] = sample.value
    for key in ("version", "round", "workers_active"):
        if isinstance(out.get(key), float):
            out[key] = int(out[key])
    return out


def aggregator_status(base_url: str) -> dict[str, Any]:
    """Metrics and, when the aggregator serves it, /status merged; FedqError if unreachable."""
    base = base_url.rstrip("/")
    try:
        code, text = _get(base + "/metrics")
    except (OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise FedqError(f"cannot reach the aggregator at {base}: {reason}") from e
    if code != 200:
        raise FedqError(f"the aggregator at {base} answered {code} on /metrics")
    out = parse_metrics(text)
    out["aggregator"] = base
    try:
        code, body = _get(base + "/status")
        details = json.loads(body) if code == 200 else {}
    except (OSError, ValueError):
        details = {}
    if isinstance(details, dict):
        # /status speaks for the current job: an idle aggregator's null version and accuracy
        # replace the gauges, which still hold the previous job's last values.
        out |= details
    # A NaN gauge (a diverged evaluation) is shown as unknown, and --json stays JSON.
    return dict(finite(out))


def broker_backlog(url: str, prefix: str) -> dict[str, Any]:
    """Messages ready in the updates and jobs queues (a passive declare).

    Messages delivered but unacknowledged are not counted here: RabbitMQ tells those only
    through its management API or rabbitmqctl. The aggregator's own share of them (accepted
    updates waiting for a checkpoint) is `updates_held` from /status.
    """
    from broker.rabbitmq import queues_ready  # pika only when --broker asks for it

    topology = Topology(prefix)
    ready = queues_ready(url, [topology.updates, topology.jobs], _TIMEOUT_S)
    return {"updates_ready": ready[topology.updates], "jobs_ready": ready[topology.jobs]}


def _fmt(value: Any, spec: str = "") -> str:
    if value is None:
        return "-"
    return format(value, spec) if spec else str(value)


def render(status: dict[str, Any]) -> str:
    """The readable block `fedq status` prints."""
    queued = status.get("queued_job_ids") or []
    lines = [
        f"aggregator     {status.get('aggregator')}",
        f"state          {_fmt(status.get('state'))}",
        f"job            {_fmt(status.get('job_id'))}"
        + (f" ({status['strategy']}, {status.get('model')})" if status.get("strategy") else ""),
        f"version        {_fmt(status.get('version'))}"
        + (f", round {status['round']}" if status.get("round") else ""),
        f"accuracy       {_fmt(status.get('accuracy'), '.4f')}"
        f"   loss {_fmt(status.get('loss'), '.4f')}",
        f"workers active {_fmt(status.get('workers_active'))}",
        f"last model     {_fmt(status.get('last_model_age_s'), '.1f')} s ago",
        f"updates        {_fmt(status.get('updates_accepted_total'), '.0f')} accepted, "
        f"{_fmt(status.get('updates_rejected_total'), '.0f')} rejected (since start-up)",
        f"jobs queued    {_fmt(status.get('queued_jobs'))}"
        + (f": {', '.join(queued)}" if queued else ""),
        f"jobs ended     {_fmt(status.get('jobs_done'))} by this process; in its state dir "
        + _ended(status.get("jobs_ended")),
    ]
    # A job that cannot progress (docs/monitoring.md#jobs-that-cannot-progress).
    if status.get("stalled"):
        lines.append(f"STALLED        {status.get('stall_reason')}")
    if status.get("evaluations_nonfinite"):
        lines.append(f"evaluations    {status['evaluations_nonfinite']} not finite (left out)")
    for failed in status.get("failed_jobs") or []:
        detail = f" ({failed['detail']})" if failed.get("detail") else ""
        lines.append(f"failed job     {failed['job_id']}: {failed['reason']}{detail}")
    lines += _failed_worker_lines(status.get("failed_workers") or [])
    if "updates_ready" in status:
        lines.append(
            f"backlog        {status['updates_ready']} updates ready, "
            f"{_fmt(status.get('updates_held'))} held by the aggregator; "
            f"{status['jobs_ready']} jobs ready"
        )
    return "\n".join(lines)


def _ended(counts: Any) -> str:
    if not isinstance(counts, dict):
        return "-"
    return ", ".join(f"{counts.get(k, 0)} {k}" for k in ("finished", "failed", "cancelled"))


def _failed_worker_lines(failed: list[dict[str, Any]], limit: int = 10) -> list[str]:
    """One line per worker that cannot train the running job, with its reason and detail."""
    lines = [
        f"worker failed  {w.get('worker_id')}: {w.get('reason')}: {w.get('detail')}"
        for w in failed[:limit]
    ]
    if len(failed) > limit:
        lines.append(f"worker failed  ... and {len(failed) - limit} more (see --json)")
    return lines


def status_main(argv: Sequence[str] | None = None) -> int:
    """`fedq status`: print the aggregator's state (exit 1 when it cannot be reached)."""
    parser = argparse.ArgumentParser(prog="fedq status")
    parser.add_argument(
        "--aggregator",
        default=os.environ.get("FEDQ_AGGREGATOR", "http://localhost:9100"),
        help="the aggregator's metrics endpoint (default http://localhost:9100)",
    )
    parser.add_argument("--broker", help="amqp:// URL: also count the queues' backlog")
    parser.add_argument("--prefix", default=os.environ.get("FEDQ_PREFIX", "fedq"))
    parser.add_argument("--json", action="store_true", help="one JSON object")
    args = parser.parse_args(argv)
    status = aggregator_status(args.aggregator)
    if args.broker:
        if not args.broker.startswith(("amqp://", "amqps://")):
            raise FedqError("--broker takes an amqp:// or amqps:// URL")
        status |= broker_backlog(args.broker, args.prefix)
    print(json_text(status, sort_keys=True) if args.json else render(status))
    return 0
