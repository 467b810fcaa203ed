"""Delta benchmark: themis-update's algorithms side by side with the bsdiff,
xdelta3 and zstd CLIs on generated release pairs (see gen.py).

    .venv/bin/python bench/delta/run.py --sizes 20,100     # full (~6 min)
    .venv/bin/python bench/delta/run.py --quick            # 8 MB, no bsdiff

Every measurement is its own child process; wall time and peak RSS come from
os.wait4, whose rusage covers the child and its reaped children.  "apply"
means what a node does: hash the base, rebuild, hash the result, durable
write (fsync) — the CLIs get the same `sha256sum` + `sync FILE` around them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.delta.gen import Pair, make_pair  # noqa: E402

PY = sys.executable
THEMIS = [PY, "-m", "updates.engine", "delta"]


@dataclass
class Row:
    size_mb: int
    tool: str
    patch_bytes: int = 0
    create_s: float = 0.0
    create_cpu_s: float = 0.0  # user + system: less sensitive to a busy machine
    create_mb: float = 0.0
    apply_s: float = 0.0
    apply_mb: float = 0.0
    apply_inproc_s: float | None = None  # themis: apply_patch() alone, no interpreter start
    ok: bool = False
    note: str = ""


@dataclass(frozen=True)
class Tool:
    name: str
    create: str  # shell templates with {old} {new} {patch} {out}
    apply: str
    needs: str = ""
    max_mb: int = 10**6  # skipped above this size (too slow for the run)


VERIFY = "sha256sum {old} >/dev/null && {cmd} && sha256sum {out} >/dev/null && sync {out}"
TOOLS = (
    Tool(
        "themis auto",
        " ".join(THEMIS) + " create {old} {new} -o {patch} --algorithm auto",
        " ".join(THEMIS) + " apply {old} {patch} -o {out}",
    ),
    Tool(
        "themis zstd",
        " ".join(THEMIS) + " create {old} {new} -o {patch} --algorithm zstd",
        " ".join(THEMIS) + " apply {old} {patch} -o {out}",
    ),
    Tool(
        "themis bsdiff4",
        " ".join(THEMIS) + " create {old} {new} -o {patch} --algorithm bsdiff4",
        " ".join(THEMIS) + " apply {old} {patch} -o {out}",
        max_mb=20,
    ),
    Tool("bsdiff CLI", "bsdiff {old} {new} {patch}", "bspatch {old} {out} {patch}", "bspatch"),
    Tool(
        "xdelta3 -9",
        "xdelta3 -e -9 -f -B {window} -s {old} {new} {patch}",
        "xdelta3 -d -f -B {window} -s {old} {patch} {out}",
        "xdelta3",
    ),
    Tool(
        "zstd -19 --long",
        "zstd -q -f -19 --long=27 --patch-from={old} {new} -o {patch}",
        "zstd -q -f -d --long=27 --patch-from={old} {patch} -o {out}",
        "zstd",
    ),
)


def measure(command: str) -> tuple[float, float, str, float]:
    """Run `command` in a shell; (wall seconds, peak RSS MB, stdout, CPU seconds)."""
    started = time.perf_counter()
    proc = subprocess.Popen(  # noqa: S602 - commands are our own templates
        command, shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT
    )
    assert proc.stdout is not None and proc.stderr is not None
    out, err = proc.stdout.read(), proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{command!r} failed ({proc.returncode}): {err.decode()[-300:]}")
    return elapsed, usage.ru_maxrss / 1024, out.decode(), usage.ru_utime + usage.ru_stime


def run_tool(tool: Tool, pair: Pair, size_mb: int, work: Path) -> Row:
    row = Row(size_mb, tool.name)
    if tool.needs and shutil.which(tool.needs) is None:
        row.note = f"{tool.needs} not installed"
        return row
    if size_mb > tool.max_mb:
        row.note = f"skipped above {tool.max_mb} MB (slow)"
        return row
    slug = tool.name.replace(" ", "_").replace("-", "")
    names = {
        "old": shlex.quote(str(pair.old)),
        "new": shlex.quote(str(pair.new)),
        "patch": shlex.quote(str(work / f"{slug}-{size_mb}.patch")),
        "out": shlex.quote(str(work / f"{slug}-{size_mb}.out")),
        "window": str(1 << (pair.new.stat().st_size * 2).bit_length()),
    }
    row.create_s, row.create_mb, _, row.create_cpu_s = measure(tool.create.format(**names))
    row.patch_bytes = (work / f"{slug}-{size_mb}.patch").stat().st_size
    apply_cmd = tool.apply.format(**names)
    if not tool.name.startswith("themis"):  # themis does both hashes + fsync itself
        apply_cmd = VERIFY.format(cmd=apply_cmd, **names)
    row.apply_s, row.apply_mb, stdout, _ = measure(apply_cmd)
    if tool.name.startswith("themis"):
        row.apply_inproc_s = json.loads(stdout)["seconds"]
    row.ok = _sha256(work / f"{slug}-{size_mb}.out") == pair.new_sha256
    return row


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def table(rows: list[Row]) -> str:
    head = (
        "| size | tool | patch | create s | (cpu s) | create MB "
        "| apply s | (in-proc) | apply MB | ok |"
    )
    lines = [head, "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if r.note:
            lines.append(f"| {r.size_mb} MB | {r.tool} | {r.note} | | | | | | | |")
            continue
        ok = "yes" if r.ok else "NO"
        inproc = "" if r.apply_inproc_s is None else f"{r.apply_inproc_s:.2f}"
        lines.append(
            f"| {r.size_mb} MB | {r.tool} | {r.patch_bytes / 1e6:.2f} MB | {r.create_s:.1f} "
            f"| {r.create_cpu_s:.1f} | {r.create_mb:.0f} | {r.apply_s:.2f} | {inproc} "
            f"| {r.apply_mb:.0f} | {ok} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description="binary delta benchmark")
    parser.add_argument("--sizes", default="20,100", help="comma-separated MB, e.g. 20,100")
    parser.add_argument("--quick", action="store_true", help="8 MB only, without bsdiff")
    parser.add_argument("--tools", default="", help="comma-separated subset of tool names")
    parser.add_argument("--data", type=Path, default=ROOT / "var" / "bench-delta")
    args = parser.parse_args()
    sizes = [8] if args.quick else [int(s) for s in args.sizes.split(",")]
    tools = [t for t in TOOLS if not args.tools or t.name in args.tools.split(",")]
    if args.quick:
        tools = [t for t in tools if "bsdiff" not in t.name]
    work = args.data / "work"
    work.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    for size_mb in sizes:
        pair = make_pair(size_mb, args.data)
        print(f"# {size_mb} MB pair: {pair.changed_fraction:.1%} changed", file=sys.stderr)
        for tool in tools:
            rows.append(run_tool(tool, pair, size_mb, work))
            print(f"  {rows[-1]}", file=sys.stderr)
    (args.data / f"results-{int(time.time())}.json").write_text(
        json.dumps([asdict(r) for r in rows], indent=2)
    )
    print(table(rows))


if __name__ == "__main__":
    main()
