"""Manifest schema: every message names the field and the reason."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from tests.engine.malicious import manifest_doc
from updates.engine.bundle import parse_manifest
from updates.engine.errors import ManifestInvalid, UnsafePath
from updates.engine.manifest import DEFAULT_MODE, encode_manifest, manifest_document

FILES = {"bin/themisd": b"x"}


def parse(doc: dict[str, Any]) -> Any:
    return parse_manifest(json.dumps(doc).encode())


def test_minimal_manifest_and_defaults() -> None:
    doc = manifest_doc(FILES)
    del doc["remove"], doc["files"][0]["mode"]
    doc["future_key"] = {"anything": [1, 2]}  # unknown keys are ignored
    manifest = parse(doc)
    assert manifest.files[0].mode == DEFAULT_MODE and manifest.remove == ()
    assert manifest.dependencies == () and manifest.min_version is None
    assert manifest.created.tzinfo is UTC and manifest.raw["future_key"] == {"anything": [1, 2]}
    assert manifest.total_size == 1 == manifest.payload_size


def _with(path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    doc: dict[str, Any] = manifest_doc(FILES)
    node: Any = doc
    for key in path[:-1]:
        node = node[key]
    if value is KeyError:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return doc


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("format",), 2, "format: 2 is not supported"),
        (("format",), True, "format: must be an integer, not bool"),
        (("format",), KeyError, "format: is required"),
        (("product",), " ", "product: must not be empty"),
        (("product",), 5, "product: must be a string, not int"),
        (("version",), "one.two", "version: 'one.two' is not a valid version"),
        (("created",), "yesterday", "created: 'yesterday' is not an ISO 8601 time"),
        (("expires",), "2030-01-01T00:00:00", "expires: '2030-01-01T00:00:00' has no time zone"),
        (("expires",), "2000-01-01T00:00:00Z", "expires: must be later than created"),
        (("files",), {}, "files: must be a list, not dict"),
        (("files", 0), "bin/x", "files[0]: must be an object, not str"),
        (("files", 0, "size"), -1, "files[0].size: must not be negative"),
        (("files", 0, "size"), 1.0, "files[0].size: must be an integer, not float"),
        (("files", 0, "sha256"), "abc", "files[0].sha256: 'abc' is not 64 hex digits"),
        (("files", 0, "mode"), 493, "files[0].mode: must be a string, not int"),
        (("files", 0, "mode"), "rwxr-xr-x", "files[0].mode: 'rwxr-xr-x' is not an octal mode"),
        (("files", 0, "mode"), "1755", "files[0].mode: '1755' sets setuid, setgid or sticky"),
        (("files", 0, "delta"), [], "files[0].delta: must be an object, not list"),
        (("remove",), "lib/old.so", "remove: must be a list, not str"),
        (("remove",), [3], "remove[0]: must be a string, not int"),
        (("remove",), ["bin/themisd"], "remove: 'bin/themisd' is also listed elsewhere"),
        (("remove",), ["a", "A"], "remove: 'A' is also listed elsewhere"),
        (("dependencies",), ">=1", "dependencies: must be a list, not str"),
        (("dependencies",), {"glibc": 2}, "dependencies.glibc: must be a string, not int"),
        (("dependencies",), {"": ">=1"}, "dependencies: a name must not be empty"),
        (("min_version",), "x.y", "min_version: 'x.y' is not a valid version"),
    ],
)
def test_field_errors_name_field_and_reason(
    path: tuple[Any, ...], value: Any, message: str
) -> None:
    with pytest.raises(ManifestInvalid) as raised:
        parse(_with(path, value))
    assert message in str(raised.value)


def test_delta_entry_fields() -> None:
    good = {"algorithm": "bsdiff4", "base_sha256": "AB" * 32, "patch_sha256": "cd" * 32,
            "patch_size": 7}  # fmt: skip
    manifest = parse(_with(("files", 0, "delta"), good))
    entry = manifest.files[0]
    assert entry.delta == {**good, "base_sha256": "ab" * 32}
    assert entry.payload_size == 7 and entry.payload_sha256 == "cd" * 32
    for key, value, message in (
        ("algorithm", "", "delta.algorithm: must not be empty"),
        ("patch_size", "7", "delta.patch_size: must be an integer"),
        ("base_sha256", "zz", "delta.base_sha256: 'zz' is not 64 hex digits"),
    ):
        with pytest.raises(ManifestInvalid, match=message):
            parse(_with(("files", 0, "delta"), {**good, key: value}))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\xff\xfe{}", "not valid UTF-8 JSON"),
        (b"[]", "top level must be a JSON object"),
        (b'{"format": NaN}', "NaN is not allowed"),
        (b"[" * 100_000 + b"]" * 100_000, "not valid UTF-8 JSON"),
        (b'{"format": 1' + b"1" * 5000 + b"}", "not valid UTF-8 JSON"),
    ],
)
def test_malformed_json(data: bytes, message: str) -> None:
    with pytest.raises(ManifestInvalid, match=message):
        parse_manifest(data)


def test_unsafe_paths_are_exit_11_naming_the_entry() -> None:
    with pytest.raises(UnsafePath, match=r"files\[0\].path: '../x' has a '..' segment"):
        parse(_with(("files", 0, "path"), "../x"))
    with pytest.raises(ManifestInvalid, match=r"files\[0\].path: is required"):
        parse(_with(("files", 0, "path"), KeyError))


def test_document_round_trip() -> None:
    created = datetime(2026, 11, 30, 10, 0, tzinfo=UTC)
    parsed = parse(manifest_doc(FILES))
    doc = manifest_document(
        product="themisdb",
        version="1.7.0",
        created=created,
        expires=created.replace(year=2027),
        files=parsed.files,
        remove=["lib/old.so"],
        extra={"min_version": "1.0"},
    )
    assert list(doc)[:7] == [
        "format",
        "product",
        "version",
        "created",
        "expires",
        "files",
        "remove",
    ]
    again = parse_manifest(encode_manifest(doc))
    assert again.created == created and again.files == parsed.files
    assert again.remove == ("lib/old.so",) and again.min_version == "1.0"


MIGRATION_FILES = {
    "bin/themisd": b"x",
    "migrations/0001.json": b"{}",
    "migrations/0002.json": b"{}",
}


def _with_migrations(entries: Any) -> dict[str, Any]:
    doc: dict[str, Any] = manifest_doc(MIGRATION_FILES)
    doc["migrations"] = entries
    return doc


def test_migrations_are_listed_in_order_with_their_phase_and_file() -> None:
    manifest = parse(
        _with_migrations(
            [{"version": "0001", "phase": "expand"}, {"version": "0002", "phase": "contract"}]
        )
    )
    assert [(m.version, m.phase, m.path) for m in manifest.migrations] == [
        ("0001", "expand", "migrations/0001.json"),
        ("0002", "contract", "migrations/0002.json"),
    ]
    assert parse(manifest_doc(FILES)).migrations == ()


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ("0001", "migrations: must be a list, not str"),
        (["0001"], "migrations[0]: must be an object, not str"),
        ([{"version": "0001", "phase": "expand", "sql": "x"}], "migrations[0].sql: unknown field"),
        ([{"phase": "expand"}], "migrations[0].version: is required"),
        ([{"version": "1a", "phase": "expand"}], "'1a' is not a number of 1-9 digits"),
        (
            [{"version": "0002", "phase": "expand"}, {"version": "0001", "phase": "expand"}],
            "'0001' must come after '0002' (ascending)",
        ),
        ([{"version": "0001", "phase": "later"}], "phase: 'later' is not one of expand, contract"),
        ([{"version": "0003", "phase": "expand"}], "migrations/0003.json is not in files"),
        ([{"version": "0001", "phase": "expand"}] * 1001, "migrations: more than 1000 entries"),
    ],
)
def test_a_bad_migrations_entry_is_refused_naming_it(entries: Any, message: str) -> None:
    with pytest.raises(ManifestInvalid) as raised:
        parse(_with_migrations(entries))
    assert message in str(raised.value)
