"""Ed25519 bundle signatures: a signed bundle verifies; tampering, another key, a truncated file,
a missing signature and a downgrade are refused with a reason."""

from __future__ import annotations

import json
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest

from models.bundle import write_bundle
from models.signing import (
    SignatureError,
    check_version_change,
    generate_keypair,
    load_private_key,
    load_public_keys,
    sign_bundle,
    verify_bundle,
)


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    return generate_keypair(tmp_path / "keys")


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    src = tmp_path / "model.onnx"
    src.write_bytes(np.random.default_rng(0).bytes(4096))
    out = tmp_path / "bundle"
    write_bundle(out, name="t", version="1.2.0", classes=["a"], input_size=(32, 32), files={"onnx_int8": src})
    return out


def test_private_key_is_0600_and_never_overwritten(keys: tuple[Path, Path]) -> None:
    priv, _ = keys
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    with pytest.raises(FileExistsError):
        generate_keypair(priv.parent)


def test_signed_bundle_verifies(keys: tuple[Path, Path], bundle: Path) -> None:
    priv, pub = keys
    sign_bundle(bundle, load_private_key(priv))
    b = verify_bundle(bundle, load_public_keys([pub]))
    assert b.manifest.version == "1.2.0"


def _tamper_manifest(b: Path) -> None:
    m = json.loads((b / "manifest.json").read_text())
    m["postprocessing"]["conf"] = 0.01
    (b / "manifest.json").write_text(json.dumps(m))


def _tamper_model(b: Path) -> None:
    p = b / "model_int8.onnx"
    data = bytearray(p.read_bytes())
    data[100] ^= 0xFF
    p.write_bytes(bytes(data))


def _truncate_model(b: Path) -> None:
    p = b / "model_int8.onnx"
    p.write_bytes(p.read_bytes()[:1000])


@pytest.mark.parametrize(("damage", "error"), [
    (_tamper_manifest, "does not match the manifest"),
    (_tamper_model, "sha256"),
    (_truncate_model, "model_int8.onnx"),
    (lambda b: (b / "manifest.sig").unlink(), "unsigned"),
    (lambda b: (b / "manifest.sig").write_bytes(b"\x00" * 10), "an Ed25519 signature has 64"),
])
def test_damaged_bundles_are_refused(keys: tuple[Path, Path], bundle: Path, damage, error: str) -> None:  # type: ignore[no-untyped-def]
    priv, pub = keys
    sign_bundle(bundle, load_private_key(priv))
    damage(bundle)
    with pytest.raises(Exception, match=error):
        verify_bundle(bundle, load_public_keys([pub]))


def test_a_bundle_signed_with_another_key_is_refused(keys: tuple[Path, Path], bundle: Path, tmp_path: Path) -> None:
    other_priv, _ = generate_keypair(tmp_path / "other")
    _, pub = keys
    sign_bundle(bundle, load_private_key(other_priv))
    with pytest.raises(SignatureError, match="any of the 1 trusted key"):
        verify_bundle(bundle, load_public_keys([pub]))
    # trusting both keys (a key rotation) accepts it
    assert verify_bundle(bundle, load_public_keys([pub, tmp_path / "other" / "lineguard-bundles.pub"]))


def test_signing_refuses_a_bundle_whose_files_do_not_match(keys: tuple[Path, Path], bundle: Path) -> None:
    _tamper_model(bundle)
    with pytest.raises(Exception, match="sha256"):
        sign_bundle(bundle, load_private_key(keys[0]))
    assert not (bundle / "manifest.sig").exists()


@pytest.mark.parametrize(("current", "new", "pinned", "ok"), [
    (None, "1.0.0", None, True),
    ("1.0.0", "1.1.0", None, True),
    ("1.1.0", "1.0.0", None, False),
    ("1.1.0", "1.1.0", None, False),
    ("1.1.0", "1.0.0", "1.0.0", True),
    ("1.1.0", "1.0.0", "0.9.0", False),
    ("1.9.0", "1.10.0", None, True),  # numeric, not string, order
])
def test_downgrades_need_a_pin(current: str | None, new: str, pinned: str | None, ok: bool) -> None:
    if ok:
        check_version_change(current, new, pinned)
    else:
        with pytest.raises(SignatureError, match="downgrade needs the version pinned"):
            check_version_change(current, new, pinned)


def test_cli_keygen_sign_verify(tmp_path: Path, bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from models.cli import main

    assert main(["keygen", "--out", str(tmp_path / "k")]) == 0
    key, pub = tmp_path / "k" / "lineguard-bundles.key", tmp_path / "k" / "lineguard-bundles.pub"
    assert main(["verify", "--bundle", str(bundle), "--pubkey", str(pub)]) == 1
    assert "unsigned" in capsys.readouterr().err
    assert main(["sign", "--bundle", str(bundle), "--key", str(key)]) == 0
    assert main(["verify", "--bundle", str(bundle), "--pubkey", str(pub)]) == 0
    _tamper_model(bundle)
    assert main(["verify", "--bundle", str(bundle), "--pubkey", str(pub)]) == 1


def test_agent_refuses_an_unsigned_bundle_when_keys_are_configured(keys: tuple[Path, Path], tmp_path: Path) -> None:
    from edge_agent.agent import Agent
    from edge_agent.config import build_config
    from edge_agent.transport import MemoryTransport

    root = Path(__file__).resolve().parents[2]
    copy = tmp_path / "default"
    shutil.copytree(root / "models" / "default", copy, ignore=shutil.ignore_patterns("checkpoint.pt", "split_*"))
    cfg = build_config({"cameras": [{"id": "c", "source": str(root / "sample_data" / "line_1080p.mp4")}],
                        "model": {"bundle": str(copy), "public_keys": [str(keys[1])]},
                        "outbox": {"path": str(tmp_path / "o.db")}})
    with pytest.raises(SignatureError, match="unsigned"):
        Agent(cfg, transport=MemoryTransport())
    sign_bundle(copy, load_private_key(keys[0]))
    agent = Agent(cfg, transport=MemoryTransport())
    assert agent.detector.version == json.loads((copy / "manifest.json").read_text())["version"]
