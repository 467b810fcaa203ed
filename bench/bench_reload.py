"""Hot reload under load: failed requests and switch-to-serving time, against a naive restart.

    .venv/bin/python bench/bench_reload.py [--connections 1000] [--cycles 10] [--restarts 5]

A keep-alive load generator on 127.0.0.1 keeps `--connections` connections busy against
one demo node whose service runs under the supervisor (`themis-update service run`).
Meanwhile the node's agent code (workers.agent's apply and rollback tasks, called with
signed commands; the bundles downloaded over HTTP from 127.0.0.1) alternates updates and
rollbacks, `--cycles` of each. Printed: failed requests (refused, reset, 5xx) and, per
reload, the time from "files switched" (the engine's report) to the first answer of the
new process (median, max). Baseline, in the same run: the naive restart (SIGTERM the
service, then start the new one on the port) with the same load, `--restarts` times.
Aim: 0 failed requests, switch-to-serving <= 1 s.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# This process plays the node's agent: the Celery app is made in agent mode.
os.environ["THEMIS_NODE_ID"] = "bench-1"

from tests import procs  # noqa: E402
from tests.agent.bundle_server import BundleServer  # noqa: E402
from tests.service_load import LoadGenerator, LoadReport  # noqa: E402
from themis_dashboard.celery import app  # noqa: E402
from updates.engine.apply import apply_bundle  # noqa: E402
from updates.engine.bundle import create_bundle  # noqa: E402
from updates.engine.commands import CommandType, sign_command  # noqa: E402
from updates.engine.devpki import make_pki  # noqa: E402
from workers import agent  # noqa: E402

KEY = bytes(range(32))
SERVICE = (ROOT / "themis_dashboard" / "demo" / "service.py").read_bytes()


class Reports:
    """The agent's reports, timestamped (the broker is left out: send_task records)."""

    def __init__(self) -> None:
        self.sent: list[tuple[float, str, dict[str, Any]]] = []

    def send_task(self, name: str, kwargs: dict[str, Any], queue: str) -> None:
        self.sent.append((time.monotonic(), name, dict(kwargs["envelope"]["payload"])))

    def step_time(self, job_id: str, step: str) -> float:
        return next(
            t for t, _n, p in self.sent if p.get("job_id") == job_id and p.get("step") == step
        )

    def final(self, job_id: str) -> dict[str, Any]:
        return next(
            p for _t, n, p in self.sent if n == agent.FINISHED_TASK and p["job_id"] == job_id
        )


def signed_command(command: CommandType, args: dict[str, Any], *, job_id: str) -> dict[str, Any]:
    return sign_command(
        KEY,
        node_id="bench-1",
        job_id=job_id,
        command=command,
        args=args,
        expires=time.time() + 600,
    )


def _bundle(tmp: Path, pki: Any, version: str) -> Path:
    src = tmp / f"src-{version}"
    (src / "bin").mkdir(parents=True)
    (src / "share").mkdir()
    (src / "bin" / "themisd").write_bytes(SERVICE)
    (src / "share" / "VERSION").write_text(f"{version}\n")
    out = tmp / f"themisdb-{version}.tar"
    create_bundle(
        src,
        product="themisdb",
        version=version,
        key_path=pki.leaf.key,
        cert_path=pki.leaf.cert,
        chain_path=pki.chain,
        out_path=out,
    )
    return out


def _serving_after(report: LoadReport, since: float, old_pids: set[int]) -> float | None:
    """Seconds from `since` to the first answer by a process other than `old_pids`."""
    first = next((t for t, pid, _v in report.answers if t >= since and pid not in old_pids), None)
    return None if first is None else first - since


def run_reloads(tmp: Path, connections: int, cycles: int) -> tuple[LoadReport, list[float]]:
    pki = make_pki(tmp / "pki")
    install, state = tmp / "node" / "install", tmp / "node" / "state"
    apply_bundle(_bundle(tmp, pki, "1.0.0"), target=install, state_dir=state, trust_anchor=pki.root)
    port = procs.free_port()
    supervisor = procs.supervised_service("supervisor", port, install, state, tmp)
    server = BundleServer(tmp / "served")
    reports = Reports()
    app.send_task = reports.send_task  # type: ignore[method-assign,assignment]
    env = {
        "THEMIS_NODE_ID": "bench-1",
        "THEMIS_NODE_KEY": KEY.hex(),
        "THEMIS_INSTALL_DIR": str(install),
        "THEMIS_STATE_DIR": str(state),
        "THEMIS_TRUST_ANCHOR": str(pki.root),
        "THEMIS_HEALTH_URL": f"http://127.0.0.1:{port}/health",
        "THEMIS_HEARTBEAT_SECONDS": "60",
    }
    os.environ.update(env)
    switch_to_serving: list[float] = []
    try:
        with LoadGenerator("127.0.0.1", port, connections=connections) as load:
            if not load.wait_for_answers(connections * 5, 60):
                raise SystemExit(f"the load never got going: {load.report.failures}")
            for cycle in range(1, cycles + 1):
                version = f"1.{cycle}.0"
                bundle = _bundle(tmp, pki, version)
                args = {
                    "sha256": hashlib.sha256(bundle.read_bytes()).hexdigest(),
                    "artifact_url": server.url(bundle),
                    "download_token": "t",
                    "version": version,
                    "health_timeout": 30,
                }
                pids = set(load.report.pids())
                job = f"u{cycle}"
                agent.apply_release(envelope=signed_command(CommandType.APPLY, args, job_id=job))
                _check(reports.final(job), job)
                switched = reports.step_time(job, "SWITCHED")
                switch_to_serving.append(_wait_serving(load, switched, pids))
                pids = set(load.report.pids())
                job = f"r{cycle}"
                envelope = signed_command(CommandType.ROLLBACK, {"point_id": None}, job_id=job)
                agent.rollback_node(envelope=envelope)
                _check(reports.final(job), job)
                restored = reports.step_time(job, "COMMITTED")
                switch_to_serving.append(_wait_serving(load, restored, pids))
                print(f"  cycle {cycle}: update and rollback done, {load.report.failed} failed")
        return load.report, switch_to_serving
    finally:
        server.close()
        supervisor.kill(signal.SIGTERM)


def _check(final: dict[str, Any], job: str) -> None:
    if not final["ok"]:
        raise SystemExit(f"job {job} failed: {final['error_code']} {final['error_message']}")


def _wait_serving(load: LoadGenerator, since: float, old: set[int]) -> float:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        seconds = _serving_after(load.report, since, old)
        if seconds is not None:
            return seconds
        time.sleep(0.01)
    raise SystemExit("the new version never answered")


def run_naive(tmp: Path, connections: int, restarts: int) -> tuple[LoadReport, list[float]]:
    """Stop, then start: the service binds the port itself (no supervisor)."""
    install, state = tmp / "naive" / "install", tmp / "naive" / "state"
    (install / "bin").mkdir(parents=True)
    (install / "share").mkdir()
    state.mkdir(parents=True)
    (install / "bin" / "themisd").write_bytes(SERVICE)
    port = procs.free_port()

    def start(version: str) -> procs.Proc:
        (install / "share" / "VERSION").write_text(f"{version}\n")
        argv = [sys.executable, str(install / "bin" / "themisd"), "--port", str(port)]
        argv += ["--install", str(install), "--state", str(state), "--grace", "1"]
        return procs.spawn("naive", argv, procs.inherited_env(), tmp, append=True)

    service = start("1.0.0")
    procs.wait_until(lambda: procs.port_open(port), 15)
    outages: list[float] = []
    with LoadGenerator("127.0.0.1", port, connections=connections) as load:
        load.wait_for_answers(connections * 5, 60)
        for n in range(1, restarts + 1):
            pids = set(load.report.pids())
            stopped = time.monotonic()
            service.kill(signal.SIGTERM)
            service = start(f"1.{n}.0")
            outages.append(_wait_serving(load, stopped, pids))
            time.sleep(1)
    service.kill(signal.SIGTERM)
    return load.report, outages


def _print_run(label: str, report: LoadReport, times: list[float], since: str, what: str) -> None:
    median, worst = statistics.median(times) * 1000, max(times) * 1000
    print(f"{label:14}: {report.ok} requests ok, {report.failed} failed {dict(report.failures)}")
    print(
        f"{'':16}{since} -> new version serving: median {median:.0f} ms, max {worst:.0f} ms"
        f" over {len(times)} {what}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--cycles", type=int, default=10, help="updates (and as many rollbacks)")
    parser.add_argument("--restarts", type=int, default=5, help="naive restarts (baseline)")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = max(soft, min(hard, 4 * args.connections + 1024))
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        cycles = f"{args.cycles} updates + {args.cycles} rollbacks"
        print(f"hot reload: {args.connections} keep-alive connections, {cycles}")
        report, times = run_reloads(tmp, args.connections, args.cycles)
        print(f"naive restart: {args.connections} connections, {args.restarts} restarts")
        naive, outages = run_naive(tmp, args.connections, args.restarts)
    print()
    _print_run("hot reload", report, times, "switch", "reloads (aim <= 1000 ms)")
    _print_run("naive restart", naive, outages, "stop", "restarts")
    reload_rate = report.failed / len(times)
    naive_rate = naive.failed / max(len(outages), 1)
    ratio = reload_rate / naive_rate if naive_rate else 0.0
    print(
        f"failed requests per switch: hot reload {reload_rate:.1f}, naive {naive_rate:.1f}"
        f" (ratio to the naive baseline {ratio:.3f})"
    )
    return 0 if report.failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
