"""A real HTTP server for release bundles: agents download what they install (the
dashboard never sends a local path)."""

from __future__ import annotations

import functools
import shutil
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


class _TokenChecked(SimpleHTTPRequestHandler):
    """Serves a file only to a request bearing the download token, as the dashboard does."""

    token = ""

    def do_GET(self) -> None:
        if self.headers.get("Authorization") != f"Bearer {self.token}":
            self.send_error(403, "no valid download token")
            return
        super().do_GET()

    def log_message(self, format: str, *args: Any) -> None:
        return


class BundleServer:
    """Serves copies of the bundles it is given, from its own directory, to requests bearing
    `token` (the commands' `download_token`)."""

    def __init__(self, root: Path, token: str = "t") -> None:  # noqa: S107 - a test value
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        checked = type("Handler", (_TokenChecked,), {"token": token})
        handler = functools.partial(checked, directory=str(root))
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: Path) -> str:
        served = self.root / path.name
        if not served.exists():
            shutil.copyfile(path, served)
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{path.name}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
