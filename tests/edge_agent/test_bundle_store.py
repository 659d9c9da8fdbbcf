"""The agent's bundle store: install, rollback, refusals, and kill -9 at any point of an install."""

from __future__ import annotations

import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edge_agent.bundle_store import BundleStore, BundleStoreError
from models.bundle import write_bundle
from models.signing import SignatureError, generate_keypair, load_private_key, load_public_keys, sign_bundle

VERSIONS = [f"1.0.{i}" for i in range(1, 9)]


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, Path]]:
    root = tmp_path_factory.mktemp("bundles")
    priv, pub = generate_keypair(root / "keys")
    key = load_private_key(priv)
    out = {}
    for i, v in enumerate(VERSIONS):
        src = root / f"m{i}.onnx"
        src.write_bytes(np.random.default_rng(i).bytes(2_000_000))  # big enough that a copy takes a while
        b = root / v
        write_bundle(b, name="t", version=v, classes=["a"], input_size=(32, 32), files={"onnx_int8": src})
        sign_bundle(b, key)
        out[v] = b
    return priv, pub, out


def store(root: Path, pub: Path) -> BundleStore:
    return BundleStore(root, load_public_keys([pub]))


def test_install_rollback_and_downgrade(made: tuple[Path, Path, dict[str, Path]], tmp_path: Path) -> None:
    _, pub, b = made
    s = store(tmp_path / "store", pub)
    with pytest.raises(BundleStoreError, match="no usable bundle"):
        s.current()
    s.install(b["1.0.1"])
    s.install(b["1.0.3"])
    assert s.current().manifest.version == "1.0.3"
    with pytest.raises(SignatureError, match="downgrade needs the version pinned"):
        s.install(b["1.0.2"])
    assert s.rollback().manifest.version == "1.0.1"
    assert s.current().manifest.version == "1.0.1"
    s.install(b["1.0.2"], pinned="1.0.2")  # below the newest installed, but newer than current: fine anyway
    assert s.current().manifest.version == "1.0.2"


def test_a_tampered_bundle_is_refused_and_the_old_one_keeps_running(made: tuple[Path, Path, dict[str, Path]],
                                                                    tmp_path: Path) -> None:
    import shutil

    _, pub, b = made
    s = store(tmp_path / "store", pub)
    s.install(b["1.0.1"])
    bad = tmp_path / "bad"
    shutil.copytree(b["1.0.2"], bad)
    data = bytearray((bad / "model_int8.onnx").read_bytes())
    data[5] ^= 1
    (bad / "model_int8.onnx").write_bytes(bytes(data))
    with pytest.raises(Exception, match="sha256"):
        s.install(bad)
    assert s.current().manifest.version == "1.0.1"
    assert not (tmp_path / "store" / "versions" / "1.0.2").exists()


def test_a_corrupted_current_falls_back_to_previous(made: tuple[Path, Path, dict[str, Path]], tmp_path: Path) -> None:
    _, pub, b = made
    s = store(tmp_path / "store", pub)
    s.install(b["1.0.1"])
    s.install(b["1.0.2"])
    (tmp_path / "store" / "versions" / "1.0.2" / "model_int8.onnx").write_bytes(b"bit rot")
    assert s.current().manifest.version == "1.0.1"
    assert s.current_version() == "1.0.1"


CHILD = """
import sys
from pathlib import Path
from edge_agent.bundle_store import BundleStore
from models.signing import load_public_keys
s = BundleStore(Path(sys.argv[1]), load_public_keys([Path(sys.argv[2])]))
for src in sys.argv[3:]:
    sys.stdin.readline()
    print("installing", Path(src).name, flush=True)
    s.install(Path(src))
    print("installed", Path(src).name, flush=True)
"""


def test_kill_9_at_any_point_of_an_install_leaves_a_verified_current(made: tuple[Path, Path, dict[str, Path]],
                                                                     tmp_path: Path) -> None:
    """The child installs one version per line it reads, so each kill lands inside (or just after) a chosen
    install whatever the machine's speed: the store then holds the version before it or that one, verified."""
    _, pub, b = made
    rng = random.Random(7)
    seen: set[str] = set()
    for i in range(10):
        root = tmp_path / f"store{i}"
        k = rng.randrange(1, len(VERSIONS))  # the install that gets killed; the ones before it completed
        proc = subprocess.Popen([sys.executable, "-c", CHILD, str(root), str(pub), *[str(b[v]) for v in VERSIONS]],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                cwd=Path(__file__).resolve().parents[2])
        assert proc.stdin is not None and proc.stdout is not None
        for v in VERSIONS[:k + 1]:
            proc.stdin.write("go\n")
            proc.stdin.flush()
            assert proc.stdout.readline().strip() == f"installing {v}"
            if v != VERSIONS[k]:
                assert proc.stdout.readline().strip() == f"installed {v}"
        time.sleep(rng.uniform(0.0, 0.015))  # an install takes ~8 ms here: about half land inside it
        proc.kill()
        proc.wait()
        s = store(root, pub)  # a restart: recover, then run what current says
        assert not list(root.glob(".staging-*")) and not list(root.glob(".link-*"))
        version = s.current().manifest.version  # verifies signature and every hash
        assert version in (VERSIONS[k - 1], VERSIONS[k]), (k, version)
        assert s.current_version() == version
        seen.add(version)
    assert len(seen) >= 2, seen  # different installs were killed
