"""When `visionyard up` restarts a process that exited, and when it calls that a crash loop.

Pure bookkeeping over a monotonic clock (the stack supplies `now`), so the policy is tested without
processes. A process that exits is restarted after a delay that doubles with every exit that follows a
short run (`first_delay`, capped at `max_delay`); a run of `stable_after` seconds resets it. An exit
that makes `crash_loop_exits` exits within `crash_loop_window` seconds marks the process crash-looping.

A crash-looping process is not parked: it keeps being retried at the capped delay. The usual causes in
the embedded stack are outside it (a port held by another program, a full disk, an unreachable S3
endpoint or database) and go away without anyone restarting `up`; one attempt every `max_delay` seconds
costs nothing, and the report plus `visionyard status` say which process it is and why.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass(frozen=True)
class RestartPolicy:
    """Backoff and crash-loop thresholds (seconds)."""

    first_delay: float = 0.5
    max_delay: float = 30.0
    stable_after: float = 30.0
    crash_loop_exits: int = 5
    crash_loop_window: float = 120.0


@dataclass
class RestartRecord:
    """One supervised process's history: starts, exits, the pending restart and its crash-loop flag."""

    policy: RestartPolicy = field(default_factory=RestartPolicy)
    restarts: int = 0
    started_at: float = 0.0
    restart_at: float | None = None
    last_exit_code: int | None = None
    last_exit_at: float | None = None
    crash_looping: bool = False
    quick_exits: int = 0
    exits: deque[float] = field(default_factory=deque)

    @property
    def waiting(self) -> bool:
        """Exited and not yet restarted."""
        return self.restart_at is not None

    def started(self, now: float) -> None:
        """The process (re)started at `now`."""
        self.started_at = now
        self.restart_at = None

    def exited(self, *, code: int | None, now: float) -> bool:
        """Record an exit and schedule the restart; True when this exit starts a crash loop."""
        policy = self.policy
        self.last_exit_code = code
        self.last_exit_at = now
        if now - self.started_at >= policy.stable_after:
            self.quick_exits = 0
        delay = min(policy.first_delay * 2 ** self.quick_exits, policy.max_delay)
        self.quick_exits += 1
        self.restart_at = now + delay
        self.exits.append(now)
        while self.exits and now - self.exits[0] > policy.crash_loop_window:
            self.exits.popleft()
        entering = len(self.exits) >= policy.crash_loop_exits and not self.crash_looping
        if entering:
            self.crash_looping = True
        return entering

    def due(self, now: float) -> bool:
        """Whether the pending restart is due."""
        return self.restart_at is not None and now >= self.restart_at

    def restarting(self, now: float) -> None:
        """The pending restart happens now."""
        self.restarts += 1
        self.started(now)

    def recovered(self, now: float) -> bool:
        """True once (and clears the flag) when a crash-looping process has stayed up `stable_after`."""
        if self.crash_looping and self.restart_at is None and now - self.started_at >= self.policy.stable_after:
            self.crash_looping = False
            self.exits.clear()
            return True
        return False

    def state(self) -> str:
        """`running`, `restarting` or `crash-looping` (waiting or running inside a crash loop)."""
        if self.crash_looping:
            return "crash-looping"
        return "restarting" if self.waiting else "running"
