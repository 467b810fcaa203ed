"""Post-install health check: a shell command that must exit 0, or a URL that
must answer 2xx, within a timeout. The update commits only after it passes."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_TIMEOUT = 30.0
_TAIL = 400


@dataclass
class HealthResult:
    ok: bool
    kind: str
    detail: str
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)


def run_health_check(
    *,
    cmd: str | None = None,
    url: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> HealthResult:
    """Run the configured checks (command first, then URL); no check passes."""
    start = time.monotonic()
    if cmd:
        result = _run_cmd(cmd, timeout, env or {}, cwd)
        if not result.ok or not url:
            return result
    if url:
        return _get_url(url, max(timeout - (time.monotonic() - start), 0.1))
    return HealthResult(True, "none", "no health check configured", 0.0)


def _run_cmd(cmd: str, timeout: float, env: Mapping[str, str], cwd: Path | None) -> HealthResult:
    start = time.monotonic()
    # Own session so a timeout kills the whole tree the shell started; close_fds
    # (the default) keeps our descriptors, the lock included, out of the child.
    # The operator's own command line, run by design through the shell.
    proc = subprocess.Popen(  # noqa: S602
        cmd,
        shell=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, **env},
        cwd=cwd,
        start_new_session=True,
        close_fds=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        out, _ = proc.communicate()
        return HealthResult(
            False,
            "cmd",
            f"health command timed out after {timeout:g}s: {cmd}",
            time.monotonic() - start,
            {"output": _tail(out)},
        )
    seconds = time.monotonic() - start
    if proc.returncode != 0:
        detail = f"health command exited {proc.returncode}: {cmd}"
        return HealthResult(False, "cmd", detail, seconds, {"output": _tail(out)})
    return HealthResult(True, "cmd", "health command exited 0", seconds, {"output": _tail(out)})


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def _tail(out: bytes | None) -> str:
    return (out or b"")[-_TAIL:].decode("utf-8", "replace")


def _get_url(url: str, timeout: float) -> HealthResult:
    import requests

    start = time.monotonic()
    try:
        resp = requests.get(url, timeout=timeout, allow_redirects=False)
    except requests.RequestException as exc:
        detail = f"health URL {url} failed: {type(exc).__name__}"
        return HealthResult(False, "url", detail, time.monotonic() - start)
    seconds = time.monotonic() - start
    ok = 200 <= resp.status_code < 300
    detail = f"health URL {url} answered {resp.status_code}"
    return HealthResult(ok, "url", detail, seconds, {"status": resp.status_code})
