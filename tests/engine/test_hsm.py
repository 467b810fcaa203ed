"""Signing with keys in a real PKCS#11 token (SoftHSM2, from `make install`): RSA and ECDSA
P-256 keys made inside the token, certificates issued to them by the test PKI; bundles
signed through `themis-update bundle create --pkcs11-uri` verify on nodes and with
`openssl cms -verify`, and every mistake is a clear error with no bundle written."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pkcs11
import pytest
from pkcs11 import Attribute, ObjectClass

from tests.engine.apply_fixtures import write_tree
from tests.hsm_fixtures import PIN, Token, make_token
from updates.engine.bundle import read_manifest, verify_bundle
from updates.engine.cli import main as cli
from updates.engine.devpki import Pki
from updates.engine.errors import UsageError
from updates.engine.hsm import DEFAULT_MODULE, Pkcs11Uri, read_pin
from updates.engine.truststore import trust_store_version

TOKEN = "themis-test"


@pytest.fixture(scope="session")
def token(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Token:
    return make_token(tmp_path_factory, pki, TOKEN)


def _create(tmp_path: Path, pki: Pki, *options: str) -> tuple[int, Path]:
    src = tmp_path / "src"
    write_tree(src, {"bin/themisd": b"signed in a token"})
    out = tmp_path / "hsm-signed.tar"
    code = cli([
        "bundle", "create", str(src), "--product", "themisdb", "--version", "2.0.0",
        "--chain", str(pki.chain), "-o", str(out), *options,
    ])  # fmt: skip
    return code, out


@pytest.mark.parametrize("key", ["release-rsa", "release-ec"])
def test_a_bundle_signed_in_the_token_verifies_on_nodes_and_with_openssl(
    tmp_path: Path, pki: Pki, token: Token, key: str
) -> None:
    # The RSA key's certificate comes from the token; the EC key's from a file.
    cert = [] if key == "release-rsa" else ["--cert", str(token.ec_cert)]
    code, bundle = _create(
        tmp_path, pki, "--pkcs11-uri", token.uri(key), "--pin-source", f"file:{token.pin_file}",
        *cert,
    )  # fmt: skip
    assert code == 0
    signer = verify_bundle(bundle, trust_anchor=pki.root).signer
    assert f"HSM signer hsm-{key.removeprefix('release-')}" in signer
    manifest, signature = read_manifest(bundle)
    (tmp_path / "manifest.json").write_bytes(manifest)
    (tmp_path / "manifest.json.p7s").write_bytes(signature)
    result = subprocess.run(
        ["openssl", "cms", "-verify", "-binary", "-inform", "DER",
         "-in", str(tmp_path / "manifest.json.p7s"), "-content", str(tmp_path / "manifest.json"),
         "-CAfile", str(pki.root), "-purpose", "any", "-out", "/dev/null"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "Verification successful" in result.stderr


def test_the_private_keys_cannot_leave_the_token(token: Token) -> None:
    with pkcs11.lib(DEFAULT_MODULE).get_token(token_label=TOKEN).open(user_pin=PIN) as session:
        for label in ("release-rsa", "release-ec"):
            key = session.get_key(object_class=ObjectClass.PRIVATE_KEY, label=label)
            assert key[Attribute.SENSITIVE] is True and key[Attribute.EXTRACTABLE] is False
            with pytest.raises(pkcs11.AttributeSensitive):
                key[Attribute.VALUE if label == "release-ec" else Attribute.PRIVATE_EXPONENT]


@pytest.mark.parametrize(
    ("options", "words"),
    [
        (["--pin-source", "env:THEMIS_TEST_NO_SUCH_PIN"], "$THEMIS_TEST_NO_SUCH_PIN is not set"),
        (["--pin-source", PIN], "use file:/path or env:NAME"),
        (["--pin-source", "file:{wrong_pin}"], "PinIncorrect"),
        (["--pin-source", "file:{pin}", "--key", "{key}"], "--key or --pkcs11-uri, not both"),
        (["--pin-source", "file:{pin}", "--cert", "{rsa_leaf}"], "does not match the certificate"),
    ],
)
def test_a_signing_mistake_is_one_clear_line_and_no_bundle(
    tmp_path: Path,
    pki: Pki,
    token: Token,
    capsys: pytest.CaptureFixture[str],
    options: list[str],
    words: str,
) -> None:
    wrong_pin = tmp_path / "wrong-pin"
    wrong_pin.write_text("0000\n")
    values = {
        "wrong_pin": wrong_pin,
        "pin": token.pin_file,
        "key": pki.leaf.key,
        "rsa_leaf": pki.leaf.cert,  # a certificate for another key than the token's
    }
    filled = [option.format(**values) for option in options]
    code, bundle = _create(tmp_path, pki, "--pkcs11-uri", token.uri("release-ec"), *filled)
    assert code == 2
    assert words in capsys.readouterr().err
    assert not bundle.exists() and not list(tmp_path.glob("*.tar*"))


def test_a_key_the_token_does_not_have_is_named(
    tmp_path: Path, pki: Pki, token: Token, capsys: pytest.CaptureFixture[str]
) -> None:
    code, bundle = _create(
        tmp_path, pki, "--pkcs11-uri", token.uri("no-such-key"),
        "--pin-source", f"file:{token.pin_file}",
    )  # fmt: skip
    assert code == 2
    assert "NoSuchKey" in capsys.readouterr().err
    assert not bundle.exists()


def test_a_trust_store_can_be_signed_in_the_token_too(
    tmp_path: Path, pki: Pki, token: Token, capsys: pytest.CaptureFixture[str]
) -> None:
    """The trust-store signer's key in a token: a store signed there installs on a node
    when its certificate carries the trust-store EKU, and is refused when it is a release
    signer's (the same key, another certificate)."""
    state = tmp_path / "state"
    for version, cert, code in ((1, token.ec_cert, 10), (2, token.ec_store_cert, 0)):
        store = tmp_path / f"store-{version}.json"
        assert cli([
            "trust", "create", "--version", str(version), "--root", str(pki.root),
            "--pkcs11-uri", token.uri("release-ec"), "--pin-source", f"file:{token.pin_file}",
            "--cert", str(cert), "--chain", str(pki.chain), "-o", str(store),
        ]) == 0  # fmt: skip
        capsys.readouterr()
        argv = ["trust", "install", str(store), "--state-dir", str(state), "--trust-anchor"]
        assert cli([*argv, str(pki.root)]) == code
        refused = "lacks the trust-store signing extended key usage" in capsys.readouterr().err
        assert refused == (code == 10)
        assert trust_store_version(state) == (0 if code else version)


def test_pkcs11_uris_and_pin_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    uri = Pkcs11Uri.parse("pkcs11:token=my%20token;id=%01%ff?module-path=/lib/x.so")
    assert (uri.token, uri.object_id, uri.object_label, uri.module_path) == (
        "my token",
        b"\x01\xff",
        None,
        "/lib/x.so",
    )
    for bad, words in [
        ("file:/x", "is not a pkcs11: URI"),
        ("pkcs11:object=k", "name the token"),
        ("pkcs11:token=t", "name the key"),
        ("pkcs11:token=t;object=k;type=public", "type must be private"),
        ("pkcs11:token=t;object=k;pin-value=1234", "is not one this reads"),
    ]:
        with pytest.raises(UsageError, match=words):
            Pkcs11Uri.parse(bad)
    monkeypatch.setenv("THEMIS_TEST_PIN", "4321")
    assert read_pin("env:THEMIS_TEST_PIN") == "4321"
    empty = tmp_path / "empty"
    empty.write_text("")
    with pytest.raises(UsageError, match="is empty"):
        read_pin(f"file:{empty}")
    with pytest.raises(UsageError, match="cannot read"):
        read_pin(f"file:{tmp_path / 'missing'}")
