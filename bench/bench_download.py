"""Node data path benchmark (plain script): the parallel downloader and delivery by parts.

    .venv/bin/python bench/bench_download.py [--scale 1.0] [--rate-mb 8] [--limit-mb 20]
        [--concurrency 4] [--repeats 3]

A release of 16 files, 256 MB in all (x SCALE), served by a real HTTP server on 127.0.0.1 in
a process of its own (tests/agent/file_server.py) that holds every connection to RATE MB/s
(1 MB = 10^6 bytes):

1. Concurrency: the 16 files with 4 connections against 1; the ratio of the times (target
   >= 3x; 4x is the ceiling the throttle allows).
2. A global limit of LIMIT MB/s over 4 connections (which could take 4 x RATE): the rate
   held, and its deviation from the limit (target within +-5 %).
3. Pipelined against download-then-verify, on the same bytes and the same 4 connections:
   pipelined is the node's delivery by parts (manifest and signature verified first, each
   file hashed as it arrives and staged when complete); download-then-verify fetches the 16
   files to disk unhashed, then hashes each into the same staging. The time saved (target
   >= 20 % faster), at RATE per connection and again over unthrottled loopback (where the
   verification is a larger share of the time); for information, the full bundle fetched
   over 4 ranges and then verified and staged by the engine.
4. Delivery by parts: a node running N (the 16 files) fetches N+1 (2 of them changed); the
   bytes it downloads against the full bundle's size.

Baseline for each figure: its counterpart in the same run (1 connection, no limit,
download-then-verify, the full bundle).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from updates.engine import apply as engine  # noqa: E402
from updates.engine.bundle import create_bundle, read_manifest, verify_bundle  # noqa: E402
from updates.engine.devpki import Pki, make_pki  # noqa: E402
from updates.engine.parts import open_parts_staging  # noqa: E402
from workers.fetch import DownloadTask, ParallelDownloader  # noqa: E402
from workers.parts import fetch_by_parts  # noqa: E402

MB = 1_000_000
FILES = 16
CHANGED = 2


class PlainSink:
    """Bytes to a file and nothing else: the download half of download-then-verify."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        self._held = 0

    @property
    def held(self) -> int:
        return self._held

    def write_at(self, offset: int, data: bytes) -> None:
        os.pwrite(self.fd, data, offset)
        self._held = max(self._held, offset + len(data))

    def truncate(self, length: int) -> None:
        os.ftruncate(self.fd, length)
        self._held = length

    def commit(self) -> None:
        os.close(self.fd)

    def discard(self) -> None:
        os.close(self.fd)

    def close(self) -> None:
        os.close(self.fd)


def _random_file(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as out:
        left = size
        while left:
            step = min(left, 1 << 20)
            out.write(os.urandom(step))
            left -= step


def _release(work: Path, pki: Pki, version: str, src: Path) -> Path:
    out = work / f"themisdb-{version}.tar"
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


def _serve_parts(served: Path, name: str, bundle: Path, src: Path) -> None:
    """What the dashboard stores for a release: manifest, signature, objects by SHA-256."""
    manifest_bytes, signature = read_manifest(bundle)
    directory = served / name
    directory.mkdir(parents=True)
    (directory / "manifest.json").write_bytes(manifest_bytes)
    (directory / "manifest.json.p7s").write_bytes(signature)
    from updates.engine.manifest import parse_manifest

    for entry in parse_manifest(manifest_bytes).files:
        target = directory / entry.sha256
        if not target.exists():
            os.link(src / entry.path, target)


class Server:
    def __init__(self, root: Path, rate: float | None) -> None:
        throttle = ["--rate", str(rate)] if rate else []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.agent.file_server", str(root), *throttle],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline())

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path}"

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(10)


def _sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scale", type=float, default=1.0, help="of 256 MB (0.25: 64 MB)")
    parser.add_argument("--rate-mb", type=float, default=8.0, help="per connection, MB/s")
    parser.add_argument("--limit-mb", type=float, default=20.0, help="global limit, MB/s")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="of each part-3 variant")
    parser.add_argument("--dir", type=Path, help="work directory (default: a temp dir)")
    args = parser.parse_args()
    file_size = int(16 * MB * args.scale)
    with tempfile.TemporaryDirectory(prefix="themis-bench-dl-", dir=args.dir) as tmp:
        work = Path(tmp)
        pki = make_pki(work / "pki")
        src_n, src_n1 = work / "src-n", work / "src-n1"
        names = ["bin/themisd"] + [f"lib/part{i:02d}.bin" for i in range(1, FILES)]
        for name in names:
            _random_file(src_n / name, file_size)
        shutil.copytree(src_n, src_n1)
        for name in names[:CHANGED]:
            _random_file(src_n1 / name, file_size)
        (src_n / "bin/themisd").chmod(0o755)
        (src_n1 / "bin/themisd").chmod(0o755)
        bundle_n = _release(work, pki, "1.0.0", src_n)
        bundle_n1 = _release(work, pki, "1.1.0", src_n1)
        served = work / "served"
        _serve_parts(served, "n1", bundle_n1, src_n1)
        os.link(bundle_n1, served / "n1.tar")
        print(
            f"release: {FILES} files of {file_size / MB:.1f} MB ({FILES * file_size / MB:.0f} MB),"
            f" server on 127.0.0.1 at {args.rate_mb:g} MB/s per connection"
        )
        server = Server(served, args.rate_mb * MB)
        loopback = Server(served, None)
        try:
            _run(args, work, pki, server, loopback, bundle_n, bundle_n1)
        finally:
            server.close()
            loopback.close()
    return 0


def _run(
    args: argparse.Namespace,
    work: Path,
    pki: Pki,
    server: Server,
    loopback: Server,
    bundle_n: Path,
    bundle_n1: Path,
) -> None:
    from updates.engine.manifest import parse_manifest

    manifest = parse_manifest(read_manifest(bundle_n1)[0])
    total = manifest.total_size
    runs = 0

    def tasks(dest: Path, *, plain: bool = False, via: Server = server) -> list[DownloadTask]:
        made = []
        for entry in manifest.files:
            url = via.url(f"n1/{entry.sha256}")
            path = dest / entry.path
            if plain:
                made.append(
                    DownloadTask(
                        url=url,
                        size=entry.size,
                        sha256=entry.sha256,
                        open_sink=lambda p=path: PlainSink(p),  # type: ignore[misc]
                        name=entry.path,
                    )
                )
            else:
                made.append(DownloadTask(url=url, size=entry.size, sha256=entry.sha256, dest=path))
        return made

    def fresh(name: str) -> Path:
        nonlocal runs
        runs += 1
        path = work / f"{name}-{runs}"
        path.mkdir()
        return path

    # 1. concurrency
    one = _timed(lambda: ParallelDownloader(concurrency=1).run(tasks(fresh("c1"))))
    many = _timed(lambda: ParallelDownloader(concurrency=args.concurrency).run(tasks(fresh("c4"))))
    print(f"1. concurrency: 1 connection {one:6.2f} s ({total / MB / one:5.1f} MB/s)")
    print(
        f"   {args.concurrency} connections {many:6.2f} s ({total / MB / many:5.1f} MB/s)"
        f"  -> {one / many:.2f}x faster (target >= 3x)"
    )

    # 2. global limit
    limit = args.limit_mb * MB
    limited = _timed(
        lambda: ParallelDownloader(concurrency=args.concurrency, limit_bps=limit).run(
            tasks(fresh("lim"))
        )
    )
    rate = total / limited
    print(
        f"2. global limit {args.limit_mb:g} MB/s over {args.concurrency} connections"
        f" (unlimited: {total / MB / many:.1f} MB/s): held {rate / MB:.2f} MB/s,"
        f" {100 * (rate - limit) / limit:+.1f} % (target within +-5 %)"
    )

    # 3. pipelined vs download-then-verify, same bytes, same connections, fresh node
    def pipelined(via: Server) -> None:
        node = fresh("pipe")
        (node / "state").mkdir()
        result = fetch_by_parts(
            via.url("n1/"),
            token="",
            state_dir=node / "state",
            target=node / "install",
            trust_anchor=pki.root,
            concurrency=args.concurrency,
        )
        assert result.files_fetched == FILES

    def then_verify(via: Server) -> None:
        node = fresh("seq")
        (node / "state").mkdir()
        downloads = node / "downloads"
        ParallelDownloader(concurrency=args.concurrency).run(tasks(downloads, plain=True, via=via))
        manifest_bytes, signature = read_manifest(bundle_n1)
        staging = open_parts_staging(
            manifest_bytes, signature, trust_anchor=pki.root, state_dir=node / "state"
        )
        for entry in staging.manifest.files:
            if not staging.stage_local(entry, downloads / entry.path):
                raise SystemExit(f"{entry.path}: wrong bytes")
        staging.finish()

    def bundle_then_verify(via: Server) -> None:
        node = fresh("bundle")
        (node / "state").mkdir()
        dest = node / "n1.tar"
        size, digest = bundle_n1.stat().st_size, _sha256(bundle_n1)
        task = DownloadTask(url=via.url("n1.tar"), size=size, sha256=digest, dest=dest)
        ParallelDownloader(concurrency=args.concurrency, split_bytes=MB).run([task])
        verify_bundle(dest, trust_anchor=pki.root, state_dir=node / "state", stage=True).cleanup()

    for label, via in (
        (f"{args.rate_mb:g} MB/s per connection", server),
        ("loopback, unthrottled", loopback),
    ):
        times: dict[str, list[float]] = {"seq": [], "pipe": [], "bundle": []}
        for _ in range(args.repeats):  # interleaved: a busy machine slows all alike
            times["seq"].append(_timed(lambda: then_verify(via)))  # noqa: B023
            times["pipe"].append(_timed(lambda: pipelined(via)))  # noqa: B023
            times["bundle"].append(_timed(lambda: bundle_then_verify(via)))  # noqa: B023
        seq, pipe, bundle = (statistics.median(times[k]) for k in ("seq", "pipe", "bundle"))
        print(
            f"3. ({label}, median of {args.repeats}) download-then-verify {seq:6.2f} s,"
            f" pipelined {pipe:6.2f} s -> pipelined {100 * (1 - pipe / seq):.1f} % faster"
            " (target >= 20 %)"
        )
        print(
            f"   for information: the full bundle over {args.concurrency} ranges, then"
            f" verify_bundle + stage: {bundle:6.2f} s (pipelined {100 * (1 - pipe / bundle):.1f} %"
            " faster)"
        )

    # 4. by parts: a node on N fetches N+1
    node = fresh("parts")
    state = node / "state"
    state.mkdir()
    engine.apply_bundle(bundle_n, target=node / "install", state_dir=state, trust_anchor=pki.root)
    fetched = {}

    def by_parts() -> None:
        result = fetch_by_parts(
            server.url("n1/"),
            token="",
            state_dir=state,
            target=node / "install",
            trust_anchor=pki.root,
            concurrency=args.concurrency,
        )
        fetched["bytes"] = result.bytes_fetched
        fetched["files"] = result.files_fetched
        result.staged.discard_if_unused()

    took = _timed(by_parts)
    full = bundle_n1.stat().st_size
    print(
        f"4. by parts, N -> N+1 ({CHANGED} of {FILES} files changed): downloaded"
        f" {fetched['bytes'] / MB:.1f} MB in {fetched['files']} files ({took:.2f} s) against"
        f" the full bundle's {full / MB:.1f} MB -> ratio {fetched['bytes'] / full:.3f}"
    )


if __name__ == "__main__":
    sys.exit(main())
