"""Errors and ack decisions: what a handler's outcome means for its message.

No NATS import here, so use cases raise these and tests decide acks without a broker; the one place that
maps an outcome to ack, nak (with backoff) or dead-letter-and-terminate is `decide_ack`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum

from visionyard.shared import streams


class PermanentError(Exception):
    """The message can never succeed (bad payload, violated invariant): dead-letter it now."""


class TransientError(Exception):
    """A dependency is unavailable; retry the message later."""


class AckAction(StrEnum):
    """What to tell JetStream about a delivered message."""

    ACK = "ack"
    NAK = "nak"
    TERM = "term"


@dataclass(frozen=True)
class AckDecision:
    """An ack action, with the redelivery delay of a nak and whether to dead-letter first."""

    action: AckAction
    delay: float = 0.0
    dead_letter: bool = False


def decide_ack(error: BaseException | None, *, delivered: int, spec: streams.ConsumerSpec) -> AckDecision:
    """Map a handler outcome to an ack decision; the only place that does so."""
    if error is None:
        return AckDecision(AckAction.ACK)
    if isinstance(error, PermanentError):
        return AckDecision(AckAction.TERM, dead_letter=True)
    if spec.max_deliver > 0 and delivered >= spec.max_deliver:
        return AckDecision(AckAction.TERM, dead_letter=True)
    delay = min(spec.backoff_base * (2 ** max(delivered - 1, 0)), spec.backoff_cap)
    return AckDecision(AckAction.NAK, delay=delay)



def error_reply(error: BaseException) -> bytes:
    """The reply a failed request handler sends, so its caller gets the reason instead of a time-out."""
    return json.dumps({"ok": False, "error": f"{type(error).__name__}: {error}"}).encode()
