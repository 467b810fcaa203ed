"""Runs of the chaos suite: start one rollout per lane (disjoint clusters, in parallel),
fire the planned faults while they run, then check the invariants and collect every
violation (never stopping at the first)."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from django.db.models import Count

from tests import procs
from tests.chaos import invariants as inv
from tests.chaos.faults import FaultKind, PlannedFault, plan_faults
from tests.chaos.stack import ChaosNode, ChaosStack
from tests.helpers import MakeBundle, publish_bundle
from updates.models import Cluster, Event, Node, Rollout, UpdateJob
from updates.rollouts import services as rollouts

SEED = int(os.environ.get("THEMIS_CHAOS_SEED", "1313"))
RUNS = int(os.environ.get("THEMIS_CHAOS_RUNS", "20"))
# Job deadlines of every run: a command is re-sent every ACK_TIMEOUT s (MAX_SENDS in all),
# a job silent for PROGRESS_TIMEOUT s or offline for OFFLINE_GRACE s ends LOST.
DEADLINES: dict[str, Any] = {
    "ack_timeout": 3,
    "max_sends": 5,
    "progress_timeout": 15,
    "offline_grace": 5,
    "health_timeout": 10,
}
NODES_PER_ROLLOUT = 3
# The longest a rollout may take under those deadlines: each of its nodes, one at a time,
# within its longest job deadline plus the health check.
ROLLOUT_DEADLINE = NODES_PER_ROLLOUT * (
    max(DEADLINES["ack_timeout"] * DEADLINES["max_sends"], DEADLINES["progress_timeout"])
    + DEADLINES["health_timeout"]
)
# No run starts after this many seconds of runs: the module stays within its budget.
RUN_BUDGET = float(os.environ.get("THEMIS_CHAOS_BUDGET", "290"))
SETTLE_SECONDS = 20.0
MAX_UNAVAILABLE = 1
BASE_VERSION = "2.0.0"
SERVICE_FILES = {"bin/themisd": (procs.ROOT / "themis_dashboard/demo/service.py").read_bytes()}

ROLLING: dict[str, Any] = {"max_unavailable": MAX_UNAVAILABLE, **DEADLINES}
CANARY: dict[str, Any] = {
    "max_unavailable": MAX_UNAVAILABLE,
    **DEADLINES,
    "stages": [{"fraction": 0.34, "auto_promote": True}, {"fraction": 1.0, "auto_promote": True}],
    "gate": {"automatic": True, "bake_seconds": 1},
}
BLUE_GREEN: dict[str, Any] = {"max_unavailable": MAX_UNAVAILABLE, **DEADLINES}
STRATEGY_OPTIONS = {"rolling": ROLLING, "canary": CANARY, "blue_green": BLUE_GREEN}


def bundle_files(version: str) -> dict[str, bytes]:
    return {**SERVICE_FILES, "share/VERSION": f"{version}\n".encode()}


@dataclass
class Lane:
    """One cluster and the strategies its runs cycle through."""

    name: str
    cluster: Cluster
    nodes: list[ChaosNode]
    strategies: tuple[str, ...]
    broken: str = ""


@dataclass
class RunRecord:
    number: int
    lane: Lane
    strategy: str
    version: str
    rollout: Rollout
    started: float
    ended: float | None = None


@dataclass
class Violation:
    run: int
    what: str

    def __str__(self) -> str:
        return f"run {self.run}: {self.what}"


@dataclass
class Chaos:
    stack: ChaosStack
    lanes: list[Lane]
    make_bundle: MakeBundle
    seed: int = SEED
    runs_done: int = 0
    process_faults: int = 0
    fault_log: list[str] = field(default_factory=list)
    # One line per run that ended: strategy, version, final state, time taken.
    outcomes: list[str] = field(default_factory=list)
    # Processes that exited without being killed, and were started again.
    supervisor_log: list[str] = field(default_factory=list)
    violations: list[Violation] = field(default_factory=list)
    _reported_overlaps: set[frozenset[tuple[str, float]]] = field(default_factory=set)
    _seen: set[str] = field(default_factory=set)
    _hit_jobs: set[int] = field(default_factory=set)
    _dead_since: dict[str, float] = field(default_factory=dict)
    _round: int = 0

    # ------------------------------------------------------------------ one round

    def round(self) -> None:
        """One run per lane, in parallel, under the round's planned faults."""
        self._round += 1
        records = [self._start(lane) for lane in self.lanes if not lane.broken]
        if not records:
            return
        planned = plan_faults(self.seed, self._round)
        self._run_faults(records, planned)
        self._settle_and_check(records)

    def _start(self, lane: Lane) -> RunRecord:
        self.runs_done += 1
        number = self.runs_done
        strategy = lane.strategies[(self._round - 1) % len(lane.strategies)]
        version = f"2.0.{number}"
        path = self.make_bundle(version, files=bundle_files(version))
        release = publish_bundle(path, version)
        nodes = list(Node.objects.filter(cluster=lane.cluster).order_by("node_id"))
        rollout = rollouts.rollout_create(
            release=release,
            strategy=strategy,
            nodes=nodes,
            user=None,
            options=STRATEGY_OPTIONS[strategy],
            name=f"chaos run {number}",
        )
        rollout = rollouts.rollout_start(rollout=rollout, user=None)
        return RunRecord(number, lane, strategy, version, rollout, time.monotonic())

    def _run_faults(self, records: list[RunRecord], planned: list[PlannedFault]) -> None:
        start = time.monotonic()
        pending = list(planned)
        armed: list[PlannedFault] = []
        restarts: list[tuple[float, Callable[[], None]]] = []
        first = records[0].number
        label = f"run {first}" if len(records) == 1 else f"runs {first}-{records[-1].number}"
        while True:
            now = time.monotonic()
            while pending and now - start >= pending[0].at:
                fault = pending.pop(0)
                if fault.kind == FaultKind.AGENT_MID_APPLY:
                    armed.append(fault)
                else:
                    restarts.append(self._fire(fault, label))
            if armed:
                fired = self._kill_agent_mid_apply(armed[0], label)
                if fired is not None:
                    armed.pop(0)
                    restarts.append(fired)
            for item in [r for r in restarts if r[0] <= now]:
                restarts.remove(item)
                item[1]()
            if not restarts:
                self._supervise()
            self._note_final(records)
            if all(r.ended is not None for r in records) and not restarts:
                break
            if now - start > ROLLOUT_DEADLINE and not restarts:
                break
            time.sleep(0.1)

    def _fire(self, fault: PlannedFault, runs: str) -> tuple[float, Callable[[], None]]:
        stack = self.stack
        restart: Callable[[], None]
        if fault.kind == FaultKind.REDIS:
            stack.redis.kill()
            restart = stack.redis.start
            label = "redis"
        elif fault.kind == FaultKind.COORDINATOR:
            index = fault.pick % len(stack.coordinators)
            stack.coordinators[index].kill()

            def restart() -> None:
                stack.restart_coordinator(index)

            label = f"coordinator-{index}"
        else:
            assert stack.beat is not None
            stack.beat.kill()
            restart = stack.restart_beat

            label = "beat"
        self._count_fault(runs, f"{fault.kind} ({label}) for {fault.down_for}s")
        return time.monotonic() + fault.down_for, restart

    def _kill_agent_mid_apply(
        self, fault: PlannedFault, runs: str
    ) -> tuple[float, Callable[[], None]] | None:
        applying = (UpdateJob.State.APPLYING, UpdateJob.State.HEALTH_CHECK)
        candidates = sorted(
            UpdateJob.objects.filter(state__in=applying).values_list("node__node_id", "pk")
        )
        # A job already hit, or an agent just restarted, is not "in the middle of an apply".
        candidates = [
            (n, pk)
            for n, pk in candidates
            if pk not in self._hit_jobs
            and n in self.stack.nodes
            and self.stack.nodes[n].running_for() > 2.0
        ]
        if not candidates:
            return None
        node_id, job = candidates[fault.pick % len(candidates)]
        node = self.stack.nodes[node_id]
        self._hit_jobs.add(job)
        self.stack.kill_agent(node)
        self._count_fault(runs, f"{fault.kind} ({node_id}, job {job}) for {fault.down_for}s")

        def restart() -> None:
            self.stack.start_agent(node)

        return time.monotonic() + fault.down_for, restart

    def _count_fault(self, runs: str, what: str) -> None:
        self.process_faults += 1
        self.fault_log.append(f"{runs}: {what}")

    def _note_final(self, records: list[RunRecord]) -> None:
        for record in records:
            if record.ended is None:
                state = Rollout.objects.values_list("state", flat=True).get(pk=record.rollout.pk)
                if state in Rollout.FINAL_STATES:
                    record.ended = time.monotonic()
                    took = record.ended - record.started
                    self.outcomes.append(
                        f"run {record.number}: {record.strategy} {record.version} {state} "
                        f"in {took:.1f}s"
                    )

    # ------------------------------------------------------------------ checks

    def _settle_and_check(self, records: list[RunRecord]) -> None:
        self._ensure_all_running()
        for record in records:
            self._check_final(record)
        settled = procs.wait_until(self._settled, SETTLE_SECONDS, 0.3)
        run = records[-1].number
        if not settled:
            self._check_no_active_job(run)
            self._check_versions(run)
        self._check_applies(run)
        self._check_drains(run)
        self._check_journals(run)
        self._check_traffic_roles(run)

    def _supervise(self) -> None:
        """What a service manager does (Restart=always): a process that exited on its
        own, not by the injector's hand, is started again a second later."""
        now = time.monotonic()
        for key, alive in self._processes().items():
            if alive:
                self._dead_since.pop(key, None)
            elif now - self._dead_since.setdefault(key, now) >= 1.0:
                self._dead_since.pop(key, None)
                self.supervisor_log.append(f"{key} exited on its own; started again")
                self._ensure_all_running()

    def _processes(self) -> dict[str, bool]:
        stack = self.stack
        found = {"redis": stack.redis.alive, "beat": stack.beat is None or stack.beat.alive}
        for i, proc in enumerate(stack.coordinators):
            found[f"coordinator-{i}"] = proc.alive
        for node in stack.nodes.values():
            found[f"agent-{node.node_id}"] = node.agent is None or node.agent.alive
        return found

    def _ensure_all_running(self) -> None:
        """Anything still down (a restart not yet due when the rollouts ended) comes back."""
        stack = self.stack
        stack.redis.start()
        for i in range(len(stack.coordinators)):
            stack.restart_coordinator(i)
        stack.restart_beat()
        for node in stack.nodes.values():
            if node.agent is not None and not node.agent.alive:
                stack.start_agent(node)

    def _check_final(self, record: RunRecord) -> None:
        rollout = Rollout.objects.get(pk=record.rollout.pk)
        took = (record.ended or time.monotonic()) - record.started
        if record.ended is not None and took <= ROLLOUT_DEADLINE:
            return
        events = Event.objects.filter(details__rollout_id=rollout.pk).order_by("-id")[:8]
        last = "; ".join(f"{e.verb} {e.details}" for e in reversed(events))
        jobs = list(
            UpdateJob.objects.filter(rollout=rollout).values_list(
                "pk", "node__node_id", "kind", "state", "step", "error_code"
            )
        )
        self.violations.append(
            Violation(
                record.number,
                f"{record.strategy} rollout {rollout.pk} ({record.version}) not final after "
                f"{took:.0f}s (deadline {ROLLOUT_DEADLINE:.0f}s): state {rollout.state} "
                f"{rollout.error_message!r}; jobs {jobs}; last events: {last}",
            )
        )
        if rollout.state not in Rollout.FINAL_STATES:
            self._end_stuck(record)

    def _end_stuck(self, record: RunRecord) -> None:
        """A hung rollout is aborted so the lane can go on; if even that hangs, the lane
        takes no more runs (its nodes may still have a job)."""
        rollout = Rollout.objects.get(pk=record.rollout.pk)
        with contextlib.suppress(rollouts.RolloutError):
            rollouts.rollout_abort(rollout=rollout, user=None, reason="chaos: past deadline")
        ended = procs.wait_until(
            lambda: (
                Rollout.objects.values_list("state", flat=True).get(pk=rollout.pk)
                in Rollout.FINAL_STATES
            ),
            30,
            0.3,
        )
        if not ended:
            record.lane.broken = f"rollout {rollout.pk} still not final after an abort"
            self.violations.append(Violation(record.number, record.lane.broken))

    def _settled(self) -> bool:
        """No job active, and every node idle and known as it is. Idle matters apart: an
        agent may still run a job the dashboard has ended (a delivery that waited in the
        broker while the agent was down, the job marked LOST meanwhile, its command still
        unexpired), which the dashboard takes as a late report; until it finishes, the
        node's tree is mid-apply (a journal pending, the files ahead of its state)."""
        if UpdateJob.objects.filter(state__in=UpdateJob.ACTIVE_STATES).exists():
            return False
        db = dict(Node.objects.values_list("node_id", "installed_version"))
        return all(
            db.get(n.node_id) == n.installed_version() and _idle(n)
            for n in self.stack.nodes.values()
        )

    def _check_no_active_job(self, run: int) -> None:
        for job in UpdateJob.objects.filter(state__in=UpdateJob.ACTIVE_STATES):
            self.violations.append(
                Violation(
                    run,
                    f"job {job.pk} ({job.kind} on {job.node.node_id}) still {job.state} "
                    f"{SETTLE_SECONDS:.0f}s after its rollout ended (step {job.step!r})",
                )
            )

    def _check_versions(self, run: int) -> None:
        db = dict(Node.objects.values_list("node_id", "installed_version"))
        for node in self.stack.nodes.values():
            on_disk = node.installed_version()
            if db.get(node.node_id) != on_disk:
                self.violations.append(
                    Violation(
                        run,
                        f"{node.node_id}: database says {db.get(node.node_id)!r}, "
                        f"the engine state says {on_disk!r}",
                    )
                )

    def _check_applies(self, run: int) -> None:
        done = (
            UpdateJob.objects.filter(kind=UpdateJob.Kind.UPDATE, state=UpdateJob.State.DONE)
            .values("node__node_id", "release__version")
            .annotate(n=Count("pk"))
            .filter(n__gt=1)
        )
        for row in done:
            key = f"db:{row['node__node_id']}:{row['release__version']}"
            self._once(
                run,
                key,
                f"{row['node__node_id']}: {row['n']} DONE update jobs for "
                f"{row['release__version']} in the database",
            )
        for node in self.stack.nodes.values():
            path = node.state_dir / "applies.log"
            counts = inv.parse_applies_log(_read(path))
            if not path.exists() and self._node_did_work(node):
                self._once(run, f"noapplies:{node.node_id}", f"{node.node_id}: no applies.log")
            for job_id, times in counts.items():
                if times > 1:
                    self._once(
                        run,
                        f"applies:{node.node_id}:{job_id}:{times}",
                        f"{node.node_id}: job {job_id} applied {times} times (applies.log)",
                    )
            mine = {
                str(pk)
                for pk in UpdateJob.objects.filter(node__node_id=node.node_id).values_list(
                    "pk", flat=True
                )
            }
            for job_id in set(counts) - mine:
                self._once(
                    run,
                    f"foreign:{node.node_id}:{job_id}",
                    f"{node.node_id}: applies.log names job {job_id}, not a job of this node",
                )

    def _node_did_work(self, node: ChaosNode) -> bool:
        return UpdateJob.objects.filter(
            node__node_id=node.node_id, state=UpdateJob.State.DONE
        ).exists()

    def _check_drains(self, run: int) -> None:
        now = time.time()
        for lane in self.lanes:
            intervals: list[inv.Drained] = []
            for node in lane.nodes:
                path = node.state_dir / "drain.log"
                if not path.exists() and self._node_did_work(node):
                    self._once(run, f"nodrain:{node.node_id}", f"{node.node_id}: no drain.log")
                events = inv.parse_drain_log(_read(path))
                intervals += inv.drained_intervals(node.node_id, events)
            for overlap in inv.overlaps(intervals, MAX_UNAVAILABLE, now):
                if overlap.key in self._reported_overlaps:
                    continue
                self._reported_overlaps.add(overlap.key)
                drained = ", ".join(
                    f"{d.node_id} (job {d.job_id or '?'}) from {d.start:.2f} to "
                    f"{'still drained' if d.end is None else f'{d.end:.2f}'}"
                    for d in overlap.drained
                )
                self.violations.append(
                    Violation(
                        run,
                        f"cluster {lane.cluster.name}: {len(overlap.drained)} nodes drained at "
                        f"once at {overlap.at:.2f} (max_unavailable {MAX_UNAVAILABLE}): "
                        f"{drained}",
                    )
                )

    def _check_journals(self, run: int) -> None:
        for node in self.stack.nodes.values():
            if (node.state_dir / "journal.json").exists():
                self._once(
                    run,
                    f"journal:{node.node_id}:{run}",
                    f"{node.node_id}: an engine journal is still pending after the run",
                )
            disk, state = node.version_file(), node.installed_version()
            if disk != state:
                self._once(
                    run,
                    f"tree:{node.node_id}:{run}",
                    f"{node.node_id}: share/VERSION says {disk!r}, the engine state {state!r}",
                )

    def _check_traffic_roles(self, run: int) -> None:
        """Blue/green: once its traffic is switched, every node of a cluster serves as
        its colour says (active colour: active; the other: standby)."""
        for lane in self.lanes:
            cluster = Cluster.objects.get(pk=lane.cluster.pk)
            if "blue_green" not in lane.strategies or not cluster.active_color:
                continue
            if not Event.objects.filter(verb="bluegreen.switched", object_id=str(cluster.pk)):
                continue
            colors = dict(Node.objects.filter(cluster=cluster).values_list("node_id", "color"))

            def agree(
                cluster: Cluster = cluster, colors: dict[str, str] = colors, lane: Lane = lane
            ) -> bool:
                return all(
                    _role(node.state_dir)
                    == ("active" if colors[node.node_id] == cluster.active_color else "standby")
                    for node in lane.nodes
                )

            if not procs.wait_until(agree, 10, 0.3):
                roles = {n.node_id: _role(n.state_dir) for n in lane.nodes}
                self._once(
                    run,
                    f"roles:{cluster.pk}:{run}",
                    f"cluster {cluster.name}: active colour {cluster.active_color}, colours "
                    f"{colors}, but the nodes' traffic roles are {roles}",
                )

    def _once(self, run: int, key: str, what: str) -> None:
        """A finding that stays true is reported at the run it was first seen only."""
        if key not in self._seen:
            self._seen.add(key)
            self.violations.append(Violation(run, what))

    # ------------------------------------------------------------------ figures

    def faults(self) -> int:
        return self.process_faults + self.stack.agent_fault_count()

    def summary(self) -> str:
        return (
            f"chaos: {self.runs_done} runs, {self.faults()} faults, "
            f"{len(self.violations)} violations (seed {self.seed})"
        )


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _role(state_dir: Path) -> str:
    try:
        data = json.loads((state_dir / "traffic-role.json").read_text())
    except (OSError, ValueError):
        return ""
    role = data.get("role", "") if isinstance(data, dict) else ""
    return role if isinstance(role, str) else ""


def _idle(node: ChaosNode) -> bool:
    """No engine journal pending and the files on the version the engine state names."""
    return not (node.state_dir / "journal.json").exists() and (
        node.version_file() == node.installed_version()
    )
