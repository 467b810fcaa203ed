"""The malicious-bundle corpus: every rule of DESIGN.md's verification order,
each case run through the CLI (exit code, one stderr line) and through
`verify_bundle(stage=True)` (exit code, one log line), and each proving that
the node's target dir, its parent and the state dir hold nothing new."""

from __future__ import annotations

import logging
import subprocess
import sys
import tarfile
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.engine.conftest import tree_snapshot
from tests.engine.malicious import (
    Member,
    build_tar,
    encode,
    head,
    manifest_doc,
    openssl_sign,
    payload,
    sha256,
    sign,
    zstd,
)
from updates.engine.bundle import verify_bundle
from updates.engine.cli import main
from updates.engine.devpki import KeyPair, Pki
from updates.engine.errors import EngineError
from updates.engine.state import NodeState, save_state

FILES = {"bin/themisd": b"#!/bin/sh\necho themis 1.7.0\n", "lib/libthemis.so": b"\x7fELF" * 64}
SIGNATURE, UNSAFE, INVALID, STALE = 10, 11, 12, 13
THEMIS_UPDATE = Path(sys.executable).with_name("themis-update")


@dataclass
class Ctx:
    pki: Pki
    work: Path

    def signed(
        self,
        doc: dict[str, Any] | None = None,
        *,
        signer: KeyPair | None = None,
        chain: Path | None | str = "default",
    ) -> tuple[bytes, bytes]:
        manifest = encode(doc if doc is not None else manifest_doc(FILES))
        chain_path = self.pki.chain if chain == "default" else chain
        assert not isinstance(chain_path, str)
        return manifest, sign(manifest, signer or self.pki.leaf, chain_path)

    def tar(self, members: list[Member], name: str = "bundle.tar", **kwargs: Any) -> Path:
        return self.write(build_tar(members, **kwargs), name)

    def write(self, data: bytes, name: str = "bundle.tar") -> Path:
        path = self.work / name
        path.write_bytes(data)
        return path

    def bundle(self, files: dict[str, bytes] | None = None, **doc: Any) -> Path:
        """A well-formed bundle of `files` whose manifest has `doc` overrides."""
        files = FILES if files is None else files
        manifest, signature = self.signed(manifest_doc(files, **doc))
        return self.tar(head(manifest, signature) + payload(files))


@dataclass
class Case:
    bundle: Path
    anchor: Path | None = None
    product: str | None = None
    state: NodeState | None = None
    extra: list[str] = field(default_factory=list)


CASES: dict[str, tuple[int, Callable[[Ctx], Case]]] = {}


def case(code: int) -> Callable[[Callable[[Ctx], Path | Case]], Callable[[Ctx], Path | Case]]:
    def register(build: Callable[[Ctx], Path | Case]) -> Callable[[Ctx], Path | Case]:
        def as_case(ctx: Ctx) -> Case:
            made = build(ctx)
            return made if isinstance(made, Case) else Case(made)

        CASES[build.__name__] = (code, as_case)
        return build

    return register


# ------------------------------------------------------------ 10: signature


@case(SIGNATURE)
def signature_tampered(ctx: Ctx) -> Path:
    manifest, signature = ctx.signed()
    flipped = signature[:-5] + bytes([signature[-5] ^ 0x01]) + signature[-4:]
    return ctx.tar(head(manifest, flipped) + payload(FILES))


@case(SIGNATURE)
def signature_missing(ctx: Ctx) -> Path:
    manifest, _ = ctx.signed()
    return ctx.tar([Member("manifest.json", manifest), *payload(FILES)])


@case(SIGNATURE)
def signature_after_payload(ctx: Ctx) -> Path:
    manifest, signature = ctx.signed()
    members = [Member("manifest.json", manifest), *payload(FILES)]
    return ctx.tar([*members, Member("manifest.json.p7s", signature)])


@case(SIGNATURE)
def signature_before_manifest(ctx: Ctx) -> Path:
    manifest, signature = ctx.signed()
    return ctx.tar([*reversed(head(manifest, signature)), *payload(FILES)])


@case(SIGNATURE)
def signature_is_symlink(ctx: Ctx) -> Path:
    manifest, _ = ctx.signed()
    link = Member("manifest.json.p7s", type=tarfile.SYMTYPE, linkname="/etc/passwd")
    return ctx.tar([Member("manifest.json", manifest), link, *payload(FILES)])


@case(SIGNATURE)
def signature_garbage(ctx: Ctx) -> Path:
    manifest, _ = ctx.signed()
    return ctx.tar(head(manifest, b"\x30\x82" + b"\xa5" * 300) + payload(FILES))


@case(SIGNATURE)
def signature_oversized(ctx: Ctx) -> Path:
    manifest, _ = ctx.signed()
    return ctx.tar(head(manifest, b"\x30" * ((1 << 20) + 1)) + payload(FILES))


@case(SIGNATURE)
def manifest_tampered_after_signing(ctx: Ctx) -> Path:
    manifest, signature = ctx.signed()
    tampered = manifest.replace(b'"themisdb"', b'"themisdc"')
    return ctx.tar(head(tampered, signature) + payload(FILES))


@case(SIGNATURE)
def signature_of_other_manifest(ctx: Ctx) -> Path:
    _, other = ctx.signed(manifest_doc(FILES, version="9.9.9"))
    manifest, _ = ctx.signed()
    return ctx.tar(head(manifest, other) + payload(FILES))


@case(SIGNATURE)
def rogue_hierarchy_same_names(ctx: Ctx) -> Path:
    manifest, signature = ctx.signed(signer=ctx.pki.rogue_leaf, chain=ctx.pki.rogue_chain)
    return ctx.tar(head(manifest, signature) + payload(FILES))


@case(SIGNATURE)
def wrong_trust_anchor(ctx: Ctx) -> Case:
    return Case(ctx.bundle(), anchor=ctx.pki.rogue_root)


@case(SIGNATURE)
def intermediate_missing(ctx: Ctx) -> Path:
    manifest, signature = ctx.signed(chain=None)
    return ctx.tar(head(manifest, signature) + payload(FILES))


@case(SIGNATURE)
def signer_expired(ctx: Ctx) -> Path:
    manifest, signature = ctx.signed(signer=ctx.pki.expired_leaf)
    return ctx.tar(head(manifest, signature) + payload(FILES))


@case(SIGNATURE)
def signer_not_yet_valid(ctx: Ctx) -> Path:
    manifest, signature = ctx.signed(signer=ctx.pki.not_yet_valid_leaf)
    return ctx.tar(head(manifest, signature) + payload(FILES))


@case(SIGNATURE)
def signer_without_code_signing(ctx: Ctx) -> Path:
    manifest, signature = ctx.signed(signer=ctx.pki.no_codesign_leaf)
    return ctx.tar(head(manifest, signature) + payload(FILES))


@case(SIGNATURE)
def signer_rsa_1024(ctx: Ctx) -> Path:
    manifest = encode(manifest_doc(FILES))
    signature = openssl_sign(manifest, ctx.work, [ctx.pki.rsa1024_leaf], ctx.pki.chain)
    return ctx.tar(head(manifest, signature) + payload(FILES))


@case(SIGNATURE)
def two_signer_infos(ctx: Ctx) -> Path:
    manifest = encode(manifest_doc(FILES))
    signers = [ctx.pki.leaf, ctx.pki.ec_leaf]
    signature = openssl_sign(manifest, ctx.work, signers, ctx.pki.chain)
    return ctx.tar(head(manifest, signature) + payload(FILES))


@case(SIGNATURE)
def signature_not_detached(ctx: Ctx) -> Path:
    manifest = encode(manifest_doc(FILES))
    signature = openssl_sign(manifest, ctx.work, [ctx.pki.leaf], ctx.pki.chain, "-nodetach")
    return ctx.tar(head(manifest, signature) + payload(FILES))


# ----------------------------------------------------------- 11: unsafe path


def _unsafe_manifest_path(path: str) -> Callable[[Ctx], Path]:
    def build(ctx: Ctx) -> Path:
        files = {**FILES, path: b"evil"}
        manifest, signature = ctx.signed(manifest_doc(files))
        return ctx.tar(head(manifest, signature) + payload(FILES))

    return build


for _name, _path in {
    "path_traversal": "../../etc/cron.d/evil",
    "path_inner_traversal": "bin/../../evil",
    "path_absolute": "/etc/passwd",
    "path_backslash": "bin\\..\\evil",
    "path_nul": "bin/the\x00misd",
    "path_escape_char": "bin/\x1b[2Jevil",
    "path_drive": "C:/Windows/evil.dll",
    "path_dot_segment": "bin/./evil",
    "path_empty_segment": "bin//evil",
    "path_trailing_slash": "bin/evil/",
    "path_not_nfc": unicodedata.normalize("NFD", "lib/café.so"),
    "path_too_deep": "/".join(["d"] * 40),
}.items():
    _build = _unsafe_manifest_path(_path)
    _build.__name__ = _name
    case(UNSAFE)(_build)


@case(UNSAFE)
def remove_traversal(ctx: Ctx) -> Path:
    return ctx.bundle(remove=["../../var/lib/themis"])


@case(UNSAFE)
def member_outside_payload(ctx: Ctx) -> Path:
    manifest, signature = ctx.signed()
    extra = Member("etc/cron.d/evil", b"* * * * * root sh\n")
    return ctx.tar(head(manifest, signature) + payload(FILES) + [extra])


@case(UNSAFE)
def member_traversal(ctx: Ctx) -> Path:
    manifest, signature = ctx.signed()
    extra = Member("payload/../../evil", b"x")
    return ctx.tar(head(manifest, signature) + [extra] + payload(FILES))


@case(UNSAFE)
def member_absolute(ctx: Ctx) -> Path:
    manifest, signature = ctx.signed()
    return ctx.tar(head(manifest, signature) + [Member("/etc/passwd", b"x")] + payload(FILES))


@case(UNSAFE)
def first_member_traversal(ctx: Ctx) -> Path:
    manifest, signature = ctx.signed()
    return ctx.tar([Member("../manifest.json", manifest)] + payload(FILES))


@case(UNSAFE)
def pax_path_override(ctx: Ctx) -> Path:
    manifest, signature = ctx.signed()
    members = payload(FILES)
    # The ustar name is a listed file, the pax record renames it elsewhere.
    members[0].pax = {"path": "payload/lib/evil.so"}
    return ctx.tar(head(manifest, signature) + members)


@case(UNSAFE)
def nfd_duplicate_member(ctx: Ctx) -> Path:
    files = {"lib/café.so": b"nfc"}
    manifest, signature = ctx.signed(manifest_doc(files))
    nfd = Member(unicodedata.normalize("NFD", "payload/lib/café.so"), b"nfd")
    return ctx.tar(head(manifest, signature) + payload(files) + [nfd])


# ------------------------------------------------- 12: manifest/payload invalid


def _typed_member(kind: bytes, **attrs: Any) -> Callable[[Ctx], Path]:
    def build(ctx: Ctx) -> Path:
        manifest, signature = ctx.signed()
        members = payload(FILES)
        members[0] = Member(members[0].name, type=kind, **attrs)
        return ctx.tar(head(manifest, signature) + members)

    return build


for _name, _kind, _attrs in (
    ("member_symlink", tarfile.SYMTYPE, {"linkname": "/etc/shadow"}),
    ("member_hardlink", tarfile.LNKTYPE, {"linkname": "manifest.json"}),
    ("member_char_device", tarfile.CHRTYPE, {}),
    ("member_block_device", tarfile.BLKTYPE, {}),
    ("member_fifo", tarfile.FIFOTYPE, {}),
    ("member_directory", tarfile.DIRTYPE, {}),
):
    _build = _typed_member(_kind, **_attrs)
    _build.__name__ = _name
    case(INVALID)(_build)


@case(INVALID)
def member_gnu_sparse(ctx: Ctx) -> Path:
    manifest, signature = ctx.signed()
    members = payload(FILES)
    members[0].type = tarfile.GNUTYPE_SPARSE
    return ctx.tar(head(manifest, signature) + members, fmt=tarfile.GNU_FORMAT)


@case(INVALID)
def member_pax_sparse(ctx: Ctx) -> Path:
    manifest, signature = ctx.signed()
    members = payload(FILES)
    name = members[0].name
    members[0].pax = {
        "GNU.sparse.major": "1",
        "GNU.sparse.minor": "0",
        "GNU.sparse.name": name,
        "GNU.sparse.realsize": str(len(members[0].data)),
    }
    return ctx.tar(head(manifest, signature) + members)


@case(INVALID)
def member_setuid(ctx: Ctx) -> Path:
    manifest, signature = ctx.signed(manifest_doc(FILES, modes={"bin/themisd": "0755"}))
    members = payload(FILES)
    members[0].mode = 0o4755
    return ctx.tar(head(manifest, signature) + members)


@case(INVALID)
def manifest_mode_setuid(ctx: Ctx) -> Path:
    return ctx.bundle(modes={"bin/themisd": "4755"})


@case(INVALID)
def member_duplicate(ctx: Ctx) -> Path:
    manifest, signature = ctx.signed()
    members = payload(FILES)
    return ctx.tar(head(manifest, signature) + members + [members[0]])


@case(INVALID)
def member_duplicate_case(ctx: Ctx) -> Path:
    manifest, signature = ctx.signed()
    twin = Member("payload/BIN/themisd", b"twin")
    return ctx.tar(head(manifest, signature) + payload(FILES) + [twin])


@case(INVALID)
def manifest_duplicate_case(ctx: Ctx) -> Path:
    return ctx.bundle({"bin/Tool": b"a", "bin/tool": b"b"})


@case(INVALID)
def manifest_duplicate_key(ctx: Ctx) -> Path:
    text = encode(manifest_doc(FILES)).replace(
        b'"product": "themisdb"', b'"product": "x", "product": "themisdb"'
    )
    manifest, signature = text, sign(text, ctx.pki.leaf, ctx.pki.chain)
    return ctx.tar(head(manifest, signature) + payload(FILES))


@case(INVALID)
def member_unlisted(ctx: Ctx) -> Path:
    manifest, signature = ctx.signed()
    extra = Member("payload/bin/backdoor", b"#!/bin/sh\n", mode=0o755)
    return ctx.tar(head(manifest, signature) + payload(FILES) + [extra])


@case(INVALID)
def member_missing(ctx: Ctx) -> Path:
    manifest, signature = ctx.signed()
    return ctx.tar(head(manifest, signature) + payload(FILES)[:1])


@case(INVALID)
def member_size_mismatch(ctx: Ctx) -> Path:
    manifest, signature = ctx.signed()
    members = payload(FILES)
    members[0].data += b"more"
    return ctx.tar(head(manifest, signature) + members)


@case(INVALID)
def member_hash_mismatch(ctx: Ctx) -> Path:
    manifest, signature = ctx.signed()
    members = payload(FILES)
    members[0].data = members[0].data.replace(b"themis", b"evilst")
    return ctx.tar(head(manifest, signature) + members)


@case(INVALID)
def file_used_as_directory(ctx: Ctx) -> Path:
    return ctx.bundle({"bin": b"file", "bin/themisd": b"inside"})


@case(INVALID)
def wrong_product(ctx: Ctx) -> Path:
    return ctx.bundle(product="otherdb")


@case(INVALID)
def manifest_not_json(ctx: Ctx) -> Path:
    manifest = b"{not json"
    return ctx.tar(head(manifest, sign(manifest, ctx.pki.leaf, ctx.pki.chain)) + payload(FILES))


@case(INVALID)
def manifest_wrong_type(ctx: Ctx) -> Path:
    doc = manifest_doc(FILES)
    doc["files"][0]["size"] = str(doc["files"][0]["size"])
    manifest, signature = ctx.signed(doc)
    return ctx.tar(head(manifest, signature) + payload(FILES))


@case(INVALID)
def manifest_bad_delta(ctx: Ctx) -> Path:
    doc = manifest_doc(FILES)
    doc["files"][0]["delta"] = {"algorithm": "bsdiff4", "base_sha256": "ab" * 32}
    manifest, signature = ctx.signed(doc)
    return ctx.tar(head(manifest, signature) + payload(FILES))


@case(INVALID)
def manifest_bad_dependency(ctx: Ctx) -> Path:
    return ctx.bundle(dependencies={"glibc": ">=2.31 and some"})


@case(INVALID)
def manifest_oversized(ctx: Ctx) -> Path:
    manifest, signature = ctx.signed(manifest_doc(FILES, padding="x" * (16 << 20)))
    return ctx.tar(head(manifest, signature) + payload(FILES))


@case(INVALID)
def manifest_not_first(ctx: Ctx) -> Path:
    manifest, signature = ctx.signed()
    return ctx.tar(payload(FILES) + head(manifest, signature))


@case(INVALID)
def zstd_bomb(ctx: Ctx) -> Path:
    zeros = bytes(16 << 20)
    files = {"share/zeros.bin": zeros}
    manifest, signature = ctx.signed(manifest_doc(files))
    return ctx.write(zstd(build_tar(head(manifest, signature) + payload(files))), "b.tar.zst")


@case(INVALID)
def not_an_archive(ctx: Ctx) -> Path:
    return ctx.write(b"MZ\x90\x00" + b"\xff" * 4000)


@case(INVALID)
def corrupt_zstd(ctx: Ctx) -> Path:
    return ctx.write(b"\x28\xb5\x2f\xfd" + b"\x00\xff" * 200, "b.tar.zst")


@case(INVALID)
def truncated_archive(ctx: Ctx) -> Path:
    files = {"bin/themisd": bytes(range(256)) * 400}
    manifest, signature = ctx.signed(manifest_doc(files))
    data = build_tar(head(manifest, signature) + payload(files))
    return ctx.write(data[: len(data) - 60_000])


# ------------------------------------------------------ 13: stale, downgrade


@case(STALE)
def manifest_expired(ctx: Ctx) -> Path:
    return ctx.bundle(created_ago=timedelta(days=100), expires_in=timedelta(seconds=-1))


@case(STALE)
def same_version_again(ctx: Ctx) -> Case:
    state = NodeState(installed_version="1.7.0", highest_version="1.7.0")
    return Case(ctx.bundle(version="1.7.0"), state=state)


@case(STALE)
def downgrade(ctx: Ctx) -> Case:
    state = NodeState(installed_version="1.7.0", highest_version="1.7.0")
    return Case(ctx.bundle(version="1.6.0"), state=state)


@case(STALE)
def older_than_highest_after_rollback(ctx: Ctx) -> Case:
    state = NodeState(installed_version="1.6.0", highest_version="1.7.0")
    return Case(ctx.bundle(version="1.6.5"), state=state)


# ------------------------------------------------------------------- tests


def test_corpus_is_large_and_covers_every_exit_code() -> None:
    codes = [code for code, _ in CASES.values()]
    assert len(CASES) >= 35
    assert {SIGNATURE, UNSAFE, INVALID, STALE} <= set(codes)


@dataclass
class Node:
    root: Path
    target: Path
    state: Path


@pytest.fixture
def node(tmp_path: Path) -> Node:
    root = tmp_path / "node"
    target, state = root / "target", root / "state"
    (target / "bin").mkdir(parents=True)
    (target / "bin" / "themisd").write_bytes(b"old\n")
    state.mkdir()
    return Node(root, target, state)


def _prepare(name: str, pki: Pki, tmp_path: Path, node: Node) -> tuple[int, Case]:
    code, build = CASES[name]
    work = tmp_path / "work"
    work.mkdir()
    made = build(Ctx(pki, work))
    if made.state is not None:
        save_state(node.state, made.state)
    return code, made


@pytest.mark.parametrize("name", sorted(CASES))
def test_malicious_bundle_is_rejected(
    name: str,
    pki: Pki,
    tmp_path: Path,
    node: Node,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    code, made = _prepare(name, pki, tmp_path, node)
    anchor = made.anchor or pki.root
    before = tree_snapshot(node.root)

    argv = ["bundle", "verify", str(made.bundle), "--trust-anchor", str(anchor)]
    argv += ["--state-dir", str(node.state)]
    if made.product:
        argv += ["--product", made.product]
    assert main(argv) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("themis-update: "), err

    caplog.clear()
    with (
        caplog.at_level(logging.INFO, logger="themis_update.bundle"),
        pytest.raises(EngineError) as raised,
    ):
        verify_bundle(
            made.bundle,
            trust_anchor=anchor,
            product=made.product or "themisdb",
            state_dir=node.state,
            stage=True,
        )
    assert raised.value.exit_code == code, raised.value
    rejections = [r for r in caplog.records if r.name == "themis_update.bundle"]
    assert len(rejections) == 1 and "rejected" in rejections[0].getMessage()
    assert tree_snapshot(node.root) == before


@pytest.mark.parametrize(
    "name", ["signature_tampered", "path_traversal", "member_symlink", "downgrade"]
)
def test_console_script_exit_codes(name: str, pki: Pki, tmp_path: Path, node: Node) -> None:
    code, made = _prepare(name, pki, tmp_path, node)
    before = tree_snapshot(node.root)
    result = subprocess.run(
        [THEMIS_UPDATE, "bundle", "verify", made.bundle, "--trust-anchor", pki.root,
         "--state-dir", node.state],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == code, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stdout == ""
    assert tree_snapshot(node.root) == before


def test_sha256_helper_matches_manifest_entries() -> None:
    doc = manifest_doc(FILES)
    assert doc["files"][0]["sha256"] == sha256(FILES["bin/themisd"])
