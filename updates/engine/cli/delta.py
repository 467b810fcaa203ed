"""`themis-update delta create|apply|info`: binary delta patches (see delta.py)."""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any, TextIO

from .. import delta


def register(sub: Any) -> None:
    parser = sub.add_parser("delta", help="create, apply and inspect binary delta patches")
    group = parser.add_subparsers(dest="delta_command", metavar="ACTION")

    create = group.add_parser("create", help="diff OLD -> NEW into a patch")
    create.add_argument("old", type=Path, metavar="OLD")
    create.add_argument("new", type=Path, metavar="NEW")
    create.add_argument("-o", "--output", type=Path, required=True, metavar="PATCH")
    create.add_argument("--algorithm", choices=delta.ALGORITHMS, default="auto")
    create.set_defaults(handler=_create)

    apply = group.add_parser("apply", help="rebuild NEW from OLD + PATCH, verified")
    apply.add_argument("old", type=Path, metavar="OLD")
    apply.add_argument("patch", type=Path, metavar="PATCH")
    apply.add_argument("-o", "--output", type=Path, required=True, metavar="OUT")
    apply.add_argument("--expect-sha256", metavar="HEX", help="refuse unless the result has it")
    apply.set_defaults(handler=_apply)

    info = group.add_parser("info", help="print a patch's header as JSON")
    info.add_argument("patch", type=Path, metavar="PATCH")
    info.set_defaults(handler=_info)


def _create(args: argparse.Namespace) -> int:
    with ProgressLine(sys.stderr) as progress:
        result = delta.create_patch(
            args.old, args.new, args.output, algorithm=args.algorithm, progress=progress
        )
    print(json.dumps(result.to_json(), indent=2, sort_keys=True))
    return 0


def _apply(args: argparse.Namespace) -> int:
    with ProgressLine(sys.stderr) as progress:
        result = delta.apply_patch(
            args.old,
            args.patch,
            args.output,
            expect_sha256=args.expect_sha256,
            progress=progress,
        )
    print(json.dumps(result.to_json(), indent=2, sort_keys=True))
    return 0


def _info(args: argparse.Namespace) -> int:
    print(delta.header_json(delta.read_header(args.patch)))
    return 0


class ProgressLine:
    """A one-line phase + elapsed-time indicator on stderr, only on a TTY.

    The diff itself is one long C call with no progress hook, so a ticker
    thread keeps the elapsed time moving; redirected stderr stays clean.
    """

    def __init__(self, stream: TextIO, interval: float = 0.2) -> None:
        self.stream = stream
        self.enabled = bool(getattr(stream, "isatty", lambda: False)())
        self.interval = interval
        self.phase = ""
        self.started = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __call__(self, phase: str) -> None:
        self.phase = phase
        self._draw()

    def __enter__(self) -> ProgressLine:
        if self.enabled:
            self._thread = threading.Thread(target=self._tick, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self.stream.write("\r\x1b[K")
            self.stream.flush()

    def _tick(self) -> None:
        while not self._stop.wait(self.interval):
            self._draw()

    def _draw(self) -> None:
        if not self.enabled:
            return
        spinner = "|/-\\"[int(time.monotonic() / self.interval) % 4]
        elapsed = time.monotonic() - self.started
        self.stream.write(f"\r\x1b[K{spinner} {self.phase} {elapsed:5.1f}s")
        self.stream.flush()
