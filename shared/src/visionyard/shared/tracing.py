"""Traces across the services: W3C trace context travels in NATS headers, spans are exported only when configured.

A REST request's span is the parent of the outbox rows it writes (their `traceparent` header); the runner
holds a command inside a span continuing it, so the job's events (the trainer's, through the runner) and its
requests to storage carry it on; the tracker, storage and the API's projector continue it when they handle
them. Without `VISIONYARD_TRACING_OTLP_ENDPOINT` or `VISIONYARD_TRACING_FILE_DIR` nothing is set up and every
helper here returns at once, so the hot paths pay one flag check.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import Span, SpanKind
from pydantic_settings import BaseSettings, SettingsConfigDict

log = logging.getLogger("visionyard.tracing")

TRACEPARENT = "traceparent"
_state = {"enabled": False}
_tracer = trace.get_tracer("visionyard")


class TracingSettings(BaseSettings):
    """Where spans go (env prefix `VISIONYARD_TRACING_`); neither set: tracing is off."""

    model_config = SettingsConfigDict(env_prefix="VISIONYARD_TRACING_", extra="ignore")

    # OTLP over HTTP, e.g. http://otel-collector:4318/v1/traces.
    otlp_endpoint: str | None = None
    # One JSON-lines file of finished spans per process in this directory (tests, debugging without a collector).
    file_dir: Path | None = None


class JsonLinesSpanExporter(SpanExporter):
    """Finished spans as JSON lines (trace and span ids in hex, the service, the parent) in one file."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._path = path
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        """Append the spans (one line each)."""
        lines = []
        for span in spans:
            context = span.get_span_context()
            if context is None:  # typed optional; every span the SDK ends has one
                continue
            lines.append(json.dumps({
                "trace_id": f"{context.trace_id:032x}", "span_id": f"{context.span_id:016x}",
                "parent_span_id": f"{span.parent.span_id:016x}" if span.parent else None,
                "name": span.name, "service": span.resource.attributes.get("service.name"),
                "start": span.start_time, "end": span.end_time, "attributes": dict(span.attributes or {}),
            }, default=str))
        with self._lock, self._path.open("a") as handle:
            handle.write("".join(line + "\n" for line in lines))
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        """Nothing held open between exports."""


def configure_tracing(service: str, settings: TracingSettings | None = None) -> bool:
    """Set up this process's tracer provider if an exporter is configured; whether tracing is on."""
    settings = settings or TracingSettings()
    if not (settings.otlp_endpoint or settings.file_dir):
        return False
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    if settings.otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=settings.otlp_endpoint)))
    if settings.file_dir:
        exporter = JsonLinesSpanExporter(settings.file_dir / f"{service}-{os.getpid()}.jsonl")
        # Batched too: a span's export never runs on the event loop; shutdown flushes what is left.
        provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=500))
    trace.set_tracer_provider(provider)
    _state["enabled"] = True
    return True


def shutdown_tracing() -> None:
    """Flush and stop the exporters (at the end of a service's run)."""
    provider = trace.get_tracer_provider()
    if _state["enabled"] and isinstance(provider, TracerProvider):
        provider.shutdown()


def enabled() -> bool:
    """Whether spans are being recorded in this process."""
    return _state["enabled"]


def inject(headers: dict[str, str] | None = None) -> dict[str, str]:
    """`headers` plus the current trace context (`traceparent`) when tracing is on."""
    headers = dict(headers or {})
    if _state["enabled"]:
        propagate.inject(headers)
    return headers


def trace_id() -> str | None:
    """The current trace id in hex (for log records), or None outside a recorded span."""
    if not _state["enabled"]:
        return None
    context = trace.get_current_span().get_span_context()
    return f"{context.trace_id:032x}" if context.is_valid else None


@contextmanager
def span(name: str, *, headers: Mapping[str, str] | None = None, kind: SpanKind = SpanKind.INTERNAL,
         **attributes: Any) -> Iterator[Span | None]:
    """A current span continuing the trace in `headers` (a new trace without one); nothing when tracing is off."""
    if not _state["enabled"]:
        yield None
        return
    parent = propagate.extract(dict(headers)) if headers else otel_context.get_current()
    with _tracer.start_as_current_span(name, context=parent, kind=kind,
                                       attributes={k: v for k, v in attributes.items() if v is not None}) as current:
        yield current


@contextmanager
def spans_per_trace(name: str, headers: Sequence[Mapping[str, str] | None], **attributes: Any) -> Iterator[None]:
    """One span per distinct trace among a batch's messages, open while the batch is handled.

    A batch handler (the projector, the tracker) applies events of several jobs at once; each job's trace
    gets its own span for it rather than one span with a single arbitrary parent.
    """
    if not _state["enabled"]:
        yield
        return
    parents = {h[TRACEPARENT]: h for h in headers if h and TRACEPARENT in h}
    with ExitStack() as stack:
        for carrier in parents.values():
            parent = propagate.extract(dict(carrier))
            stack.enter_context(_tracer.start_as_current_span(
                name, context=parent, kind=SpanKind.CONSUMER, attributes={k: v for k, v in attributes.items() if v is not None},
            ))
        yield
