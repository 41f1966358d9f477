"""Fault injection for the tests that kill a run and resume it: the process SIGKILLs itself at a named point.

One environment variable, `POISE_KILL_AT="<point>:<n>"`, arms one point: `epoch:2` dies right after epoch 2's
checkpoints are saved (training), `writes:3` right after the third batch of features is flushed to disk but
before it is recorded as done (the worst moment to die). Unset, `maybe_kill` does nothing.
"""

from __future__ import annotations

import os
import signal

ENVIRONMENT_VARIABLE = "POISE_KILL_AT"

_passes: dict[str, int] = {}


def maybe_kill(point: str, count: int | None = None) -> None:
    """SIGKILL this process if `POISE_KILL_AT` is `<point>:<count>`. `count` is the caller's (an epoch number);
    without it, the number of times this process has passed `point`, this pass included."""
    armed = os.environ.get(ENVIRONMENT_VARIABLE)
    if not armed:
        return
    if count is None:
        count = _passes[point] = _passes.get(point, 0) + 1
    name, _, at = armed.partition(":")
    if name == point and at.strip().isdigit() and count == int(at):
        os.kill(os.getpid(), signal.SIGKILL)
