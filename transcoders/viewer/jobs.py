"""The viewer's background worker: one thread that runs traces (``POST /api/trace``) one at a
time, with progress, and the per-head splits of edges (``/api/graphs/{g}/heads``), so the
server keeps answering while the model works and at most one model computation runs at once.

A trace goes through :func:`transcoders.circuit_cli.trace_prompt`, the code path of
``transcoders trace``; the graph is written to ``RUN/graphs/<prompt-slug>.json`` (``-2``,
``-3``... when that name is taken: an existing file is never replaced) and registered.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .registry import LRU, BadRequest, NotFound, Registry

log = logging.getLogger(__name__)

MAX_PROMPT_CHARS = 4000
MAX_TARGETS = 32
DEFAULT_MAX_FEATURE_NODES = 2000
_NAME_TRIES = 10_000


QK_PARTS = 3  # head parts of an edge whose attention the viewer explains (QK attribution)


@dataclass
class Job:
    """One trace: what was asked, and where it stands (``state`` is ``queued``, ``running``,
    ``done`` or ``error``; ``progress`` in [0, 1])."""

    id: str
    run: str
    prompt: str
    targets: list[str]
    max_feature_nodes: int
    state: str = "queued"
    progress: float = 0.0
    message: str = "queued"
    started: float | None = None
    finished: float | None = None
    graph: str | None = None
    error: str | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def update(self, **changes: Any) -> None:
        with self._lock:
            for k, v in changes.items():
                setattr(self, k, v)

    def status(self) -> dict:
        """``GET /api/jobs/{job}``: ``{"state", "progress", "message", "elapsed_s", "graph", "error"}``."""
        with self._lock:
            if self.started is None:
                elapsed = 0.0
            else:
                elapsed = (self.finished if self.finished is not None else time.monotonic()) - self.started
            return {"state": self.state, "progress": float(self.progress), "message": self.message,
                    "elapsed_s": round(elapsed, 3), "graph": self.graph, "error": self.error}


def parse_trace_request(body: Any, reg: Registry) -> tuple[str, str, list[str], int]:
    """``(run id, prompt, target specs, max_feature_nodes)`` from a ``POST /api/trace`` body.

    Raises:
        BadRequest: not an object, or a field of the wrong type or size. NotFound: unknown run.
    """
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object: {\"run\", \"prompt\", \"targets\", \"max_feature_nodes\"}")
    unknown = set(body) - {"run", "prompt", "targets", "max_feature_nodes"}
    if unknown:
        raise BadRequest(f"unknown fields {sorted(unknown)}; expected run, prompt, targets, max_feature_nodes")
    run = body.get("run")
    if not isinstance(run, str) or not run:
        raise BadRequest("'run' is required: a run id from /api/index")
    reg.run(run)
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise BadRequest("'prompt' is required: a non-empty string")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise BadRequest(f"'prompt' is {len(prompt)} characters; at most {MAX_PROMPT_CHARS}")
    targets = body.get("targets") or []
    if not isinstance(targets, list) or not all(isinstance(t, str) and t for t in targets) or len(targets) > MAX_TARGETS:
        raise BadRequest(f"'targets' must be a list of at most {MAX_TARGETS} target specs such as \"logit: Paris\"")
    n = body.get("max_feature_nodes", DEFAULT_MAX_FEATURE_NODES)
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise BadRequest("'max_feature_nodes' must be a non-negative integer (0: every active feature)")
    return run, prompt, list(targets), n


def write_new_graph(graph, folder: Path, stem: str) -> Path:
    """Save ``graph`` as ``folder/<stem>.json``, or ``<stem>-2.json``, ``-3``... : the first name
    not taken. A name is claimed by creating the file exclusively, then the complete graph
    (written beside it) is moved onto it, so an existing file is never replaced.

    Raises:
        OSError: the folder cannot be written.
    """
    from ..circuits.export import save_graph
    from ..files import check_writable

    check_writable(folder)
    tmp = folder / f".{stem}.{uuid.uuid4().hex}.tmp.json"
    save_graph(graph, tmp, slug=stem)
    try:
        for n in range(1, _NAME_TRIES):
            path = folder / (f"{stem}.json" if n == 1 else f"{stem}-{n}.json")
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                continue
            os.close(fd)
            os.replace(tmp, path)
            return path
        raise OSError(f"no free graph file name for {stem!r} in {folder}")
    finally:
        tmp.unlink(missing_ok=True)


class Worker:
    """One background thread; traces and other model work run on it in submission order.

    Args:
        registry: where runs are found and new graphs are registered.
        trace: the trace function (default :func:`transcoders.circuit_cli.trace_prompt`).
    """

    def __init__(self, registry: Registry, *, trace: Callable[..., Any] | None = None):
        self.registry = registry
        self._trace = trace
        self._queue: queue.Queue = queue.Queue()
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._replacements = LRU(2)

    # ------------------------------------------------------------------ the thread
    def _ensure_thread(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="viewer-worker", daemon=True)
                self._thread.start()

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            fn, future = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as exc:  # handed to whoever waits on the future
                future.set_exception(exc)

    def call(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run ``fn()`` on the worker thread (after the work queued before it)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put((fn, future))
        self._ensure_thread()
        return future

    def close(self) -> None:
        """Stop the thread after the queued work (it is a daemon: exiting does not wait for it)."""
        self._queue.put(None)

    # ------------------------------------------------------------------ traces
    def submit_trace(self, run: str, prompt: str, targets: list[str] | None = None,
                     max_feature_nodes: int = DEFAULT_MAX_FEATURE_NODES) -> Job:
        """Queue a trace of ``prompt`` with the transcoders of run ``run``; returns its job.

        Raises:
            NotFound: unknown run.
        """
        self.registry.run(run)
        job = Job(uuid.uuid4().hex[:16], run, prompt, list(targets or []), max_feature_nodes)
        with self._lock:
            self._jobs[job.id] = job
        self.call(lambda: self._run_trace(job))
        return job

    def job(self, job_id: str) -> Job:
        """Raises NotFound for an unknown job id."""
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise NotFound(f"no job {job_id!r}")
        return job

    def _run_trace(self, job: Job) -> None:
        from ..files import slugify
        from ..models.trust import model_from_file
        from .data import run_model

        job.update(state="running", started=time.monotonic(), message="starting")
        try:
            run = self.registry.run(job.run)
            model = model_from_file(run_model(run.path), f"the files of the run {run.path}")
            trace = self._trace
            if trace is None:
                from ..circuit_cli import trace_prompt as trace
            traced = trace(run.path, job.prompt, model=model, target_specs=tuple(job.targets),
                           max_feature_nodes=job.max_feature_nodes,
                           progress=lambda f, msg: job.update(progress=min(max(float(f), 0.0), 1.0), message=msg))
            path = write_new_graph(traced.graph, run.path / "graphs", slugify(job.prompt))
            entry = self.registry.add_graph(path, run.id)
            job.update(state="done", progress=1.0, message=f"wrote {path.name}", graph=entry.id,
                       finished=time.monotonic())
        except Exception as exc:
            if not isinstance(exc, (ValueError, OSError)):
                log.exception("trace job %s failed", job.id)
            job.update(state="error", error=f"{type(exc).__name__}: {exc}" if not isinstance(exc, (ValueError, OSError))
                       else str(exc), message="failed", finished=time.monotonic())

    # ------------------------------------------------------------------ per-head edge splits
    def heads(self, graph_id: str, src: int, dst: int) -> dict:
        """The per-head split of the edge ``src -> dst`` (run on the worker thread by the app):
        ``{"available", "reason", "components": [{"kind", "layer", "head", "pos", "dst_pos",
        "weight", "text", "qk"}]}``; components sum to the edge weight. ``qk`` explains why the
        head attends from ``dst_pos`` to ``pos`` (the :func:`~transcoders.circuits.head_loadings.qk_section`
        that ``trace --qk`` stored, else computed) for the :data:`QK_PARTS` largest parts that move
        between positions, with ``because`` its top pair as a sentence; None for the others.

        Raises:
            NotFound: unknown graph, or no such edge.
        """
        from ..circuits.graph import BIAS, FEATURE, TARGET
        from ..circuits.heads import split_edge

        reg = self.registry
        graph = reg.load_graph(graph_id)
        hit = ((graph.edge_src == src) & (graph.edge_dst == dst)).nonzero()
        if hit.numel() == 0:
            raise NotFound(f"the graph has no edge from node {src} to node {dst}")
        unavailable = lambda reason: {"available": False, "reason": reason, "components": []}
        if int(graph.kind[src]) in (BIAS, TARGET):
            return unavailable("edges from bias nodes are not split: a bias is not moved by attention from one place")
        if int(graph.kind[dst]) not in (FEATURE, TARGET):
            return unavailable("only edges into features and targets can be split")
        run_id = reg.graph_run(graph_id)
        if run_id is None:
            return unavailable("the graph's run is not served; start `transcoders serve` with its RUN_DIR")
        entry = reg.graph(graph_id)
        try:
            rep = self._replacements.get((entry.path, reg.run(run_id).path), lambda: self._replacement(graph, entry.path,
                                                                                                        run_id))
        except (ValueError, OSError) as exc:
            return unavailable(f"cannot load the model and transcoders: {exc}")
        parts = split_edge(rep, graph, src, dst)
        explain = [c for c in parts if c.kind == "head" and c.src_pos != c.dst_pos][:QK_PARTS]
        qk = self._qk(graph, rep, [(c.layer, c.head, c.dst_pos, c.src_pos) for c in explain])
        return {"available": True, "reason": None, "components": [
            {"kind": c.kind, "layer": c.layer, "head": c.head if c.kind == "head" else None,
             "pos": c.src_pos if c.kind == "head" else None, "dst_pos": c.dst_pos, "weight": c.weight,
             "text": c.describe(), "qk": qk.get((c.layer, c.head, c.dst_pos, c.src_pos)) if c in explain else None}
            for c in parts]}

    def _qk(self, graph, rep, triples: list[tuple[int, int, int, int]]) -> dict:
        """``{(layer, head, q, k): {"score", "pattern", "because", "pairs"}}``: stored by ``trace
        --qk`` where it was, else computed (:func:`~transcoders.circuits.qk.qk_attributions`)."""
        from ..circuits.attribution import SourceIndex
        from ..circuits.head_loadings import because, find_head, qk_section, read_qk_section
        from ..circuits.qk import qk_attributions

        try:
            section = read_qk_section(graph)
        except ValueError:  # a QK section of another version: compute afresh
            section = None
        found: dict[tuple[int, int, int, int], dict] = {}
        for t in triples:
            stored = find_head(section, *t) if section is not None else None
            if stored is not None:
                found[t] = stored
        todo = [t for t in triples if t not in found]
        if todo:
            index = SourceIndex(rep)
            for t, a in zip(todo, qk_attributions(rep, todo, index=index)):
                found[t] = qk_section(a, rep, index, n=5)
        return {t: {"score": h["score"], "pattern": h["pattern"], "because": because(h, graph.token_strs),
                    "pairs": h["pairs"][:3]} for t, h in found.items()}

    def _replacement(self, graph, path: Path, run_id: str):
        from ..circuit_cli import replacement_for_graph

        return replacement_for_graph(graph, path, None, self.registry.run(run_id).path)
