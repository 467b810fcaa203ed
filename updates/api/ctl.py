"""`themis-ctl`: the API from a pipeline or a shell.

A plain HTTP client (requests): it imports nothing of the dashboard, so it runs anywhere
Python does. The token comes from THEMIS_TOKEN, the dashboard's address from THEMIS_URL
(or --token / --url). Every create sends an Idempotency-Key, and a create whose answer was
lost (connection error, 5xx, 429) is sent again with the same key: the dashboard answers the
retry with the first response and starts nothing twice.

Exit codes (also in the README):
  0 done; with `rollout status --wait`: the rollout completed
  1 unexpected error                     2 usage
  3 the rollout ended without completing (failed, aborted, cancelled)
  4 the rollout waits for a person (awaiting approval, or paused)
  5 --wait timed out
  10 not authenticated (no, unknown, expired or revoked token)
  11 forbidden (the token's scope or the user's role does not allow it)
  12 not found (or not visible to this token)
  13 invalid request (the message names the field)
  14 conflict (the object's state does not allow it)
  15 throttled                           16 dashboard unreachable or failing (5xx)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import requests

OK, UNEXPECTED, USAGE = 0, 1, 2
ROLLOUT_UNSUCCESSFUL, ROLLOUT_NEEDS_PERSON, WAIT_TIMEOUT = 3, 4, 5
UNAUTHENTICATED, FORBIDDEN, NOT_FOUND, INVALID, CONFLICT, THROTTLED, UNAVAILABLE = (
    10,
    11,
    12,
    13,
    14,
    15,
    16,
)
_BY_STATUS = {
    400: INVALID, 401: UNAUTHENTICATED, 403: FORBIDDEN, 404: NOT_FOUND, 405: INVALID,
    409: CONFLICT, 413: INVALID, 415: INVALID, 422: INVALID, 429: THROTTLED,
}  # fmt: skip
FINAL_OK = {"COMPLETED"}
FINAL_BAD = {"FAILED", "ABORTED", "CANCELLED"}
NEEDS_PERSON = {"AWAITING_APPROVAL", "PAUSED"}
RETRIES = 3


class CtlError(Exception):
    def __init__(self, exit_code: int, message: str, body: Any = None) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.message = message
        self.body = body


@dataclass
class Client:
    url: str
    token: str
    timeout: float = 60.0

    def request(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        params: dict[str, Any] | None = None,
        files: dict[str, Any] | None = None,
        data: dict[str, Any] | None = None,
        create: bool = False,
        idempotency_key: str | None = None,
    ) -> Any:
        """One API call; an error answer raises CtlError with the exit code it maps to."""
        url = path if path.startswith(("http://", "https://")) else f"{self.url}/api/v1{path}"
        headers = {"Authorization": f"Bearer {self.token}", "Accept": "application/json"}
        if create:
            headers["Idempotency-Key"] = idempotency_key or str(uuid.uuid4())
        attempts = RETRIES if create else 1
        for attempt in range(1, attempts + 1):
            # A retry sends the file again from its start.
            for _name, handle in (files or {}).values():
                handle.seek(0)
            try:
                response = requests.request(
                    method,
                    url,
                    headers=headers,
                    json=json_body,
                    params=params,
                    files=files,
                    data=data,
                    timeout=self.timeout,
                )
            except requests.RequestException as err:
                if attempt < attempts:
                    time.sleep(attempt)
                    continue
                raise CtlError(UNAVAILABLE, f"cannot reach {self.url}: {err}") from None
            if (response.status_code >= 500 or response.status_code == 429) and attempt < attempts:
                time.sleep(_retry_after(response, attempt))
                continue
            return _answer(response)
        raise AssertionError("unreachable")  # pragma: no cover

    def pages(self, path: str, params: dict[str, Any]) -> Iterator[Any]:
        """Every item of a paginated list, following `next`."""
        body = self.request("GET", path, params=params)
        while True:
            yield from body["results"]
            if not body.get("next"):
                return
            body = self.request("GET", body["next"])


def _retry_after(response: requests.Response, attempt: int) -> float:
    text = response.headers.get("Retry-After", "")
    seconds = float(text) if text.isascii() and text.isdigit() else float(attempt)
    return min(seconds, 30.0)


def _answer(response: requests.Response) -> Any:
    try:
        body = response.json() if response.content else None
    except ValueError:
        body = None
    if response.status_code < 400:
        return body
    code = _BY_STATUS.get(response.status_code, UNAVAILABLE)
    if isinstance(body, dict) and "message" in body:
        message = f"{body.get('code', 'error')}: {body['message']}"
    else:
        message = f"HTTP {response.status_code} from {response.url}"
    raise CtlError(code, message, body)


# ------------------------------------------------------------------ output


def _emit(args: argparse.Namespace, body: Any, line: str) -> None:
    print(json.dumps(body, indent=2, sort_keys=True) if args.json else line)


def _rollout_line(status: dict[str, Any]) -> str:
    rollout, progress = status["rollout"], status["progress"]
    line = (
        f"rollout {rollout['id']} {rollout['state']}: {progress['nodes_updated']}/"
        f"{progress['nodes_total']} nodes on {rollout['release']}"
    )
    if progress.get("current_node"):
        line += f", now {progress['current_node']}"
    return line


# ------------------------------------------------------------------ commands


def _release_upload(client: Client, args: argparse.Namespace) -> int:
    path = Path(args.bundle)
    if not path.is_file():
        raise CtlError(USAGE, f"{path}: no such file")
    with path.open("rb") as handle:
        body = client.request(
            "POST",
            "/releases/",
            files={"bundle": (path.name, handle)},
            data={"channel": args.channel},
            create=True,
            idempotency_key=args.idempotency_key,
        )
    _emit(args, body, f"published {body['product']} {body['version']} (release {body['id']})")
    return OK


def _release_id(client: Client, release: str) -> int:
    """A release by id or by version."""
    if release.isascii() and release.isdigit():
        return int(release)
    found = client.request("GET", "/releases/", params={"version": release})["results"]
    if not found:
        raise CtlError(NOT_FOUND, f"no release {release}")
    return int(found[0]["id"])


def _release_list(client: Client, args: argparse.Namespace) -> int:
    items = list(client.pages("/releases/", {}))
    _emit(
        args,
        items,
        "\n".join(f"{r['id']}\t{r['version']}\t{r['channel']}\t{r['state']}" for r in items),
    )
    return OK


def _release_deprecate(client: Client, args: argparse.Namespace) -> int:
    body = client.request("POST", f"/releases/{_release_id(client, args.release)}/deprecate/")
    _emit(args, body, f"{body['version']} {body['state']}")
    return OK


def _cluster_id(client: Client, cluster: str) -> int:
    """A cluster by id or by name (through its nodes: what the token may see)."""
    if cluster.isascii() and cluster.isdigit():
        return int(cluster)
    nodes = client.request("GET", "/nodes/", params={"cluster": cluster, "page_size": 1})
    if not nodes["results"]:
        raise CtlError(NOT_FOUND, f"no cluster {cluster} with nodes you can see")
    return int(nodes["results"][0]["cluster_id"])


def _rollout_body(client: Client, args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {
        "release": _release_id(client, args.release),
        "strategy": args.strategy,
    }
    if args.cluster:
        body["cluster"] = _cluster_id(client, args.cluster)
    if args.tenant:
        body["tenant"] = args.tenant
    if args.version_filter:
        body["version_filter"] = args.version_filter
    if args.stages:
        try:
            body["stages"] = [float(s) for s in args.stages.split(",") if s.strip()]
        except ValueError:
            raise CtlError(USAGE, f"--stages: {args.stages!r} is not a list of percents") from None
    for name in ("max_error_rate", "max_p99_ms", "bake_seconds", "max_unavailable"):
        if getattr(args, name) is not None:
            body[name] = getattr(args, name)
    if args.automatic_final:
        body["automatic_final"] = True
    return body


def _rollout_create(client: Client, args: argparse.Namespace) -> int:
    data = {**_rollout_body(client, args), "start": not args.no_start}
    body = client.request(
        "POST", "/rollouts/", json_body=data, create=True, idempotency_key=args.idempotency_key
    )
    _emit(args, body, f"rollout {body['id']} {body['state']}")
    return OK


def _rollout_preview(client: Client, args: argparse.Namespace) -> int:
    body = client.request("POST", "/rollouts/preview/", json_body=_rollout_body(client, args))
    lines = [f"stages: {body['stage_sizes']}"]
    lines += [
        f"  stage {n['stage']}: {n['node']}{' (leader)' if n['is_leader'] else ''}"
        for n in body["nodes"]
    ]
    _emit(args, body, "\n".join(lines))
    return OK


def _rollout_action(client: Client, args: argparse.Namespace) -> int:
    body = client.request("POST", f"/rollouts/{args.rollout}/{args.action}/")
    _emit(args, body, _rollout_line(body))
    return OK


def _rollout_status(client: Client, args: argparse.Namespace) -> int:
    deadline = time.monotonic() + args.timeout
    last = ""
    while True:
        body = client.request("GET", f"/rollouts/{args.rollout}/")
        state = body["rollout"]["state"]
        line = _rollout_line(body)
        if not args.wait:
            _emit(args, body, line)
            return OK
        if not args.json and line != last:
            print(line, flush=True)
            last = line
        if state in FINAL_OK | FINAL_BAD | NEEDS_PERSON:
            if args.json:
                _emit(args, body, line)
            if state in FINAL_OK:
                return OK
            return ROLLOUT_UNSUCCESSFUL if state in FINAL_BAD else ROLLOUT_NEEDS_PERSON
        if time.monotonic() >= deadline:
            if args.json:
                _emit(args, body, line)
            print(f"themis-ctl: still {state} after {args.timeout:g} s", file=sys.stderr)
            return WAIT_TIMEOUT
        time.sleep(args.interval)


def _nodes_list(client: Client, args: argparse.Namespace) -> int:
    params = {
        k: getattr(args, k)
        for k in ("tenant", "cluster", "status", "version", "search")
        if getattr(args, k)
    }
    items = list(client.pages("/nodes/", params))
    lines = [
        f"{n['node_id']}\t{n['tenant']}\t{n['cluster'] or '-'}\t{n['status']}\t"
        f"{n['installed_version'] or '-'}"
        for n in items
    ]
    _emit(args, items, "\n".join(lines))
    return OK


# ------------------------------------------------------------------ arguments


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(USAGE, f"themis-ctl: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    # --json before or after the command; SUPPRESS keeps a subcommand's absent flag from
    # overwriting the one given before it.
    common = _Parser(add_help=False)
    common.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="print the API's JSON"
    )
    parser = _Parser(
        prog="themis-ctl",
        description="Themis Update Manager from pipelines: releases, rollouts, nodes.",
        epilog="exit codes: 0 ok, 1 unexpected, 2 usage, 3 rollout ended unsuccessfully, "
        "4 rollout waits for a person, 5 wait timed out, 10 unauthenticated, 11 forbidden, "
        "12 not found, 13 invalid, 14 conflict, 15 throttled, 16 unavailable",
    )
    parser.add_argument("--json", action="store_true", help="print the API's JSON")
    parser.add_argument("--url", default=os.environ.get("THEMIS_URL", ""), help="$THEMIS_URL")
    parser.add_argument("--token", default=None, help="default: $THEMIS_TOKEN (preferred)")
    parser.add_argument("--http-timeout", type=float, default=60.0, help="seconds per request")
    top = parser.add_subparsers(dest="group", required=True, parser_class=_Parser)

    release = top.add_parser("release", help="upload, publish, list, deprecate")
    rel = release.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name in ("upload", "publish"):
        p = rel.add_parser(
            name, parents=[common], help="verify and publish a signed bundle (one step)"
        )
        p.add_argument("bundle")
        p.add_argument("--channel", default="stable", choices=["stable", "beta", "hotfix"])
        p.add_argument("--idempotency-key")
        p.set_defaults(run=_release_upload)
    p = rel.add_parser("list", parents=[common])
    p.set_defaults(run=_release_list)
    p = rel.add_parser("deprecate", parents=[common])
    p.add_argument("release", help="id or version")
    p.set_defaults(run=_release_deprecate)

    rollout = top.add_parser("rollout", help="create, start, status, approve, abort ...")
    ro = rollout.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, run, text in (
        ("create", _rollout_create, "create a rollout and start it (--no-start: later)"),
        ("preview", _rollout_preview, "the plan, nothing saved"),
    ):
        p = ro.add_parser(name, parents=[common], help=text)
        p.add_argument("--release", required=True, help="id or version")
        p.add_argument("--strategy", default="canary", choices=["canary", "rolling", "blue_green"])
        p.add_argument("--cluster", help="name or id")
        p.add_argument("--tenant", help="slug")
        p.add_argument("--version-filter", help="only nodes whose version matches, e.g. <1.7")
        p.add_argument("--stages", help="canary stages in percent, e.g. 1,5,25,100")
        p.add_argument("--max-error-rate", type=float, help="percent")
        p.add_argument("--max-p99-ms", type=float)
        p.add_argument("--bake-seconds", type=int)
        p.add_argument("--max-unavailable", type=int)
        p.add_argument("--automatic-final", action="store_true")
        if name == "create":
            p.add_argument("--no-start", action="store_true")
            p.add_argument("--idempotency-key", help="default: a new one per invocation")
        p.set_defaults(run=run)
    for action in ("start", "approve", "pause", "resume", "abort", "cancel", "retry"):
        p = ro.add_parser(action, parents=[common])
        p.add_argument("rollout", type=int)
        p.set_defaults(run=_rollout_action, action=action)
    p = ro.add_parser("status", parents=[common], help="progress; --wait until it settles")
    p.add_argument("rollout", type=int)
    p.add_argument(
        "--wait",
        action="store_true",
        help="until completed (0), ended otherwise (3) or waiting for a person (4)",
    )
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds for --wait")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between polls")
    p.set_defaults(run=_rollout_status)

    nodes = top.add_parser("nodes", help="list")
    nd = nodes.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = nd.add_parser("list", parents=[common])
    for name in ("tenant", "cluster", "status", "version", "search"):
        p.add_argument(f"--{name}")
    p.set_defaults(run=_nodes_list)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    url = str(args.url).rstrip("/")
    token = args.token or os.environ.get("THEMIS_TOKEN", "")
    if not url.startswith(("http://", "https://")):
        print("themis-ctl: set THEMIS_URL (or --url) to the dashboard's address", file=sys.stderr)
        return USAGE
    if not token:
        print("themis-ctl: set THEMIS_TOKEN (or --token) to an API token", file=sys.stderr)
        return USAGE
    client = Client(url=url, token=token, timeout=args.http_timeout)
    try:
        return int(args.run(client, args))
    except CtlError as err:
        if args.json and err.body is not None:
            print(json.dumps(err.body, indent=2, sort_keys=True))
        print(f"themis-ctl: {err.message}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        return 130
    except Exception as err:  # one clear line, and the exit code for "unexpected"
        print(f"themis-ctl: unexpected {type(err).__name__}: {err}", file=sys.stderr)
        return UNEXPECTED


if __name__ == "__main__":
    sys.exit(main())
