"""What every `--ray` option shares: importing Ray (an optional extra), joining or starting a cluster,
and turning a task that kept failing into the one-line error that names it.

A task is retried RETRIES more times (also when its worker or node dies) before its failure fails the
command; without an address a local Ray instance is started for the command and stopped after it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from qcompile.errors import UserError

RETRIES = 2


def require_ray():
    """The `ray` module, or the one-line error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise UserError("--ray needs Ray, which is not installed: pip install 'qcompile[ray]'") from None
    return ray


@contextmanager
def ray_session(address: str, num_cpus: int | None = None) -> Iterator[Any]:
    """Ray connected to the cluster at `address` ('' for a new local instance of `num_cpus` CPUs); an
    instance already initialised by the caller (a script, a test) is used as it is and left running.
    Ray's own log lines show when qcompile's info lines do (`-v`); otherwise only its errors."""
    ray = require_ray()
    started = not ray.is_initialized()
    if started:
        ray.init(address=address or None, num_cpus=None if address else num_cpus, include_dashboard=False,
                 log_to_driver=False, logging_level=_ray_logging_level())
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


def _ray_logging_level() -> int:
    return logging.INFO if logging.getLogger("qcompile").isEnabledFor(logging.INFO) else logging.ERROR


def task_result(ray, ref, what: str) -> Any:
    """The task's return value; a task that failed every try fails the command in one line naming `what`."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayError as exc:
        cause = exc.cause if isinstance(exc, ray.exceptions.RayTaskError) else exc
        first = (str(cause).strip().splitlines() or [""])[0][:300]
        raise UserError(f"--ray: {what} failed {RETRIES + 1} times ({type(cause).__name__}: {first})") from None
