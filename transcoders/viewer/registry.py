"""What the viewer serves: runs and graph files by id, built once at start (and extended when a
trace finishes), plus small LRU caches of the files it has loaded.

Ids are looked up here and nowhere else: no part of a URL is ever joined to a file path. A run's
id is its folder's name, a graph's the file's stem; a name met twice gets ``-2``, ``-3``... in
the order the folders were given (runs first, each run's ``graphs/*.json``, then the ``--graphs``
folders). A file that is not a ``transcoders.graph/1`` graph is skipped with a logged warning.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
GRAPH_SCHEMA = "transcoders.graph/1"
COMPACT_SCHEMA = "transcoders.graph-compact/1"  # transcoders.circuits.compact, read by the same load_graph
_HEAD = re.compile(rb'^\s*\{\s*"schema"\s*:\s*"([^"]*)"')
_SNIFF_BYTES = 4096


class ViewerError(ValueError):
    """A request the viewer cannot answer; ``status`` is the HTTP status it maps to."""

    status = 400


class BadRequest(ViewerError):
    """A malformed parameter (HTTP 400)."""

    status = 400


class NotFound(ViewerError):
    """An unknown id, or something the id's files do not hold (HTTP 404)."""

    status = 404


class Conflict(ViewerError):
    """A file changed or broke since the registry was built (HTTP 409)."""

    status = 409


class LRU:
    """A small thread-safe least-recently-used cache; :meth:`get` builds a missing entry once
    even when several threads ask for it together."""

    def __init__(self, size: int):
        self.size = size
        self._items: OrderedDict[Any, Any] = OrderedDict()
        self._lock = threading.Lock()
        self._building: dict[Any, threading.Lock] = {}

    def get(self, key: Any, make: Callable[[], T]) -> T:
        """The cached value of ``key``, else ``make()`` (cached; exceptions are not)."""
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            gate = self._building.setdefault(key, threading.Lock())
        with gate:
            with self._lock:
                if key in self._items:
                    self._items.move_to_end(key)
                    return self._items[key]
            try:
                value = make()
            finally:
                with self._lock:
                    self._building.pop(key, None)
            with self._lock:
                self._items[key] = value
                while len(self._items) > self.size:
                    self._items.popitem(last=False)
            return value

    def drop(self, key: Any) -> None:
        with self._lock:
            self._items.pop(key, None)


@dataclass(frozen=True)
class RunEntry:
    """A served run: ``id`` and its folder (resolved)."""

    id: str
    path: Path

    @property
    def store_dir(self) -> Path:
        """Where its feature store lives (``RUN/features``, as ``transcoders features`` writes it)."""
        from ..features.collect import default_store

        return default_store(self.path)

    @property
    def has_features(self) -> bool:
        from ..features.store import MANIFEST

        return (self.store_dir / MANIFEST).is_file()


@dataclass(frozen=True)
class GraphEntry:
    """A served graph file: ``id``, its path (resolved) and the run whose ``graphs/`` holds it
    (None for a file from a ``--graphs`` folder; its run is then found from the file)."""

    id: str
    path: Path
    owner: str | None = None


def graph_schema_of(path: Path) -> str | None:
    """The ``schema`` of a graph file: a compact file's from its header; a JSON file's from its
    first bytes when it starts with it (as :func:`~transcoders.circuits.export.save_graph`
    writes), else from the whole file. None when it is neither."""
    from ..circuits.compact import CompactGraphError, compact_summary, is_compact

    try:
        if is_compact(path):
            return compact_summary(path)["schema"]
    except (OSError, CompactGraphError):
        return None
    try:
        with open(path, "rb") as fh:
            head = fh.read(_SNIFF_BYTES)
        m = _HEAD.match(head)
        if m:
            return m.group(1).decode("utf-8", "replace")
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    schema = obj.get("schema") if isinstance(obj, dict) else None
    return schema if isinstance(schema, str) else None


def _graph_files(folder: Path) -> list[Path]:
    """The graph files of a folder, JSON and compact, sorted by name (not recursive)."""
    return sorted([*folder.glob("*.json"), *folder.glob("*.safetensors")])


def _unique(name: str, taken: Iterable[str]) -> str:
    taken = set(taken)
    if name not in taken:
        return name
    n = 2
    while f"{name}-{n}" in taken:
        n += 1
    return f"{name}-{n}"


class Registry:
    """The runs and graphs a viewer serves (see the module docstring).

    Args:
        runs: run folders (each must exist).
        graph_dirs: folders of graph files (``*.json``, not recursive).
        graph_files: single graph files (e.g. the one ``export-html --graph`` exports).

    Raises:
        ValueError: a run or graph folder does not exist, or a graph file is not a graph.
    """

    def __init__(self, runs: Sequence[str | Path] = (), graph_dirs: Sequence[str | Path] = (),
                 graph_files: Sequence[str | Path] = ()):
        self._lock = threading.RLock()
        self.runs: dict[str, RunEntry] = {}
        self.graphs: dict[str, GraphEntry] = {}
        self._graph_paths: dict[Path, str] = {}
        self._summaries = LRU(4096)
        self._graphs = LRU(4)
        self._payloads = LRU(4)
        self._stores = LRU(16)
        self._store_locks: dict[str, threading.Lock] = {}
        for folder in runs:
            path = Path(folder).expanduser().resolve()
            if not path.is_dir():
                raise ValueError(f"run folder {folder} does not exist; pass folders written by `transcoders train`")
            if any(r.path == path for r in self.runs.values()):
                continue
            rid = _unique(path.name or "run", self.runs)
            self.runs[rid] = RunEntry(rid, path)
        for run in list(self.runs.values()):
            for f in _graph_files(run.path / "graphs"):
                self._register(f, run.id, warn=True)
        for folder in graph_dirs:
            path = Path(folder).expanduser().resolve()
            if not path.is_dir():
                raise ValueError(f"graph folder {folder} does not exist; pass a folder of graph files (--graphs)")
            for f in _graph_files(path):
                self._register(f, None, warn=True)
        for f in graph_files:
            path = Path(f).expanduser().resolve()
            if self._register(path, None, warn=False) is None:
                raise ValueError(f"{f} is not a {GRAPH_SCHEMA} graph file; write graphs with `transcoders trace`")

    # ------------------------------------------------------------------ registration
    def _register(self, path: Path, owner: str | None, *, warn: bool) -> GraphEntry | None:
        path = path.resolve()
        with self._lock:
            if path in self._graph_paths:
                return self.graphs[self._graph_paths[path]]
        if not path.is_file():
            return None
        schema = graph_schema_of(path)
        if schema not in (GRAPH_SCHEMA, COMPACT_SCHEMA):
            if warn:
                log.warning("skipping %s: not a %s graph file (schema %r)", path, GRAPH_SCHEMA, schema)
            return None
        with self._lock:
            gid = _unique(path.stem or "graph", self.graphs)
            entry = GraphEntry(gid, path, owner)
            self.graphs[gid] = entry
            self._graph_paths[path] = gid
            return entry

    def add_graph(self, path: str | Path, run: str | None = None) -> GraphEntry:
        """Register a graph file written while serving (a finished trace) and return its entry.

        Raises:
            ValueError: the file is not a graph file.
        """
        entry = self._register(Path(path), run, warn=False)
        if entry is None:
            raise ValueError(f"{path} is not a {GRAPH_SCHEMA} graph file")
        return entry

    # ------------------------------------------------------------------ lookups
    def run(self, run_id: str) -> RunEntry:
        """Raises NotFound for an unknown id."""
        with self._lock:
            entry = self.runs.get(run_id)
        if entry is None:
            raise NotFound(f"no run {run_id!r} is served")
        return entry

    def graph(self, graph_id: str) -> GraphEntry:
        """Raises NotFound for an unknown id."""
        with self._lock:
            entry = self.graphs.get(graph_id)
        if entry is None:
            raise NotFound(f"no graph {graph_id!r} is served")
        return entry

    def graph_entries(self) -> list[GraphEntry]:
        with self._lock:
            return list(self.graphs.values())

    def graph_id_for(self, path: str | Path) -> str | None:
        """The id of a registered graph file, by path."""
        with self._lock:
            return self._graph_paths.get(Path(path).resolve())

    def run_for_dir(self, run_dir: str | None) -> str | None:
        """The id of the served run whose folder is ``run_dir`` (a path a graph records), or None."""
        if not run_dir:
            return None
        try:
            path = Path(run_dir).expanduser().resolve()
        except (OSError, RuntimeError, ValueError):
            return None
        with self._lock:
            return next((r.id for r in self.runs.values() if r.path == path), None)

    # ------------------------------------------------------------------ graph files
    @staticmethod
    def _stamp(path: Path) -> tuple[int, int]:
        try:
            st = path.stat()
        except OSError:
            raise Conflict(f"the graph file {path} is gone since the viewer started") from None
        return st.st_mtime_ns, st.st_size

    def summary(self, graph_id: str) -> dict:
        """``{"name", "prompt", "run", "n_nodes", "n_edges"}`` of a graph, read from its file once
        (again when the file changes).

        Raises:
            NotFound: unknown id. Conflict: the file is gone or no longer a graph.
        """
        entry = self.graph(graph_id)
        key = (entry.path, self._stamp(entry.path))

        def make() -> dict:
            from ..circuits.compact import CompactGraphError, compact_summary, is_compact

            try:
                if is_compact(entry.path):
                    c = compact_summary(entry.path)
                    meta = c["header"].get("meta") or {}
                    prompt = meta.get("prompt")
                    return {"name": entry.path.stem,
                            "prompt": prompt if isinstance(prompt, str) else "".join(map(str, c["header"]["token_strs"])),
                            "run_dir": meta.get("run_dir") if isinstance(meta.get("run_dir"), str) else None,
                            "n_nodes": c["n_nodes"], "n_edges": c["n_edges"]}
            except (OSError, CompactGraphError, KeyError, TypeError) as exc:
                raise Conflict(f"the graph file {entry.path} is no longer readable ({exc})") from None
            try:
                obj = json.loads(entry.path.read_text(encoding="utf-8"))
                sec = obj["transcoders"]
                meta = sec.get("meta") or {}
                prompt = meta.get("prompt")
                return {"name": entry.path.stem,
                        "prompt": prompt if isinstance(prompt, str) else "".join(map(str, sec["token_strs"])),
                        "run_dir": meta.get("run_dir") if isinstance(meta.get("run_dir"), str) else None,
                        "n_nodes": len(sec["nodes"]["kind"]), "n_edges": len(sec["edges"]["src"])}
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise Conflict(f"the graph file {entry.path} is no longer readable ({exc})") from None

        s = self._summaries.get(key, make)
        run = entry.owner or self.run_for_dir(s["run_dir"])
        return {"name": s["name"], "prompt": s["prompt"], "run": run, "n_nodes": s["n_nodes"], "n_edges": s["n_edges"]}

    def graph_run(self, graph_id: str) -> str | None:
        """The served run a graph belongs to (the run holding it, else the one it records), or None."""
        return self.summary(graph_id)["run"]

    def load_graph(self, graph_id: str):
        """The :class:`~transcoders.circuits.graph.Graph` of a graph id (cached; reloaded when the
        file changes).

        Raises:
            NotFound: unknown id. Conflict: the file is gone or not a valid graph any more.
        """
        from ..circuits.export import GraphFileError, load_graph

        entry = self.graph(graph_id)
        key = (entry.path, self._stamp(entry.path))

        def make():
            try:
                return load_graph(entry.path)
            except GraphFileError as exc:
                raise Conflict(str(exc)) from None

        return self._graphs.get(key, make)

    def cached(self, graph_id: str, what: str, make: Callable[[], T]) -> T:
        """A value derived from a graph file (e.g. its payload), cached until the file changes."""
        entry = self.graph(graph_id)
        return self._payloads.get((entry.path, self._stamp(entry.path), what), make)

    # ------------------------------------------------------------------ feature stores
    def store(self, run_id: str):
        """The run's :class:`~transcoders.features.store.FeatureStore` (cached).

        Raises:
            NotFound: unknown run, or the run has no feature store.
        """
        from ..features.store import FeatureStore, FeatureStoreError

        run = self.run(run_id)
        if not run.has_features:
            raise NotFound(f"the run {run_id!r} has no feature store; make one with `transcoders features {run.path}`")

        def make():
            try:
                return FeatureStore(run.store_dir)
            except FeatureStoreError as exc:
                raise Conflict(str(exc)) from None

        try:
            stamp = (run.store_dir / "store.json").stat().st_mtime_ns
        except OSError:
            stamp = 0
        return self._stores.get((run.store_dir, stamp), make)

    def with_store(self, run_id: str, fn: Callable[[Any], T]) -> T:
        """``fn(store)`` with the run's store, one reader at a time (its file handles are shared)."""
        store = self.store(run_id)
        with self._lock:
            lock = self._store_locks.setdefault(run_id, threading.Lock())
        with lock:
            return fn(store)
