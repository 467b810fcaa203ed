"""The signed manifest (bundle format v1, DESIGN.md): schema and parsing.

Every message names the field (`files[3].sha256`) and the reason, because an
operator reading a rejected bundle's one stderr line has nothing else to go on.
Unknown keys are ignored (newer producers may add some); a known key with the
wrong type is an error.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version

from .errors import ManifestInvalid
from .paths import collision_key, require_safe_path
from .state import parse_version
from .verify import VerifySpec, parse_verify

FORMAT_VERSION = 1
DEFAULT_MODE = 0o644
_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")
_OCTAL_MODE = re.compile(r"^[0-7]{3,4}$")
MIGRATIONS_DIR = "migrations"
_MIGRATION_VERSION = re.compile(r"^[0-9]{1,9}$")
MAX_MIGRATIONS = 1000
MIGRATION_PHASES = ("expand", "contract")
# A component's name as the dashboard's Release.product holds it (at most 64 characters).
PRODUCT_SLUG = re.compile(r"^[a-z0-9](?:[a-z0-9._-]{0,62}[a-z0-9])?$")
_DEPENDENCY_KEYS = ("product", "constraint", "optional", "conflicts")
_DEPENDENCY_TEXT = re.compile(r"^([^<>=!~\s]+)\s*([<>=!~].*)?$")


@dataclass(frozen=True)
class Dependency:
    """What a release needs of another component on the same node.

    required (default): `product` must be installed at a version `constraint` allows;
    optional: if `product` is installed it must satisfy `constraint`, if not it is left alone;
    conflicts: `product` must not be installed at a version `constraint` allows.
    """

    product: str
    constraint: str = ""  # PEP 440 specifier text; "" = any version
    optional: bool = False
    conflicts: bool = False

    @property
    def required(self) -> bool:
        return not (self.optional or self.conflicts)

    def allows(self, version: str, *, prereleases: bool | None = None) -> bool:
        """Whether `constraint` admits `version`. Pre-releases only when the constraint
        names one, as pip does, unless `prereleases` says otherwise (a version already
        installed, or a conflict, is matched as it is)."""
        try:
            parsed = Version(version)
        except InvalidVersion:
            return False
        specifier = SpecifierSet(self.constraint)
        if prereleases is None:
            # Asked explicitly: packaging's own default has changed between releases.
            prereleases = bool(specifier.prereleases)
        return specifier.contains(parsed, prereleases=prereleases)

    def describe(self) -> str:
        """`themis-storage >=1.4,<2` (or `any themis-storage`)."""
        text = f"{self.product} {self.constraint}" if self.constraint else f"any {self.product}"
        if self.conflicts:
            return f"no {text.removeprefix('any ')}"
        return f"{text} if installed" if self.optional else text

    def to_document(self) -> dict[str, Any]:
        """The manifest entry for this dependency (the keys that differ from the default)."""
        doc: dict[str, Any] = {"product": self.product}
        if self.constraint:
            doc["constraint"] = self.constraint
        if self.optional:
            doc["optional"] = True
        if self.conflicts:
            doc["conflicts"] = True
        return doc


@dataclass(frozen=True)
class ManifestFile:
    path: str
    size: int  # of the file as installed (for a delta: the rebuilt target)
    sha256: str  # lower-case hex, of the file as installed
    mode: int
    # {"algorithm", "base_sha256", "patch_sha256", "patch_size"}: the payload
    # member is then the patch, checked against patch_size/patch_sha256.
    delta: dict[str, Any] | None = None

    @property
    def payload_size(self) -> int:
        """Bytes the payload member must hold."""
        return int(self.delta["patch_size"]) if self.delta else self.size

    @property
    def payload_sha256(self) -> str:
        return str(self.delta["patch_sha256"]) if self.delta else self.sha256


@dataclass(frozen=True)
class MigrationRef:
    """A migration the manifest lists: its phase is there too, so the dashboard can plan
    a rollout's expand and contract steps from the manifest alone."""

    version: str
    phase: str  # "expand" | "contract"; the file must say the same

    @property
    def path(self) -> str:
        return f"{MIGRATIONS_DIR}/{self.version}.json"


@dataclass(frozen=True)
class Manifest:
    format: int
    product: str
    version: str
    created: datetime
    expires: datetime
    files: tuple[ManifestFile, ...]
    remove: tuple[str, ...]
    min_version: str | None
    raw: dict[str, Any] = field(repr=False, compare=False)
    # Post-update checks (docs/bundle-format.md); empty when the bundle declares none.
    verify: VerifySpec = field(default_factory=VerifySpec)
    # Schema migrations, ascending; each is the listed file `migrations/<version>.json`.
    migrations: tuple[MigrationRef, ...] = ()
    # Other components this release needs, tolerates or excludes on the node.
    dependencies: tuple[Dependency, ...] = ()

    @property
    def total_size(self) -> int:
        return sum(entry.size for entry in self.files)

    @property
    def payload_size(self) -> int:
        return sum(entry.payload_size for entry in self.files)


def parse_manifest(data: bytes) -> Manifest:
    """Parse and validate manifest bytes; raise ManifestInvalid (or UnsafePath
    for a bad path) naming the field and the reason."""
    raw = _load_json(data)
    # Top-level fields first, then paths: the order DESIGN.md's step 3 lists.
    format_ = _format(raw)
    product = _product(raw)
    version = _version(raw)
    created = _timestamp(raw, "created")
    expires = _timestamp(raw, "expires")
    if expires <= created:
        raise ManifestInvalid("manifest: expires: must be later than created")
    min_version = _optional(raw, "min_version", str)
    if min_version is not None:
        parse_version(min_version, field_name="manifest: min_version")
    dependencies = _dependencies(raw.get("dependencies"), product)
    files = _files(_require(raw, "files", list))
    remove = _remove(_optional(raw, "remove", list) or [])
    _check_conflicts(files, remove)
    verify = parse_verify(raw.get("verify"))
    migrations = _migrations(_optional(raw, "migrations", list) or [], files)
    return Manifest(
        format=format_,
        product=product,
        version=version,
        created=created,
        expires=expires,
        files=files,
        remove=remove,
        dependencies=dependencies,
        min_version=min_version,
        raw=raw,
        verify=verify,
        migrations=migrations,
    )


def _load_json(data: bytes) -> dict[str, Any]:
    try:
        text = data.decode("utf-8")  # strict: no BOM games, no undecodable bytes
        raw = json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_constant=_no_constants)
    except ManifestInvalid:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ManifestInvalid(f"manifest: not valid UTF-8 JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ManifestInvalid("manifest: top level must be a JSON object")
    return raw


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Two parsers that keep different duplicates would read different manifests.
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ManifestInvalid(f"manifest: duplicate key {key!r}")
        result[key] = value
    return result


def _no_constants(name: str) -> None:
    raise ManifestInvalid(f"manifest: {name} is not allowed in JSON")


_TYPE_NAMES = {str: "a string", int: "an integer", list: "a list", dict: "an object"}


def _typed(value: Any, kind: type, where: str) -> Any:
    # bool is an int in Python but not a size or a format number.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ManifestInvalid(
            f"manifest: {where}: must be {_TYPE_NAMES[kind]}, not {type(value).__name__}"
        )
    return value


def _require(obj: dict[str, Any], key: str, kind: type, prefix: str = "") -> Any:
    if key not in obj:
        raise ManifestInvalid(f"manifest: {prefix}{key}: is required")
    return _typed(obj[key], kind, f"{prefix}{key}")


def _optional(obj: dict[str, Any], key: str, kind: type, prefix: str = "") -> Any:
    value = obj.get(key)
    return None if value is None else _typed(value, kind, f"{prefix}{key}")


def _format(raw: dict[str, Any]) -> int:
    value = _require(raw, "format", int)
    if value != FORMAT_VERSION:
        raise ManifestInvalid(f"manifest: format: {value!r} is not supported (expected 1)")
    return int(value)


def _product(raw: dict[str, Any]) -> str:
    value = _require(raw, "product", str)
    if not value.strip():
        raise ManifestInvalid("manifest: product: must not be empty")
    return str(value)


def _version(raw: dict[str, Any]) -> str:
    value = _require(raw, "version", str)
    parse_version(value, field_name="manifest: version")
    return str(value)


def _timestamp(raw: dict[str, Any], key: str) -> datetime:
    text = _require(raw, key, str)
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise ManifestInvalid(f"manifest: {key}: {text!r} is not an ISO 8601 time") from None
    if value.tzinfo is None:
        raise ManifestInvalid(f"manifest: {key}: {text!r} has no time zone (use ...Z)")
    return value.astimezone(UTC)


def _hex64(obj: dict[str, Any], key: str, prefix: str) -> str:
    value = _require(obj, key, str, prefix)
    if not _HEX64.match(value):
        raise ManifestInvalid(f"manifest: {prefix}{key}: {value!r} is not 64 hex digits")
    return str(value).lower()


def _size(obj: dict[str, Any], key: str, prefix: str) -> int:
    value = _require(obj, key, int, prefix)
    if value < 0:
        raise ManifestInvalid(f"manifest: {prefix}{key}: must not be negative")
    return int(value)


def _mode(entry: dict[str, Any], prefix: str) -> int:
    text = _optional(entry, "mode", str, prefix)
    if text is None:
        return DEFAULT_MODE
    if not _OCTAL_MODE.match(text):
        raise ManifestInvalid(f"manifest: {prefix}mode: {text!r} is not an octal mode like '0755'")
    mode = int(text, 8)
    if mode & 0o7000:
        raise ManifestInvalid(f"manifest: {prefix}mode: {text!r} sets setuid, setgid or sticky")
    return mode


def _delta(entry: dict[str, Any], prefix: str) -> dict[str, Any] | None:
    delta = _optional(entry, "delta", dict, prefix)
    if delta is None:
        return None
    prefix = f"{prefix}delta."
    algorithm = _require(delta, "algorithm", str, prefix)
    if not algorithm:
        raise ManifestInvalid(f"manifest: {prefix}algorithm: must not be empty")
    return {
        "algorithm": algorithm,
        "base_sha256": _hex64(delta, "base_sha256", prefix),
        "patch_sha256": _hex64(delta, "patch_sha256", prefix),
        "patch_size": _size(delta, "patch_size", prefix),
    }


def _files(entries: list[Any]) -> tuple[ManifestFile, ...]:
    files = []
    for index, entry in enumerate(entries):
        prefix = f"files[{index}]."
        _typed(entry, dict, f"files[{index}]")
        path = _require(entry, "path", str, prefix)
        files.append(
            ManifestFile(
                path=require_safe_path(path, f"manifest: {prefix}path"),
                size=_size(entry, "size", prefix),
                sha256=_hex64(entry, "sha256", prefix),
                mode=_mode(entry, prefix),
                delta=_delta(entry, prefix),
            )
        )
    return tuple(files)


def _remove(entries: list[Any]) -> tuple[str, ...]:
    return tuple(
        require_safe_path(_typed(path, str, f"remove[{i}]"), f"manifest: remove[{i}]")
        for i, path in enumerate(entries)
    )


def _check_conflicts(files: Sequence[ManifestFile], remove: Iterable[str]) -> None:
    """Reject names that would be one file on a case-insensitive filesystem,
    and a file that another entry needs as a directory."""
    seen: dict[str, str] = {}
    for entry in files:
        key = collision_key(entry.path)
        if key in seen:
            raise ManifestInvalid(
                f"manifest: files: {entry.path!r} duplicates {seen[key]!r}"
                " (names equal ignoring case/normalisation)"
            )
        seen[key] = entry.path
    for entry in files:
        parts = collision_key(entry.path).split("/")
        for depth in range(1, len(parts)):
            parent = "/".join(parts[:depth])
            if parent in seen:
                raise ManifestInvalid(
                    f"manifest: files: {seen[parent]!r} is a file but {entry.path!r} uses it"
                    " as a directory"
                )
    removed: dict[str, str] = {}
    for path in remove:
        key = collision_key(path)
        if key in seen or key in removed:
            raise ManifestInvalid(f"manifest: remove: {path!r} is also listed elsewhere")
        removed[key] = path


def parse_dependencies(value: Any, own_product: str) -> tuple[Dependency, ...]:
    """A manifest's `dependencies` value (the list, the older object, or None), checked
    as parse_manifest checks it: for readers of a stored manifest document."""
    return _dependencies(value, own_product)


def _dependencies(value: Any, own_product: str) -> tuple[Dependency, ...]:
    """The `dependencies` list; the older object form {name: specifier} still reads
    as required dependencies, so bundles signed before the list form stay valid."""
    if value is None:
        return ()
    if isinstance(value, dict):
        return tuple(_legacy_dependency(n, s, own_product) for n, s in value.items())
    entries = _typed(value, list, "dependencies")
    return tuple(_dependency(entry, index, own_product) for index, entry in enumerate(entries))


def _dependency(entry: Any, index: int, own_product: str) -> Dependency:
    entry = _typed(entry, dict, f"dependencies[{index}]")
    name = entry.get("product")
    # The product, when readable, is in every message: an index alone is hard to find.
    where = f"dependencies[{index}]" + (f" ({name})" if isinstance(name, str) and name else "")
    unknown = sorted(set(entry) - set(_DEPENDENCY_KEYS))
    if unknown:
        raise ManifestInvalid(f"manifest: {where}: {unknown[0]!r} is not a known key")
    product = _require(entry, "product", str, f"{where}: ")
    if not PRODUCT_SLUG.match(product):
        raise ManifestInvalid(
            f"manifest: {where}: product: {product!r} is not a product name"
            " (lower-case letters, digits, '.', '_', '-'; at most 64)"
        )
    if product == own_product:
        raise ManifestInvalid(f"manifest: {where}: a bundle cannot depend on its own product")
    constraint = _typed(entry.get("constraint", ""), str, f"{where}: constraint")
    _check_specifier(constraint, f"{where}: constraint")
    optional = _flag(entry, "optional", where)
    conflicts = _flag(entry, "conflicts", where)
    if optional and conflicts:
        raise ManifestInvalid(f"manifest: {where}: optional and conflicts cannot both be true")
    return Dependency(product, constraint.strip(), optional, conflicts)


def dependency_from_text(
    text: str, *, optional: bool = False, conflicts: bool = False
) -> Dependency:
    """`themis-storage>=1.4,<2` (or `themis-storage >=1.4`, or a bare product): the
    product is everything before the first comparison character. Checked when the
    manifest holding it is parsed."""
    match = _DEPENDENCY_TEXT.match(text.strip())
    product, constraint = (match.group(1), match.group(2) or "") if match else (text.strip(), "")
    return Dependency(product, constraint.strip(), optional, conflicts)


def _flag(entry: dict[str, Any], key: str, where: str) -> bool:
    value = entry.get(key, False)
    if not isinstance(value, bool):
        raise ManifestInvalid(
            f"manifest: {where}: {key}: must be true or false, not {type(value).__name__}"
        )
    return value


def _legacy_dependency(name: str, spec: Any, own_product: str) -> Dependency:
    where = f"dependencies.{name}"
    if not name:
        raise ManifestInvalid("manifest: dependencies: a name must not be empty")
    if name == own_product:
        raise ManifestInvalid(f"manifest: {where}: a bundle cannot depend on its own product")
    _typed(spec, str, where)
    _check_specifier(spec, where)
    return Dependency(name, spec.strip())


def _check_specifier(text: str, where: str) -> None:
    try:
        SpecifierSet(text)
    except InvalidSpecifier:
        raise ManifestInvalid(f"manifest: {where}: {text!r} is not a PEP 440 specifier") from None


def manifest_document(
    *,
    product: str,
    version: str,
    created: datetime,
    expires: datetime,
    files: Sequence[ManifestFile],
    remove: Sequence[str] = (),
    dependencies: Sequence[Dependency] = (),
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON object for a manifest, in the documented key order."""
    doc: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "product": product,
        "version": version,
        "created": _iso(created),
        "expires": _iso(expires),
        "files": [_file_document(entry) for entry in files],
        "remove": list(remove),
    }
    if dependencies:
        doc["dependencies"] = [dependency.to_document() for dependency in dependencies]
    doc.update(extra or {})
    return doc


def _file_document(entry: ManifestFile) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "path": entry.path,
        "size": entry.size,
        "sha256": entry.sha256,
        "mode": f"{entry.mode:04o}",
    }
    if entry.delta is not None:
        doc["delta"] = dict(entry.delta)
    return doc


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def encode_manifest(doc: dict[str, Any]) -> bytes:
    return (json.dumps(doc, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def _migrations(values: list[Any], files: Sequence[ManifestFile]) -> tuple[MigrationRef, ...]:
    """Ascending versions, each shipped (so hashed and signed) as a listed file."""
    if len(values) > MAX_MIGRATIONS:
        raise ManifestInvalid(f"manifest: migrations: more than {MAX_MIGRATIONS} entries")
    listed = {entry.path for entry in files}
    refs: list[MigrationRef] = []
    for index, value in enumerate(values):
        where = f"migrations[{index}]."
        entry = _typed(value, dict, f"migrations[{index}]")
        unknown = sorted(set(entry) - {"version", "phase"})
        if unknown:
            raise ManifestInvalid(f"manifest: {where}{unknown[0]}: unknown field")
        version = str(_require(entry, "version", str, where))
        if not _MIGRATION_VERSION.match(version):
            raise ManifestInvalid(
                f"manifest: {where}version: {version!r} is not a number of 1-9 digits"
            )
        if refs and int(version) <= int(refs[-1].version):
            raise ManifestInvalid(
                f"manifest: {where}version: {version!r} must come after"
                f" {refs[-1].version!r} (ascending)"
            )
        phase = str(_require(entry, "phase", str, where))
        if phase not in MIGRATION_PHASES:
            raise ManifestInvalid(
                f"manifest: {where}phase: {phase!r} is not one of {', '.join(MIGRATION_PHASES)}"
            )
        ref = MigrationRef(version, phase)
        if ref.path not in listed:
            raise ManifestInvalid(f"manifest: {where}version: {ref.path} is not in files")
        refs.append(ref)
    return tuple(refs)
