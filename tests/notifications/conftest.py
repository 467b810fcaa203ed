"""Fixtures for notifications: real HTTP servers on 127.0.0.1 that record what
they receive and answer as told, and a recorder for Celery nudges so unit
tests can run the delivery pipeline step by step in-process."""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

import pytest
from pytest_django import Settings

from tenants.models import Tenant
from updates.notifications import dispatch, services
from updates.notifications.models import Channel

SLACK_PATH = "/services/T0000/B0000/XXXXSECRETXXXX"
ROUTING_KEY = "R0UT1NGKEY0123456789abcdef012345"
SIGNING_SECRET = "s3cret-signing-key-for-tests"


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Receiver:
    """A recording endpoint. `answer(...)` queues scripted responses; after those
    it answers `default` (200 "ok" unless changed)."""

    server: ThreadingHTTPServer
    requests: list[Received] = field(default_factory=list)
    script: deque[tuple[int, dict[str, str], bytes]] = field(default_factory=deque)
    default: tuple[int, dict[str, str], bytes] = (200, {}, b"ok")
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        assert isinstance(host, str)  # an AF_INET server: a dotted-quad string
        return f"http://{host}:{port}"

    def answer(self, *responses: tuple[int, dict[str, str], bytes]) -> None:
        self.script.extend(responses)

    def wait_for(self, count: int, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.requests) >= count:
                return True
            time.sleep(0.05)
        return len(self.requests) >= count


def _handler(receiver: Receiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            with receiver.lock:
                receiver.requests.append(
                    Received(self.path, dict(self.headers.items()), body, time.monotonic())
                )
                status, headers, reply = (
                    receiver.script.popleft() if receiver.script else receiver.default
                )
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args: Any) -> None:  # keep test output quiet
            pass

    return Handler


StartReceiver = Callable[[], Receiver]


@pytest.fixture
def receivers() -> Iterator[StartReceiver]:
    """Factory: `receivers()` starts one more recording server."""
    started: list[Receiver] = []

    def start() -> Receiver:
        server = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
        receiver = Receiver(server)
        server.RequestHandlerClass = _handler(receiver)
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        started.append(receiver)
        return receiver

    yield start
    for receiver in started:
        receiver.server.shutdown()
        receiver.server.server_close()


@pytest.fixture
def receiver(receivers: StartReceiver) -> Receiver:
    return receivers()


@pytest.fixture
def notify_settings(settings: Settings) -> Settings:
    settings.THEMIS_NOTIFY_ALLOW_HTTP = True
    # The tests' receivers listen on loopback, which the egress guard refuses unless allowed.
    settings.THEMIS_NOTIFY_EGRESS_ALLOW = ["127.0.0.1"]
    settings.THEMIS_NOTIFY_MAX_ATTEMPTS = 3
    settings.THEMIS_NOTIFY_BACKOFF_BASE_MS = 20
    settings.THEMIS_NOTIFY_BACKOFF_MAX_MS = 200
    settings.THEMIS_NOTIFY_TIMEOUT_SECONDS = 2
    settings.THEMIS_NOTIFY_BATCH_WINDOW_MS = 500
    settings.THEMIS_DASHBOARD_URL = "https://themis.example.test"
    return settings


@dataclass
class Nudges:
    """Celery messages the code would have sent, runnable in-process."""

    sent: list[tuple[str, int, float]] = field(default_factory=list)

    def record(self, task_name: str, delivery_id: int, *, countdown: float = 0) -> None:
        self.sent.append((task_name, delivery_id, countdown))

    def run(self, *, max_rounds: int = 50) -> int:
        """Run queued nudges (and the ones they queue) as the worker would, through the
        tasks the names stand for; countdowns are skipped by moving the delivery's due
        time to now."""
        from django.utils import timezone

        from updates.notifications import tasks
        from updates.notifications.models import Delivery

        by_name = {task.name: task for task in (tasks.deliver, tasks.flush_batch)}
        ran = 0
        while self.sent and ran < max_rounds * 100:
            task, pk, _countdown = self.sent.pop(0)
            Delivery.objects.filter(pk=pk, status__in=Delivery.OPEN_STATES).update(
                next_attempt_at=timezone.now()
            )
            by_name[task](pk)
            ran += 1
        return ran


@pytest.fixture
def nudges(monkeypatch: pytest.MonkeyPatch) -> Nudges:
    recorder = Nudges()
    monkeypatch.setattr(dispatch, "enqueue", recorder.record)
    return recorder


class MakeChannel(Protocol):
    """The type of the `make_channel` fixture."""

    def __call__(
        self,
        channel_type: str,
        url: str = "",
        *,
        tenant: Tenant | None = None,
        kinds: list[str] | None = None,
        name: str | None = None,
    ) -> Channel: ...


@pytest.fixture
def make_channel(db: None, notify_settings: Settings) -> MakeChannel:
    def make(
        channel_type: str,
        url: str = "",
        *,
        tenant: Tenant | None = None,
        kinds: list[str] | None = None,
        name: str | None = None,
    ) -> Channel:
        from updates.notifications.kinds import PAGERDUTY_KINDS, Kind

        secrets = {
            Channel.Type.SLACK: {"url": url + SLACK_PATH},
            Channel.Type.PAGERDUTY: {"routing_key": ROUTING_KEY},
            Channel.Type.WEBHOOK: {"url": url + "/hook", "signing_secret": SIGNING_SECRET},
        }[Channel.Type(channel_type)]
        if channel_type == Channel.Type.PAGERDUTY:
            notify_settings.THEMIS_PAGERDUTY_EVENTS_URL = url + "/v2/enqueue"
        default_kinds = PAGERDUTY_KINDS if channel_type == "pagerduty" else Kind.values
        return services.channel_create(
            name=name or f"{channel_type} channel",
            channel_type=channel_type,
            tenant=tenant,
            kinds=list(kinds if kinds is not None else default_kinds),
            secrets=secrets,
            user=None,
        )

    return make
