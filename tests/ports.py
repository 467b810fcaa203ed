"""Ports for the servers tests start (no pytest, no Django: the test settings and the
benchmarks use it too).

A port the kernel hands out for `bind(0)` comes from its ephemeral range, which is also
where every outgoing connection gets its local port. A server that a test stops and starts
again on the same port (a broker restart) can then find it taken meanwhile: by a client's
connection, or by a client that connected to the dead port from that very port (TCP's
self-connect). So test servers listen below that range, on a port held (an flock the
kernel drops when the process dies) so that no other test process of the machine picks it
between this choice and the server's start."""

from __future__ import annotations

import fcntl
import os
import random
import socket
import tempfile
from pathlib import Path

RESERVED_PORTS = range(20000, 32768)
PORT_LOCKS = Path(tempfile.gettempdir()) / "themis-test-ports"
_held: list[int] = []  # open descriptors: a reservation lasts as long as this process


def reserved_port() -> int:
    """A port free now, below the ephemeral range, and held for this process's lifetime."""
    PORT_LOCKS.mkdir(parents=True, exist_ok=True)
    for port in random.sample(RESERVED_PORTS, 200):
        fd = os.open(PORT_LOCKS / f"{port}.lock", os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", port))
        except OSError:
            os.close(fd)
            continue
        _held.append(fd)
        return port
    raise RuntimeError(f"no free port in {RESERVED_PORTS} for a test server")
