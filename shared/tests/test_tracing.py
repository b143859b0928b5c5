"""Trace context across NATS on a real nats-server: a published event taken by a batched consumer and a request
answered by a responder (the FastStream binders, through their middlewares) continue the publisher's trace; JSON logs inside a span name it. Tracing is process-wide, so the traced side
runs in a child process exporting to a file; this process keeps tracing off and checks the off path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from visionyard.shared import tracing
from visionyard.shared.natsserver import NatsServer

TRACED = textwrap.dedent('''
    import asyncio, logging, sys
    from visionyard.shared import streams, tracing
    from visionyard.shared.bus import Bus
    from visionyard.shared.bus.broker import Batch, attached, consumer, responder
    from visionyard.shared.events import ProgressReported
    from visionyard.shared.logs import configure_logging, job_context

    async def main(url):
        assert tracing.configure_tracing("probe")
        configure_logging("probe")
        bus = await Bus.connect(url, service="probe")
        await bus.ensure_topology()
        broker = attached(bus, service="probe")
        consumed = asyncio.Event()

        @responder(broker, "probe.ask", queue="probe")
        async def answer(event: ProgressReported) -> str:
            return "ok"

        @consumer(broker, streams.TRACKER, batched=True)
        async def handle(batch: Batch) -> None:
            consumed.set()

        await broker.start()
        with tracing.span("request"):
            with job_context(job_id="j1", attempt=2):
                logging.getLogger("probe").warning("inside the request")
            await bus.publish(ProgressReported(job_id="j1", attempt=2, seq=1, epoch=1, total_epochs=1, metrics={}))
            assert await bus.request("probe.ask", ProgressReported(job_id="j1", attempt=2, seq=1, epoch=1,
                                                                   total_epochs=1, metrics={}), timeout=10) == b"ok"
        await asyncio.wait_for(consumed.wait(), 30)
        await broker.stop()
        await bus.close()
        tracing.shutdown_tracing()

    asyncio.run(main(sys.argv[1]))
''')


@pytest.mark.integration
def test_a_trace_continues_across_publish_consume_and_request_reply(nats_server: NatsServer, tmp_path: Path) -> None:
    env = {**os.environ, "VISIONYARD_TRACING_FILE_DIR": str(tmp_path / "traces")}
    done = subprocess.run([sys.executable, "-c", TRACED, nats_server.url], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    spans = {span["name"]: span for path in (tmp_path / "traces").glob("probe-*.jsonl")
             for span in map(json.loads, path.read_text().splitlines())}
    request = spans["request"]
    for name in ("consume tracker", "serve probe.ask"):
        assert spans[name]["trace_id"] == request["trace_id"], name
        assert spans[name]["parent_span_id"] == request["span_id"], name
    logged = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    inside = next(record for record in logged if record["msg"] == "inside the request")
    assert (inside["job_id"], inside["attempt"], inside["trace_id"]) == ("j1", 2, request["trace_id"])


def test_with_tracing_off_nothing_is_added_or_recorded() -> None:
    assert not tracing.enabled()
    assert tracing.inject({"Nats-Msg-Id": "m"}) == {"Nats-Msg-Id": "m"}
    with tracing.span("anything", headers={"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"}) as span:
        assert span is None and tracing.trace_id() is None
