"""End to end: real Redis, a real coordinator, two real agents. A separate process
holding only one agent's broker environment (its URL and that node's key) orders the
other node to downgrade to an older, genuinely signed release and replays that node's
captured reports. The victim's installed version on disk and the dashboard's state do
not move; the attempts are counted and in the audit log."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import procs
from tests.factories import make_cluster, make_node, make_tenant
from tests.fleet_stack import BASE, NEW, RealFleet, StartFleet
from tests.helpers import MakeBundle, publish_bundle, tree
from updates.jobs import services as jobs
from updates.models import Event, Node, ReportRejection, UpdateJob
from updates.releases.artifacts import artifact_url, job_download_token

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

R = ReportRejection.Reason


def _attacker(env: dict[str, str], *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "tests.security.attacker", *args],
        env=env,
        cwd=procs.ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def _count(node_id: str, reason: str) -> int:
    row = ReportRejection.objects.filter(source=node_id, reason=reason).first()
    return row.count if row is not None else 0


def _applies(real: RealFleet, node: Node) -> list[str]:
    log = real.tmp / node.node_id / "state" / "applies.log"
    return (
        [json.loads(line)["job"] for line in log.read_text().splitlines()] if log.exists() else []
    )


def test_an_agents_credentials_cannot_downgrade_another_node_or_replay_its_reports(
    real_fleet: StartFleet, make_bundle: MakeBundle, tmp_path: Path
) -> None:
    tenant = make_tenant()
    cluster = make_cluster(tenant=tenant, name="main")
    attacker, victim = (
        make_node(node_id=n, tenant=tenant, cluster=cluster, installed_version="1.6.0")
        for n in ("db-0", "db-1")
    )
    real = real_fleet([attacker, victim])
    online = procs.wait_until(
        lambda: Node.objects.filter(status=Node.Status.ONLINE).count() == 2, 60, 0.3
    )
    assert online, real.logs()
    # What the compromised node holds: its own agent environment, nothing else.
    attacker_env = procs.agent_env(real.env["REDIS_URL"], "db-0", tmp_path / "stolen")
    captured = tmp_path / "captured.json"
    _attacker(attacker_env, "capture", str(captured), "db-1", "20")
    assert json.loads(captured.read_text()), "no report of db-1 captured"

    old_bundle = make_bundle("1.6.0", files=BASE)
    old = publish_bundle(old_bundle, "1.6.0")
    new = publish_bundle(make_bundle("1.7.0", files=NEW), "1.7.0")
    job = jobs.job_start_update(node=victim, release=new, user=None)
    done = procs.wait_until(
        lambda: UpdateJob.objects.get(pk=job.pk).state in UpdateJob.FINAL_STATES, 90, 0.3
    )
    assert done and UpdateJob.objects.get(pk=job.pk).state == "DONE", real.logs()
    assert tree(real.install(victim)) == NEW
    procs.wait_until(lambda: Node.objects.get(pk=victim.pk).installed_version == "1.7.0", 10)

    # A genuine download for the old release, as the attacker may have seen one go by.
    bait = UpdateJob.objects.create(node=attacker, release=old, state=UpdateJob.State.CANCELLED)
    before_jobs = set(UpdateJob.objects.values_list("pk", flat=True))
    spec = {
        "attacker": "db-0",
        "victim": "db-1",
        "job_id": str(bait.pk + 1000),
        "sha256": old.sha256,
        "version": "1.6.0",
        "artifact_url": artifact_url(bait),
        "download_token": job_download_token(bait),
        "bundle_path": str(old_bundle),
        "captured": str(captured),
        "replays": 3,
    }
    started = time.monotonic()
    sent: dict[str, int] = json.loads(_attacker(attacker_env, "attack", json.dumps(spec)))
    assert sent["orders"] == 3 and sent["replayed"] >= 3

    def attempts_counted() -> bool:
        return (
            _count("db-1", R.REPLAYED) >= sent["replayed"]
            and _count("db-1", R.COMMAND_REFUSED) >= sent["orders"]
        )

    assert procs.wait_until(attempts_counted, 60, 0.3), real.logs()
    measured = time.monotonic() - started
    # The victim: same files, same version, nothing applied since the genuine job.
    assert tree(real.install(victim)) == NEW
    assert _applies(real, victim) == [str(job.pk)]
    node = Node.objects.get(pk=victim.pk)
    assert node.installed_version == "1.7.0" and node.status == Node.Status.ONLINE
    assert set(UpdateJob.objects.values_list("pk", flat=True)) == before_jobs
    assert UpdateJob.objects.get(pk=job.pk).state == "DONE"
    # The audit log shows it: one counted-rejection Event for the victim this interval.
    events = Event.objects.filter(verb="report.rejected", details__node_id="db-1")
    assert events.count() == 1
    agent_log = real.agents["db-1"].output()
    assert "command refused by db-1" in agent_log
    print(f"attack refused and counted within {measured:.1f} s")
