"""The lock and the project file name packages only by registry name and version: a local path,
a file:// URL or a VCS URL installs on the machine that wrote it and nowhere else."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import InvalidRequirement, Requirement

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "requirements.lock"
PYPROJECT = ROOT / "pyproject.toml"

# What a registry-only requirement never contains.
NOT_FROM_REGISTRY = re.compile(
    r"file:|(^|[\s@=])(/|\./|\.\./|~/)|(git|hg|svn|bzr)\+|://|^-e\b|^--(find-links|index-url|"
    r"extra-index-url|trusted-host)|^-[fi]\b|\.whl\b|\.tar\.gz\b|\.zip\b",
    re.IGNORECASE,
)


def lock_requirements(text: str) -> list[str]:
    """The requirement lines of a pip-compile lock: continuation lines joined, hashes and
    comments dropped."""
    joined = text.replace("\\\n", " ")
    lines = []
    for raw in joined.splitlines():
        line = raw.split("#", 1)[0].strip()
        line = re.sub(r"\s--hash=sha256:[0-9a-f]{64}", "", " " + line).strip()
        if line:
            lines.append(line)
    return lines


def offending(lines: list[str]) -> list[str]:
    return [line for line in lines if NOT_FROM_REGISTRY.search(line)]


def pyproject_requirements() -> list[str]:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    found = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        found.extend(extra)
    return found


def test_lock_pins_every_package_by_name_version_and_hash() -> None:
    text = LOCK.read_text()
    lines = lock_requirements(text)
    assert len(lines) > 20
    assert offending(lines) == []
    for line in lines:
        requirement = Requirement(line)
        assert requirement.url is None, line
        specifiers = list(requirement.specifier)
        assert len(specifiers) == 1 and specifiers[0].operator == "==", line
    # Every pinned package carries at least one hash, so pip installs with --require-hashes.
    blocks = re.split(r"\n(?=\S)", text.replace("\\\n", " "))
    pinned = [b for b in blocks if re.match(r"[A-Za-z0-9]", b)]
    assert pinned and all("--hash=sha256:" in block for block in pinned)


def test_pyproject_names_no_local_path_or_vcs_url() -> None:
    requirements = pyproject_requirements()
    assert requirements
    assert offending(requirements) == []
    for line in requirements:
        assert Requirement(line).url is None, line


def test_every_project_dependency_is_in_the_lock() -> None:
    locked = {
        Requirement(line).name.lower().replace("_", "-")
        for line in lock_requirements(LOCK.read_text())
    }
    wanted = {
        Requirement(line).name.lower().replace("_", "-")
        for line in pyproject_requirements()
        if Requirement(line).name.lower() not in {"gunicorn", "psycopg"}
    }
    assert wanted - locked == set()


@pytest.mark.parametrize(
    "line",
    [
        "hdiffpatch @ file:///tmp/hdp/hdiffpatch-2.6.0-cp311-cp311-manylinux_2_28_x86_64.whl",
        "pkg @ git+https://example.invalid/pkg.git@v1",
        "./vendor/pkg-1.0.tar.gz",
        "/opt/wheels/pkg-1.0-py3-none-any.whl",
        "-e ../sibling",
        "--find-links /opt/wheels",
        "pkg @ https://example.invalid/pkg-1.0.zip",
    ],
)
def test_the_check_catches_what_broke_a_fresh_install(line: str) -> None:
    assert offending([line]) == [line]


@pytest.mark.parametrize("line", ["Django==5.2.19", "celery==5.7.0", "backports.zstd==1.8.0"])
def test_the_check_passes_registry_pins(line: str) -> None:
    assert offending([line]) == []
    try:
        Requirement(line)
    except InvalidRequirement:  # pragma: no cover - a broken example is a broken test
        pytest.fail(line)


def test_the_lock_pins_the_pip_that_make_install_bootstraps_first() -> None:
    """`make install` installs the locked pip before the rest (an older pip resolves
    pytest-cov's coverage[toml] to the newest release, which --require-hashes refuses), taking
    the lines from `pip==` to its `# via` comment."""
    stanza = re.search(
        r"^pip==\S+ \\\n(?:\s+--hash=sha256:[0-9a-f]{64}.*\n)+\s+# via", LOCK.read_text(), re.M
    )
    assert stanza is not None
    makefile = (ROOT / "Makefile").read_text()
    assert "sed -n '/^pip==/,/# via/p' requirements.lock" in makefile
