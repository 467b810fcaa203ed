"""The manifest's `dependencies` list: each bad entry is refused naming it, and what
is written reads back the same."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.engine.malicious import manifest_doc
from updates.engine.bundle import create_bundle, verify_bundle
from updates.engine.cli import main
from updates.engine.devpki import Pki
from updates.engine.errors import ManifestInvalid
from updates.engine.manifest import (
    Dependency,
    Manifest,
    ManifestFile,
    dependency_from_text,
    encode_manifest,
    manifest_document,
    parse_dependencies,
    parse_manifest,
)

FILES = {"bin/themisd": b"x"}


def parse_with(dependencies: Any) -> Manifest:
    doc = manifest_doc(FILES, dependencies=dependencies)
    return parse_manifest(json.dumps(doc).encode())


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ("themis-storage", "dependencies: must be a list, not str"),
        ([["themis-storage"]], "dependencies[0]: must be an object, not list"),
        (
            [{"product": "themis-query"}, {"product": "themis-storage", "version": "1"}],
            "dependencies[1] (themis-storage): 'version' is not a known key",
        ),
        ([{"constraint": ">=1"}], "dependencies[0]: product: is required"),
        ([{"product": 7}], "dependencies[0]: product: must be a string, not int"),
        (
            [{"product": "Themis Storage"}],
            "dependencies[0] (Themis Storage): product: 'Themis Storage' is not a product name",
        ),
        ([{"product": "-storage"}], "product: '-storage' is not a product name"),
        ([{"product": "s" * 65}], "is not a product name"),
        (
            [{"product": "themis-query", "constraint": ">>1.4"}],
            "dependencies[0] (themis-query): constraint: '>>1.4' is not a PEP 440 specifier",
        ),
        (
            [{"product": "themis-query", "constraint": 1.4}],
            "dependencies[0] (themis-query): constraint: must be a string, not float",
        ),
        (
            [{"product": "themisdb", "constraint": ">=1"}],
            "dependencies[0] (themisdb): a bundle cannot depend on its own product",
        ),
        (
            [{"product": "themis-geo", "optional": True, "conflicts": True}],
            "dependencies[0] (themis-geo): optional and conflicts cannot both be true",
        ),
        (
            [{"product": "themis-geo", "optional": "yes"}],
            "dependencies[0] (themis-geo): optional: must be true or false, not str",
        ),
        (
            [{"product": "themis-geo", "conflicts": 1}],
            "dependencies[0] (themis-geo): conflicts: must be true or false, not int",
        ),
        ({"themisdb": ">=1"}, "dependencies.themisdb: a bundle cannot depend on its own product"),
        ({"glibc": "=>2"}, "dependencies.glibc: '=>2' is not a PEP 440 specifier"),
    ],
)
def test_bad_entries_are_refused_naming_the_entry(entries: Any, message: str) -> None:
    with pytest.raises(ManifestInvalid) as raised:
        parse_with(entries)
    assert message in str(raised.value)
    assert str(raised.value).startswith("manifest: dependencies")


def test_entries_read_with_defaults_and_flags() -> None:
    manifest = parse_with(
        [
            {"product": "themis-storage", "constraint": ">=1.4.0,<2.0.0"},
            {"product": "themis-query", "constraint": " >=1.4.5 "},
            {"product": "themis-geo", "constraint": ">=2", "optional": True},
            {"product": "themis-legacy-plugin", "conflicts": True},
            {"product": "themis-old", "constraint": "<1", "optional": False, "conflicts": True},
        ]
    )
    assert manifest.dependencies == (
        Dependency("themis-storage", ">=1.4.0,<2.0.0"),
        Dependency("themis-query", ">=1.4.5"),
        Dependency("themis-geo", ">=2", optional=True),
        Dependency("themis-legacy-plugin", conflicts=True),
        Dependency("themis-old", "<1", conflicts=True),
    )
    assert [d.required for d in manifest.dependencies] == [True, True, False, False, False]


def test_the_older_object_form_reads_as_required_dependencies() -> None:
    manifest = parse_with({"glibc": ">=2.31", "kernel": ""})
    assert manifest.dependencies == (Dependency("glibc", ">=2.31"), Dependency("kernel"))


def test_an_empty_list_and_no_key_mean_no_dependencies() -> None:
    assert parse_with([]).dependencies == ()
    doc = manifest_doc(FILES)
    doc.pop("dependencies", None)
    assert parse_manifest(json.dumps(doc).encode()).dependencies == ()


def test_document_round_trip() -> None:
    dependencies = (
        Dependency("themis-storage", ">=1.4.0,<2.0.0"),
        Dependency("themis-query", ">=1.4.5"),
        Dependency("themis-geo", "~=2.1", optional=True),
        Dependency("themis-legacy-plugin", conflicts=True),
    )
    now = datetime.now(UTC).replace(microsecond=0)
    doc = manifest_document(
        product="themisdb",
        version="1.5.0",
        created=now,
        expires=now + timedelta(days=1),
        files=[ManifestFile("bin/themisd", 1, "ab" * 32, 0o755)],
        dependencies=dependencies,
    )
    assert doc["dependencies"][2] == {
        "product": "themis-geo",
        "constraint": "~=2.1",
        "optional": True,
    }
    assert doc["dependencies"][3] == {"product": "themis-legacy-plugin", "conflicts": True}
    assert parse_manifest(encode_manifest(doc)).dependencies == dependencies


def test_signed_bundle_carries_dependencies(pki: Pki, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "bin").mkdir(parents=True)
    (src / "bin/themisd").write_bytes(b"server")
    dependencies = (
        Dependency("themis-storage", ">=1.4,<2"),
        Dependency("themis-old", conflicts=True),
    )
    out = tmp_path / "b.tar"
    create_bundle(
        src,
        product="themisdb",
        version="1.5.0",
        key_path=pki.leaf.key,
        cert_path=pki.leaf.cert,
        chain_path=pki.chain,
        out_path=out,
        dependencies=dependencies,
    )
    with verify_bundle(out, trust_anchor=pki.root) as verified:
        assert verified.manifest.dependencies == dependencies
        assert verified.summary()["dependencies"] == [
            {"product": "themis-storage", "constraint": ">=1.4,<2"},
            {"product": "themis-old", "conflicts": True},
        ]


@pytest.mark.parametrize(
    ("dependency", "version", "allowed"),
    [
        (Dependency("s", ">=1.4.0,<2.0.0"), "1.4.0", True),
        (Dependency("s", ">=1.4.0,<2.0.0"), "2.0.0", False),
        (Dependency("s", ">=1.4.0,<2.0.0"), "1.3.9", False),
        (Dependency("s"), "0.1", True),
        (Dependency("s"), "2.0rc1", False),  # a pre-release only when the constraint names one
        (Dependency("s", ">=2.0rc1"), "2.0rc2", True),
        (Dependency("s", ">=1"), "2.0rc1", False),
        (Dependency("s", ">=1"), "not a version", False),
    ],
)
def test_allows(dependency: Dependency, version: str, allowed: bool) -> None:
    assert dependency.allows(version) is allowed


def test_allows_an_installed_prerelease_when_asked() -> None:
    assert Dependency("s", ">=1.4").allows("2.0rc1", prereleases=True)
    assert not Dependency("s", ">=1.4").allows("2.0rc1")


def test_describe() -> None:
    assert Dependency("themis-storage", ">=1.4,<2").describe() == "themis-storage >=1.4,<2"
    assert (
        Dependency("themis-geo", ">=2", optional=True).describe() == "themis-geo >=2 if installed"
    )
    assert Dependency("themis-old", conflicts=True).describe() == "no themis-old"
    assert Dependency("themis-old", "<1", conflicts=True).describe() == "no themis-old <1"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("themis-storage>=1.4,<2", Dependency("themis-storage", ">=1.4,<2")),
        (" themis-query >= 1.4.5 ", Dependency("themis-query", ">= 1.4.5")),
        ("themis-geo", Dependency("themis-geo")),
        ("themis-geo~=2.1", Dependency("themis-geo", "~=2.1")),
        ("themis-old!=1.0", Dependency("themis-old", "!=1.0")),
    ],
)
def test_dependency_from_text(text: str, expected: Dependency) -> None:
    assert dependency_from_text(text) == expected


def test_cli_create_writes_dependencies(
    pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "src"
    (src / "bin").mkdir(parents=True)
    (src / "bin/themisd").write_bytes(b"server")
    out = tmp_path / "b.tar"
    rc = main(
        ["bundle", "create", str(src), "--product", "themisdb", "--version", "1.5.0",
         "--key", str(pki.leaf.key), "--cert", str(pki.leaf.cert), "--chain", str(pki.chain),
         "--depends", "themis-storage>=1.4.0,<2.0.0", "--depends", "themis-query>=1.4.5",
         "--depends-optional", "themis-geo>=2", "--conflicts", "themis-legacy",
         "-o", str(out)]
    )  # fmt: skip
    assert rc == 0
    capsys.readouterr()
    with verify_bundle(out, trust_anchor=pki.root) as verified:
        assert verified.manifest.dependencies == (
            Dependency("themis-storage", ">=1.4.0,<2.0.0"),
            Dependency("themis-query", ">=1.4.5"),
            Dependency("themis-geo", ">=2", optional=True),
            Dependency("themis-legacy", conflicts=True),
        )


def test_cli_create_refuses_a_bad_dependency_naming_it(
    pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "src"
    (src / "bin").mkdir(parents=True)
    (src / "bin/themisd").write_bytes(b"server")
    out = tmp_path / "b.tar"
    rc = main(
        ["bundle", "create", str(src), "--product", "themisdb", "--version", "1.5.0",
         "--key", str(pki.leaf.key), "--cert", str(pki.leaf.cert),
         "--depends", "themis-storage>>1.4", "-o", str(out)]
    )  # fmt: skip
    assert rc == ManifestInvalid.exit_code
    assert "dependencies[0] (themis-storage): constraint: '>>1.4'" in capsys.readouterr().err
    assert not out.exists()


def test_parse_dependencies_reads_a_stored_document_as_the_manifest_does() -> None:
    stored = [{"product": "themis-storage", "constraint": ">=1.4"}, {"product": "themis-x"}]
    assert parse_dependencies(stored, "themisdb") == (
        Dependency("themis-storage", ">=1.4"),
        Dependency("themis-x"),
    )
    assert parse_dependencies(None, "themisdb") == ()
    with pytest.raises(ManifestInvalid, match=r"dependencies\[0\] \(themisdb\): a bundle cannot"):
        parse_dependencies([{"product": "themisdb"}], "themisdb")
