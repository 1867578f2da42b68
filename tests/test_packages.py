"""Model files shipped in installed packages: a GGUF split over chunk packages is joined once
into the cache and checked against the checksum its package publishes, without importing any of
the packages' code."""

from __future__ import annotations

import hashlib
import importlib
import sys

import pytest

from transcoders.models.packages import PackageModelError, package_gguf

DATA = bytes(range(256)) * 41  # 10,496 bytes


def make_packages(root, chunks: list[bytes], digest: str, name: str) -> None:
    main = root / name / "data"
    main.mkdir(parents=True)
    (root / name / "__init__.py").write_text("raise RuntimeError('package code must not run')\n")
    (main / "SHA256SUMS").write_text(f"{digest}  model.gguf\n")
    for i, chunk in enumerate(chunks):
        part = root / f"{name}_part{i + 1}"
        (part / "data").mkdir(parents=True)
        (part / "__init__.py").write_text("raise RuntimeError('package code must not run')\n")
        (part / "data" / f"model.gguf.part{i:02d}").write_bytes(chunk)


@pytest.fixture
def site(tmp_path, monkeypatch):
    root = tmp_path / "site"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    importlib.invalidate_caches()
    yield root
    for mod in [m for m in sys.modules if m.startswith("tcfake")]:
        del sys.modules[mod]


def test_chunks_are_joined_in_order_checked_and_reused(site, tmp_path):
    chunks = [DATA[:4000], DATA[4000:8000], DATA[8000:]]
    make_packages(site, chunks, hashlib.sha256(DATA).hexdigest(), "tcfake_ok")
    cache = tmp_path / "cache"
    path = package_gguf("tcfake-ok", cache)
    assert path.read_bytes() == DATA and path.parent == cache
    assert not any(m.startswith("tcfake") for m in sys.modules)  # no package code ran
    (site / "tcfake_ok_part1" / "data" / "model.gguf.part00").unlink()  # joined once: not needed again
    assert package_gguf("tcfake-ok", cache) == path


def test_a_wrong_checksum_keeps_nothing(site, tmp_path):
    make_packages(site, [DATA[:5000], DATA[5000:]], hashlib.sha256(b"other").hexdigest(), "tcfake_bad")
    cache = tmp_path / "cache"
    with pytest.raises(PackageModelError, match="not the published"):
        package_gguf("tcfake_bad", cache)
    assert not cache.exists() or list(cache.iterdir()) == []


def test_missing_chunk_packages_are_named(site, tmp_path):
    make_packages(site, [], hashlib.sha256(DATA).hexdigest(), "tcfake_none")
    with pytest.raises(PackageModelError, match="tcfake_none_part1"):
        package_gguf("tcfake_none", tmp_path / "cache")


def test_names_that_are_not_packages(tmp_path):
    assert package_gguf("no-such-package-here", tmp_path) is None
    assert package_gguf("os.path", tmp_path) is None  # dotted names are never looked up
