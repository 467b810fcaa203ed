"""A node of three components (themisdb, themis-storage, themis-query), each installed
at 1.0 by the engine in its own install and state dir, with real signed bundles of their
next releases served over HTTP, and the plan commands that install them."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.agent.bundle_server import BundleServer
from tests.engine.apply_fixtures import Snapshot, snapshot
from tests.security.signing import signed_command
from updates.engine import apply as engine
from updates.engine.bundle import create_bundle
from updates.engine.commands import CommandType
from updates.engine.devpki import Pki
from updates.engine.manifest import Dependency

KEY = bytes(range(32))
NODE = "n1"
PRIMARY = "themisdb"
STORAGE = "themis-storage"
QUERY = "themis-query"
PRODUCTS = (PRIMARY, STORAGE, QUERY)
# What the agent writes beside the engine in the primary state dir (its own bookkeeping).
AGENT_FILES = (
    "ledger",
    "last-job.json",
    "command-nonces.json",
    "report-sequence.json",
    "applies.log",  # tests that nothing was applied read it themselves
    "drain.log",
)


def files_of(product: str, version: str) -> dict[str, bytes]:
    """Each release changes one file, adds one and (from 1.1 on) drops one."""
    files = {
        f"bin/{product}": f"#!/bin/sh\necho {product} {version}\n".encode(),
        f"lib/{product}-{version}.so": hashlib.sha256(f"{product}{version}".encode()).digest(),
    }
    return files


@dataclass
class PlanNode:
    root: Path
    pki: Pki
    server: BundleServer
    bundles: dict[tuple[str, str], Path] = field(default_factory=dict)

    def install_dir(self, product: str) -> Path:
        return self.root / product / "install"

    def state_dir(self, product: str) -> Path:
        return self.root / product / "state"

    def bundle(
        self,
        product: str,
        version: str,
        dependencies: Sequence[Dependency] = (),
        *,
        extra: dict[str, Any] | None = None,
    ) -> Path:
        """A real bundle, signed with the test PKI's leaf (made once per product and
        version, or again with other dependencies or other manifest keys)."""
        tag = "-".join(d.product + d.constraint for d in dependencies)
        tag += json.dumps(extra, sort_keys=True) if extra else ""
        name = f"{product}-{version}{'-' + tag if tag else ''}"
        key = hashlib.sha256(name.encode()).hexdigest()[:16]
        src = self.root / "src" / key
        for rel, content in files_of(product, version).items():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            (src / rel).write_bytes(content)
        out = self.root / "bundles" / f"{key}.tar"
        out.parent.mkdir(parents=True, exist_ok=True)
        if not out.exists():
            create_bundle(
                src,
                product=product,
                version=version,
                key_path=self.pki.leaf.key,
                cert_path=self.pki.leaf.cert,
                chain_path=self.pki.chain,
                out_path=out,
                dependencies=dependencies,
                extra_manifest=extra,
            )
        return out

    def install(self, product: str, version: str) -> None:
        """Put `version` on as an operator's CLI would (no agent involved)."""
        engine.apply_bundle(
            self.bundle(product, version),
            target=self.install_dir(product),
            state_dir=self.state_dir(product),
            trust_anchor=self.pki.root,
            product=product,
        )

    def components_env(self, **health: str) -> str:
        """THEMIS_COMPONENTS for storage and query (health commands by product)."""
        return json.dumps(
            [
                {
                    "product": product,
                    "install_dir": str(self.install_dir(product)),
                    "state_dir": str(self.state_dir(product)),
                    **({"health_cmd": health[product]} if product in health else {}),
                }
                for product in (STORAGE, QUERY)
            ]
        )

    def env(self, **extra: str) -> dict[str, str]:
        return {
            "THEMIS_NODE_ID": NODE,
            "THEMIS_INSTALL_DIR": str(self.install_dir(PRIMARY)),
            "THEMIS_STATE_DIR": str(self.state_dir(PRIMARY)),
            "THEMIS_TRUST_ANCHOR": str(self.pki.root),
            "THEMIS_HEARTBEAT_SECONDS": "60",
            "THEMIS_NODE_KEY": KEY.hex(),
            "THEMIS_COMPONENTS": self.components_env(),
            **extra,
        }

    def step(self, bundle: Path, product: str, version: str) -> dict[str, Any]:
        return {
            "product": product,
            "version": version,
            "artifact_url": self.server.url(bundle),
            "sha256": hashlib.sha256(bundle.read_bytes()).hexdigest(),
            "size": bundle.stat().st_size,
        }

    def plan_args(self, steps: list[dict[str, Any]]) -> dict[str, Any]:
        """An apply command's arguments as the dashboard sends a plan: the target's
        single-bundle keys (the last step's) and the plan."""
        target = steps[-1]
        return {
            "sha256": target["sha256"],
            "artifact_url": target["artifact_url"],
            "size": target["size"],
            "version": target["version"],
            "download_token": "t",
            "health_timeout": 30,
            "plan": steps,
        }

    def envelope(self, job_id: str, args: dict[str, Any]) -> dict[str, Any]:
        return signed_command(KEY, NODE, CommandType.APPLY, args, job_id=job_id, lifetime=600)

    def trees(self) -> dict[str, Snapshot]:
        """Every component's install dir: each file's mode and SHA-256."""
        return {product: snapshot(self.install_dir(product)) for product in PRODUCTS}

    def engine_state(self) -> dict[str, Snapshot]:
        """Every component's state dir but the agent's own bookkeeping files."""
        found = {}
        for product in PRODUCTS:
            tree = snapshot(self.state_dir(product))
            found[product] = {
                rel: entry
                for rel, entry in tree.items()
                if rel.split("/")[0] not in AGENT_FILES and not rel.startswith("downloads")
            }
        return found


def upgrade_steps(node: PlanNode) -> list[dict[str, Any]]:
    """storage 1.1, query 1.1, then themisdb 2.0, which needs both at 1.1."""
    needs = (Dependency(STORAGE, ">=1.1"), Dependency(QUERY, ">=1.1"))
    return [
        node.step(node.bundle(STORAGE, "1.1"), STORAGE, "1.1"),
        node.step(node.bundle(QUERY, "1.1"), QUERY, "1.1"),
        node.step(node.bundle(PRIMARY, "2.0", needs), PRIMARY, "2.0"),
    ]


def new_plan_node(root: Path, pki: Pki, server: BundleServer) -> PlanNode:
    """Every component at 1.0."""
    node = PlanNode(root, pki, server)
    for product in PRODUCTS:
        node.install(product, "1.0")
    return node
