"""The demo fleet `make run` loads: 3 tenants, 2 clusters of 3 nodes (one
leader each), 1 standalone node, and one user per role.

Passwords are generated on first run and kept under var/ (mode 0600), never in
the code. Loading is idempotent: a second run reuses what exists.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.db import transaction

from tenants.models import Tenant
from tenants.roles import OPERATOR, RESPONDER, TENANT_ADMIN, ensure_role_groups
from updates.engine.apply import apply_bundle
from updates.engine.bundle import create_bundle
from updates.engine.devpki import Pki, make_pki
from updates.engine.manifest import Dependency
from updates.engine.state import load_state
from updates.fleet.node_keys import node_key_hex
from updates.models import Cluster, Node


@dataclass(frozen=True)
class DemoNode:
    node_id: str
    tenant: str
    cluster: str | None
    raft_role: str


DEMO_TENANTS = {"acme": "Acme Analytics", "borealis": "Borealis Bank", "cobalt": "Cobalt Health"}
DEMO_NODES = [
    DemoNode("acme-db-1", "acme", "acme-main", "follower"),
    DemoNode("acme-db-2", "acme", "acme-main", "leader"),
    DemoNode("acme-db-3", "acme", "acme-main", "follower"),
    DemoNode("borealis-db-1", "borealis", "borealis-ledger", "leader"),
    DemoNode("borealis-db-2", "borealis", "borealis-ledger", "follower"),
    DemoNode("borealis-db-3", "borealis", "borealis-ledger", "follower"),
    DemoNode("cobalt-solo", "cobalt", None, "standalone"),
]
# A node that runs a second component beside the server: its storage engine, released on
# its own (var/demo/bundles/themis-storage-*.tar.zst; 1.1.0 declares what it needs of the
# server, so its update page shows a plan).
DEMO_STORAGE = "themis-storage"
DEMO_COMPONENT_NODES = {"cobalt-solo": (DEMO_STORAGE,)}
# username -> (role group, administered tenant slugs)
DEMO_USERS: dict[str, tuple[str, list[str]]] = {
    "operator": (OPERATOR, []),
    "oncall": (RESPONDER, []),
    "admin-acme": (TENANT_ADMIN, ["acme"]),
    "admin-borealis": (TENANT_ADMIN, ["borealis", "cobalt"]),
}


def demo_credentials(var_dir: Path) -> dict[str, str]:
    """Read or create the demo passwords file (0600)."""
    path = var_dir / "demo" / "credentials.json"
    if path.exists():
        stored: dict[str, str] = json.loads(path.read_text())
        if set(stored) == set(DEMO_USERS):
            return stored
    path.parent.mkdir(parents=True, exist_ok=True)
    creds = {name: secrets.token_urlsafe(12) for name in DEMO_USERS}
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(creds, fh, indent=2)
    return creds


@transaction.atomic
def demo_fleet_load(*, var_dir: Path) -> dict[str, Any]:
    """Create the demo tenants, clusters, nodes and users; write node dirs and
    `var/demo/fleet.json` (what the local stack starts agents from)."""
    ensure_role_groups()
    tenants = {
        slug: Tenant.objects.get_or_create(slug=slug, defaults={"name": name})[0]
        for slug, name in DEMO_TENANTS.items()
    }
    fleet = []
    for spec in DEMO_NODES:
        tenant = tenants[spec.tenant]
        cluster = (
            Cluster.objects.get_or_create(tenant=tenant, name=spec.cluster)[0]
            if spec.cluster
            else None
        )
        Node.objects.get_or_create(
            node_id=spec.node_id,
            defaults={
                "hostname": f"{spec.node_id}.demo.local",
                "tenant": tenant,
                "cluster": cluster,
            },
        )
        fleet.append(_prepare_node_dirs(var_dir, spec))
    creds = demo_credentials(var_dir)
    for username, (role, tenant_slugs) in DEMO_USERS.items():
        _ensure_user(username, creds[username], role, [tenants[s] for s in tenant_slugs])
    fleet_file = var_dir / "demo" / "fleet.json"
    fleet_file.write_text(json.dumps({"nodes": fleet}, indent=2))
    # It holds every demo node's key (what the local stack gives each agent): owner only.
    fleet_file.chmod(0o600)
    return {"nodes": fleet, "credentials": creds}


DEMO_VERSIONS = ("1.0.0", "1.1.0")


def demo_bundles_prepare(*, var_dir: Path) -> dict[str, Path]:
    """Make the demo PKI (clearly demo keys, under var/pki) and signed demo
    bundles for versions 1.0.0 and 1.1.0 under var/demo/bundles/."""

    pki = make_pki(var_dir / "pki")
    out_dir = var_dir / "demo" / "bundles"
    out_dir.mkdir(parents=True, exist_ok=True)
    bundles = {}
    for version in DEMO_VERSIONS:
        bundles[f"{DEMO_STORAGE}-{version}"] = _storage_bundle(out_dir, pki, version)
    for version in DEMO_VERSIONS:
        bundle = out_dir / f"themisdb-{version}.tar.zst"
        if not bundle.exists():
            src = out_dir / f"src-{version}"
            demo_tree(src, version)
            create_bundle(
                src,
                product="themisdb",
                version=version,
                key_path=pki.leaf.key,
                cert_path=pki.leaf.cert,
                chain_path=pki.chain,
                expires_days=365,
                out_path=bundle,
                # The base version is installed before any service runs: nothing to
                # check it against. Every later one is checked on the running service.
                extra_manifest=None
                if version == DEMO_VERSIONS[0]
                else {"verify": demo_verify(version), "migrations": demo_migration_refs()},
            )
        bundles[version] = bundle
    return bundles


def _storage_bundle(out_dir: Path, pki: Pki, version: str) -> Path:
    """A demo storage engine release: a version file; 1.1.0 needs a 1.x server."""
    bundle = out_dir / f"{DEMO_STORAGE}-{version}.tar.zst"
    if bundle.exists():
        return bundle
    src = out_dir / f"src-{DEMO_STORAGE}-{version}"
    (src / "share").mkdir(parents=True, exist_ok=True)
    (src / "share" / "STORAGE_VERSION").write_text(f"{version}\n")
    needs = () if version == DEMO_VERSIONS[0] else (Dependency("themisdb", ">=1.0,<2"),)
    create_bundle(
        src,
        product=DEMO_STORAGE,
        version=version,
        key_path=pki.leaf.key,
        cert_path=pki.leaf.cert,
        chain_path=pki.chain,
        expires_days=365,
        out_path=bundle,
        dependencies=needs,
    )
    return bundle


def demo_verify(version: str) -> dict[str, list[dict[str, object]]]:
    """The demo release's post-update checks: the new process serves its own version,
    and health answers about as fast as before (within 10x: a loaded node is noisy;
    under 500 ms at p99)."""
    return {
        "smoke": [{"name": "service installed", "cmd": "test -x bin/themisd", "timeout": 10}],
        "integration": [
            {"name": "serves " + version, "path": "/version", "body_contains": f'"{version}"'},
            # The new code reads the column the expand migration added.
            {"name": "orders by status", "path": "/orders/summary", "body_contains": '"status"'},
        ],
        "performance": [
            {"name": "health p99", "path": "/health", "requests": 50, "p99_ms": 500, "factor": 10}
        ],
    }


# The demo 1.1.0's schema change (docs/bundle-format.md): orders get a status (expand:
# the 1.0.0 code still works on it) and lose a column no release reads (contract: once
# every node of the cluster runs 1.1.0, and only after a grace period).
DEMO_MIGRATIONS: dict[str, dict[str, object]] = {
    "0001": {
        "version": "0001",
        "phase": "expand",
        "description": "orders get a status; orders are looked up by customer",
        "operations": [
            {
                "op": "add_column",
                "table": "orders",
                "column": "status",
                "type": "TEXT",
                "nullable": True,
                "default": "new",
            },
            {
                "op": "add_index",
                "table": "orders",
                "name": "orders_customer",
                "columns": ["customer"],
                "online": True,
            },
        ],
    },
    "0002": {
        "version": "0002",
        "phase": "contract",
        "description": "the legacy note is read by no release any more",
        "operations": [
            {"op": "drop_column", "table": "orders", "column": "legacy_note", "grace_seconds": 60}
        ],
    },
}


def demo_migration_refs() -> list[dict[str, object]]:
    return [{"version": v, "phase": m["phase"]} for v, m in DEMO_MIGRATIONS.items()]


def demo_tree(src: Path, version: str) -> None:
    """The demo release: the stand-in service, its version file and, from 1.1.0 on,
    the schema migrations and the code that reads what they add."""
    (src / "bin").mkdir(parents=True, exist_ok=True)
    (src / "share").mkdir(parents=True, exist_ok=True)
    themisd = src / "bin" / "themisd"
    themisd.write_bytes((Path(__file__).parent / "service.py").read_bytes())
    themisd.chmod(0o755)
    (src / "share" / "VERSION").write_text(f"{version}\n")
    if version == DEMO_VERSIONS[0]:
        return
    (src / "share" / "FEATURES").write_text("order-status\n")
    (src / "migrations").mkdir(exist_ok=True)
    for name, migration in DEMO_MIGRATIONS.items():
        (src / "migrations" / f"{name}.json").write_text(json.dumps(migration, indent=2) + "\n")


def demo_nodes_install_base(*, var_dir: Path, bundle: Path) -> list[str]:
    """Install the base demo version on every demo node that has none yet,
    through the engine, as a node would."""

    installed = []
    for spec in DEMO_NODES:
        base = var_dir / "nodes" / spec.node_id
        for product in DEMO_COMPONENT_NODES.get(spec.node_id, ()):
            # The other components first: the same version, from their own bundles.
            component = base / product
            if not load_state(component / "state").installed_version:
                apply_bundle(
                    bundle.with_name(bundle.name.replace("themisdb", product, 1)),
                    target=component / "install",
                    state_dir=component / "state",
                    trust_anchor=var_dir / "pki" / "root.pem",
                    product=product,
                )
        if load_state(base / "state").installed_version:
            continue
        apply_bundle(
            bundle,
            target=base / "install",
            state_dir=base / "state",
            trust_anchor=var_dir / "pki" / "root.pem",
        )
        installed.append(spec.node_id)
    return installed


DEMO_SERVICE_BASE_PORT = 18100


def _prepare_node_dirs(var_dir: Path, spec: DemoNode) -> dict[str, str]:
    base = var_dir / "nodes" / spec.node_id
    install_dir, state_dir = base / "install", base / "state"
    install_dir.mkdir(parents=True, exist_ok=True)
    state_dir.mkdir(parents=True, exist_ok=True)
    status_file = state_dir / "service-status.json"
    status_file.write_text(json.dumps({"raft_role": spec.raft_role}))
    components = []
    for product in DEMO_COMPONENT_NODES.get(spec.node_id, ()):
        dirs = {"install_dir": base / product / "install", "state_dir": base / product / "state"}
        for path in dirs.values():
            path.mkdir(parents=True, exist_ok=True)
        components.append({"product": product, **{k: str(v) for k, v in dirs.items()}})
    return {
        "node_id": spec.node_id,
        "install_dir": str(install_dir),
        "state_dir": str(state_dir),
        "status_file": str(status_file),
        "metrics_file": str(state_dir / "service-metrics.json"),
        "node_key": node_key_hex(spec.node_id),
        "service_port": str(DEMO_SERVICE_BASE_PORT + DEMO_NODES.index(spec)),
        # THEMIS_COMPONENTS for its agent ("" for a node that runs the server alone).
        "components": json.dumps(components) if components else "",
    }


def _ensure_user(username: str, password: str, role: str, tenants: list[Tenant]) -> None:
    user_model = get_user_model()
    user, _ = user_model.objects.get_or_create(username=username)
    user.set_password(password)
    user.save()
    user.groups.set([Group.objects.get(name=role)])
    for tenant in tenants:
        tenant.admins.add(user)
