#!/usr/bin/env python3
"""ThemisDB stand-in for the demo fleet (standard library only).

Installed on each demo node from a signed bundle as bin/themisd. Serves
/health, /version and /metrics on 127.0.0.1 and writes its metrics to a file
the node agent reads. It reads its version from share/VERSION on every request,
so an update shows at once. Touch the file `misbehave` in the state dir (or use
`manage.py demo_misbehave NODE`) and it answers errors and slowly, so a canary
gate can be seen failing.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class Service:
    def __init__(self, install: Path, state: Path) -> None:
        self.install, self.state = install, state
        self.metrics_file = state / "service-metrics.json"

    @property
    def version(self) -> str:
        try:
            return (self.install / "share" / "VERSION").read_text().strip()
        except OSError:
            return "unknown"

    @property
    def misbehaving(self) -> bool:
        return (self.state / "misbehave").exists()

    def metrics(self) -> dict[str, object]:
        if self.misbehaving:
            return {
                "error_rate": 0.12 + random.random() * 0.05,
                "p99_ms": 900 + random.random() * 300,
                "healthy": False,
                "version": self.version,
            }
        return {
            "error_rate": random.random() * 0.01,
            "p99_ms": 80 + random.random() * 60,
            "healthy": True,
            "version": self.version,
        }

    def write_metrics(self) -> None:
        tmp = self.metrics_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.metrics()))
        os.replace(tmp, self.metrics_file)


def handler_for(service: Service) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            if self.path == "/health":
                ok = not service.misbehaving
                self._json(200 if ok else 500, {"ok": ok, "version": service.version})
            elif self.path == "/version":
                self._json(200, {"version": service.version})
            elif self.path == "/metrics":
                self._json(200, service.metrics())
            else:
                self._json(404, {"error": "not found"})

        def _json(self, status: int, body: dict[str, object]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    return Handler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--install", type=Path, required=True)
    parser.add_argument("--state", type=Path, required=True)
    args = parser.parse_args()
    service = Service(args.install, args.state)

    def keep_writing() -> None:
        while True:
            service.write_metrics()
            time.sleep(1)

    threading.Thread(target=keep_writing, daemon=True).start()
    ThreadingHTTPServer(("127.0.0.1", args.port), handler_for(service)).serve_forever()


if __name__ == "__main__":
    main()
