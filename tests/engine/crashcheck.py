"""Crash-consistency checker: kill `themis-update apply` at every filesystem
syscall that touches the target or the state dir, then `recover`, and demand
the target be exactly the old or exactly the new tree.

How: one plain `strace -f -y` run lists the apply's filesystem syscalls with
the paths behind their fds; every occurrence whose line names the target or
the state dir becomes a crash point (syscall name, n-th call of that name).
For each, strace re-runs the apply with `-e inject=NAME:signal=KILL:when=N`:
SIGKILL arrives on entry to that call, so it never executes, the state is that
of a process killed right after the previous one (a crash at any instant
between two syscalls looks the same to the disk). Then `recover` runs (the
real CLI), the tree is compared, and an apply of the same bundle must converge
to the new tree.

Used by test_crash.py; `classify` is also the negative control's subject.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STRACE = "/usr/bin/strace"
FS_SYSCALLS = (
    "open", "openat", "creat", "write", "pwrite64", "writev", "pwritev", "pwritev2",
    "copy_file_range", "sendfile", "fsync", "fdatasync", "sync_file_range",
    "rename", "renameat", "renameat2", "unlink", "unlinkat", "rmdir",
    "mkdir", "mkdirat", "link", "linkat", "symlink", "symlinkat", "close",
    "fchmod", "fchmodat", "chmod", "ftruncate", "truncate", "fchown", "flock",
)  # fmt: skip
NOT_KILLED = "not killed"
MISSED_RETRIES = 2
_LINE = re.compile(r"^(\d+)\s+(?:<\.\.\. )?([a-z0-9_]+)(\(| resumed>)")

Tree = dict[str, tuple[Any, ...]]


@dataclass(frozen=True)
class CrashPoint:
    syscall: str
    nth: int  # 1-based among this process's calls of `syscall`
    line: str


@dataclass
class Outcome:
    point: CrashPoint
    killed: bool
    before_recover: str  # old / new / torn: what the kill itself left
    after_recover: str
    converged: bool
    problems: list[str] = field(default_factory=list)
    retried: bool = False  # run again because the first run never reached the point


def classify(tree: Tree, old: Tree, new: Tree) -> str:
    """'old' or 'new' only when paths, types, bytes and modes all match."""
    if tree == old:
        return "old"
    if tree == new:
        return "new"
    return "torn"


def supported_syscalls() -> list[str]:
    """The FS syscalls this architecture has (aarch64 has no open/rename/...)."""
    names = []
    for name in FS_SYSCALLS:
        proc = subprocess.run([STRACE, "-qq", "-e", f"trace={name}", "-o", "/dev/null", "true"],
                              capture_output=True)  # fmt: skip
        if proc.returncode == 0:
            names.append(name)
    return names


def strace_argv(syscalls: Sequence[str], out: Path, inject: CrashPoint | None = None) -> list[str]:
    # No --seccomp-bpf: strace 6.1 then skips the injection.
    argv = [STRACE, "-f", "-qq", "-y", "-e", f"trace={','.join(syscalls)}"]
    if inject is not None:
        argv += ["-e", f"inject={inject.syscall}:signal=KILL:when={inject.nth}"]
    return [*argv, "-o", str(out)]


def crash_points(trace: Path, watched: Sequence[str]) -> list[CrashPoint]:
    """Occurrences, in the traced main process, of syscalls naming a watched dir."""
    counts: Counter[str] = Counter()
    points = []
    main_pid = None
    for line in trace.read_text(errors="replace").splitlines():
        match = _LINE.match(line)
        if not match:
            continue
        pid, name, kind = match.groups()
        main_pid = main_pid or pid
        if pid != main_pid or kind != "(":  # "resumed>" continues a counted call
            continue
        counts[name] += 1
        if any(w in line for w in watched):
            points.append(CrashPoint(name, counts[name], line[:300]))
    return points


def last_call(trace: Path) -> str:
    lines = [ln for ln in trace.read_text(errors="replace").splitlines() if _LINE.match(ln)]
    return lines[-1] if lines else ""


@dataclass
class Scenario:
    """What to run: a template (target + state before), a command, trees."""

    template_target: Path
    template_state: Path
    old: Tree
    new: Tree
    snapshot: Callable[[Path], Tree]
    apply_argv: Callable[[Path, Path], list[str]]  # (target, state) -> argv
    recover_argv: Callable[[Path, Path], list[str]]
    recover_inproc: Callable[[Path, Path], object]  # the same code, minus ~0.5 s start-up
    converge: Callable[[Path, Path], None]  # apply again (in-process is fine)
    consistent: Callable[[Path, str], list[str]]  # (state, "old"/"new") -> problems
    cwd: Path
    pycache: Path  # the runs' own bytecode cache (see _run_env)


def _run_env(s: Scenario) -> dict[str, str]:
    """The environment of every CLI run: the listing run and the killed runs must make the
    same syscalls for the counts to name the same calls.
    - Bytecode in a cache of the scenario's own (PYTHONPYCACHEPREFIX), written by the first
      run: a module without a .pyc costs an extra openat (the .pyc tried, then the source),
      so with bytecode writes off (PYTHONDONTWRITEBYTECODE, as some machines set it) every
      .pyc another process writes into the repository's __pycache__ meanwhile took one call
      off each later run (eleven fewer openat than the listing run made, once).
    - Without coverage's start-up variables: nearly every run ends by SIGKILL (its data would
      be lost), and measuring hundreds of applies would double the test's time."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("COVERAGE_PROCESS_")}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env | {"PYTHONPYCACHEPREFIX": str(s.pycache)}


def _copy(s: Scenario, work: Path) -> tuple[Path, Path]:
    target, state = work / "target", work / "state"
    shutil.copytree(s.template_target, target, symlinks=True)
    shutil.copytree(s.template_state, state, symlinks=True)
    return target, state


def count(s: Scenario, syscalls: Sequence[str], workroot: Path) -> list[CrashPoint]:
    work = Path(tempfile.mkdtemp(dir=workroot))
    target, state = _copy(s, work)
    trace = work / "trace"
    argv = strace_argv(syscalls, trace) + s.apply_argv(target, state)
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=s.cwd, env=_run_env(s))
    if proc.returncode != 0 or classify(s.snapshot(target), s.old, s.new) != "new":
        raise AssertionError(f"plain traced apply failed: {proc.stderr}")
    points = crash_points(trace, [str(target), str(state)])
    shutil.rmtree(work)
    return points


def run_point(
    s: Scenario, syscalls: Sequence[str], point: CrashPoint, workroot: Path, *, cli: bool = True
) -> Outcome:
    work = Path(tempfile.mkdtemp(dir=workroot))
    target, state = _copy(s, work)
    trace = work / "trace"
    argv = strace_argv(syscalls, trace, point) + s.apply_argv(target, state)
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=s.cwd, env=_run_env(s))
    killed = proc.returncode in (-9, 137) and "killed by SIGKILL" in trace.read_text()
    problems = [] if killed else [_not_killed(proc, trace, point)]
    landed = last_call(trace)
    if killed and (point.syscall + "(") not in landed:
        problems.append(f"kill landed elsewhere: {landed[:200]}")
    before = classify(s.snapshot(target), s.old, s.new)
    problems += _recover(s, target, state, cli)
    after = classify(s.snapshot(target), s.old, s.new)
    if after != "torn":
        problems += s.consistent(state, after)
    try:
        s.converge(target, state)
        converged = classify(s.snapshot(target), s.old, s.new) == "new"
    except Exception as exc:  # reported, not raised: one bad point must not hide others
        problems.append(f"re-apply failed: {type(exc).__name__}: {exc}")
        converged = False
    shutil.rmtree(work, ignore_errors=True)
    return Outcome(point, killed, before, after, converged, problems)


def _not_killed(proc: subprocess.CompletedProcess[str], trace: Path, point: CrashPoint) -> str:
    made = sum(1 for c in crash_points(trace, [""]) if c.syscall == point.syscall)
    return (
        f"{NOT_KILLED} (rc {proc.returncode}; this run made {made} {point.syscall} calls,"
        f" the listing run at least {point.nth}): {proc.stderr[-300:]}"
    )


def _recover(s: Scenario, target: Path, state: Path, cli: bool) -> list[str]:
    if not cli:
        try:
            s.recover_inproc(target, state)
        except Exception as exc:
            return [f"recover failed: {type(exc).__name__}: {exc}"]
        return []
    rec = subprocess.run(
        s.recover_argv(target, state),
        capture_output=True,
        text=True,
        cwd=s.cwd,
        env=_run_env(s),
    )
    return [f"recover exit {rec.returncode}: {rec.stderr.strip()}"] if rec.returncode else []


def run_all(
    s: Scenario,
    points: Sequence[CrashPoint],
    syscalls: Sequence[str],
    workroot: Path,
    workers: int | None = None,
    cli_every: int = 1,
) -> list[Outcome]:
    """Every point; `recover` runs as the real CLI at every `cli_every`-th
    point (and the first of each syscall type), in-process at the others."""
    # One more worker than cores: part of each run waits on fsync, not the CPU.
    workers = workers or (os.cpu_count() or 1) + 1
    first = {p.syscall: p for p in reversed(points)}
    jobs = [(p, i % cli_every == 0 or first[p.syscall] is p) for i, p in enumerate(points)]
    with ThreadPoolExecutor(workers) as pool:
        outcomes = list(pool.map(lambda j: run_point(s, syscalls, j[0], workroot, cli=j[1]), jobs))
    return [_retry_missed(s, syscalls, o, workroot) for o in outcomes]


def _retry_missed(
    s: Scenario, syscalls: Sequence[str], outcome: Outcome, workroot: Path
) -> Outcome:
    """A run that ended without reaching its point tested nothing there (once in a few
    thousand runs on a loaded machine an apply makes a call fewer than the listing run
    saw): run that point again, alone, up to MISSED_RETRIES times. A point still not
    reached stays a problem; anything else wrong is never retried."""
    for _ in range(MISSED_RETRIES):
        missed = len(outcome.problems) == 1 and outcome.problems[0].startswith(NOT_KILLED)
        if outcome.killed or not missed:
            break
        outcome = run_point(s, syscalls, outcome.point, workroot)
        outcome.retried = True
    return outcome


# A point at most this many calls past the end of what its runs make is the listing run's
# tail (that run made a few more calls of the kind: a .pyc written, say), not a call the
# apply makes: every call the runs do make is a point of its own already.
TAIL_CALLS = 5
_MADE = re.compile(r"this run made (\d+) [a-z0-9_]+ calls")


def past_the_runs_calls(outcome: Outcome) -> bool:
    """Whether the only problem of `outcome` is that its runs, which went to their end and
    left the new version, made a few calls fewer of its kind than the listing run."""
    if outcome.killed or len(outcome.problems) != 1 or outcome.after_recover != "new":
        return False
    found = _MADE.search(outcome.problems[0])
    if not outcome.problems[0].startswith(NOT_KILLED) or found is None:
        return False
    made = int(found.group(1))
    return made < outcome.point.nth <= made + TAIL_CALLS


def summary(outcomes: Sequence[Outcome]) -> str:
    torn = sum(o.after_recover == "torn" for o in outcomes)
    retried = sum(o.retried for o in outcomes)
    return f"{len(outcomes)} crash points, {torn} torn, {retried} run again (not reached at first)"
