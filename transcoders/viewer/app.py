"""The viewer's Starlette app: the routes of ``docs/viewer.md``, security headers on every
response, JSON errors (400 bad parameter, 404 unknown id, 409 a file broke), static files from
the package's ``static/`` folder only. Loading graphs and stores runs in the thread pool and
model work on the :class:`~.jobs.Worker`, so the event loop keeps answering.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from . import data as D
from .encode import dumps
from .html import SERVED_CSP, STATIC_DIR, export_page, page_html
from .jobs import Worker, parse_trace_request
from .registry import BadRequest, NotFound, Registry, ViewerError

log = logging.getLogger(__name__)

MAX_BODY = 64 * 1024


class JSON(JSONResponse):
    """A JSON response whose NaN/inf floats are null (see :func:`~.encode.dumps`)."""

    def render(self, content) -> bytes:
        return dumps(content).encode("utf-8")


def _error(status: int, message: str) -> JSON:
    return JSON({"error": message}, status_code=status)


def _server_error(exc: Exception) -> JSON:
    log.error("viewer request failed", exc_info=exc)
    return _error(500, f"{type(exc).__name__}: {exc}")


def _host_of(header: str) -> str:
    """The host name of a ``Host`` header, without port or IPv6 brackets."""
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class SecurityHeaders:
    """ASGI middleware: ``Content-Security-Policy`` (unless the response set its own),
    ``X-Content-Type-Options: nosniff``, ``Referrer-Policy: no-referrer`` and
    ``X-Frame-Options: DENY`` on every HTTP response; with ``allowed_hosts``, requests whose
    ``Host`` is not one of them get 400 (a page on another site reaching the server through DNS
    rebinding)."""

    def __init__(self, app, allowed_hosts: Sequence[str] | None = None):
        self.app = app
        self.allowed = None if allowed_hosts is None else {h.strip("[]").lower() for h in allowed_hosts}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                if "content-security-policy" not in headers:
                    headers["Content-Security-Policy"] = SERVED_CSP
                headers["X-Content-Type-Options"] = "nosniff"
                headers["Referrer-Policy"] = "no-referrer"
                headers["X-Frame-Options"] = "DENY"
            await send(message)

        if self.allowed is not None:
            host = next((v.decode("latin-1") for k, v in scope.get("headers", []) if k == b"host"), "")
            if _host_of(host).lower() not in self.allowed:
                return await _error(400, f"unexpected Host header {host!r}")(scope, receive, send_with_headers)
        return await self.app(scope, receive, send_with_headers)


def create_app(runs: Sequence[str | Path] = (), graph_dirs: Sequence[str | Path] = (), *,
               static_dir: str | Path | None = None, registry: Registry | None = None,
               allowed_hosts: Sequence[str] | None = None) -> Starlette:
    """The viewer app serving ``runs`` (run folders) and the graphs in ``graph_dirs``.

    Args:
        static_dir: the folder served at ``/static`` and inlined in exports (default: the
            package's ``transcoders/viewer/static``).
        registry: a ready registry instead of ``runs`` / ``graph_dirs``.
        allowed_hosts: accept only requests whose ``Host`` is one of these (None: any).

    Returns:
        the app; ``app.state.registry`` and ``app.state.worker`` are its registry and worker.

    Raises:
        ValueError: a run or graph folder does not exist.
    """
    reg = registry if registry is not None else Registry(runs, graph_dirs)
    static = Path(static_dir) if static_dir is not None else STATIC_DIR
    worker = Worker(reg)

    async def guarded(fn, *args):
        """``fn(*args)`` in the thread pool; a ViewerError becomes its JSON error, anything
        else a logged 500."""
        try:
            return await run_in_threadpool(fn, *args)
        except ViewerError as exc:
            return _error(exc.status, str(exc))
        except Exception as exc:
            return _server_error(exc)

    def as_json(fn):
        async def endpoint(request: Request):
            out = await guarded(fn, request)
            return out if isinstance(out, Response) else JSON(out)

        return endpoint

    # ------------------------------------------------------------------ pages
    def page_args(request: Request, page: str) -> dict:
        p, q = request.path_params, request.query_params
        if page == "run":
            return {"run": reg.run(p["run"]).id}
        if page == "graph":
            return {"graph": reg.graph(p["graph"]).id}
        if page == "feature":
            return {"run": reg.run(p["run"]).id, "layer": D.parse_int(p["layer"], "layer"),
                    "index": D.parse_int(p["index"], "index"), "variant": q.get("variant", "")}
        if page == "search":
            return {"q": q.get("q", ""), **({"run": reg.run(q["run"]).id} if q.get("run") else {})}
        return {}

    def page(name: str):
        def build(request: Request):
            return HTMLResponse(page_html(name, page_args(request, name)))

        async def endpoint(request: Request):
            return await guarded(build, request)

        return endpoint

    def export(name: str):
        def build(request: Request):
            doc, csp = export_page(reg, name, page_args(request, name), static_dir=static)
            stem = {"graph": lambda a: a["graph"], "run": lambda a: a["run"],
                    "feature": lambda a: f"{a['run']}-L{a['layer']}-f{a['index']}"}[name](page_args(request, name))
            safe = "".join(ch if ch.isascii() and (ch.isalnum() or ch in "-_.") else "_" for ch in stem) or "export"
            return HTMLResponse(doc, headers={"Content-Security-Policy": csp,
                                              "Content-Disposition": f'attachment; filename="{safe}.html"'})

        async def endpoint(request: Request):
            return await guarded(build, request)

        return endpoint

    # ------------------------------------------------------------------ API
    def api_run(request: Request):
        return D.run_overview(reg, request.path_params["run"])

    def api_graph(request: Request):
        return D.graph_payload(reg, request.path_params["graph"])

    def api_edges(request: Request):
        g, q = request.path_params["graph"], request.query_params
        reg.graph(g)
        offset = D.parse_int(q.get("offset"), "offset", default=0)
        limit = D.parse_int(q.get("limit"), "limit", lo=0) if q.get("limit") not in (None, "") else None
        return Response(D.edges_page(reg, g, offset, limit), media_type="application/octet-stream")

    def api_feature(request: Request):
        p, q = request.path_params, request.query_params
        run = reg.run(p["run"]).id
        layer, index = D.parse_int(p["layer"], "layer"), D.parse_int(p["index"], "index")
        variant = q.get("variant", "")
        brief = q.get("brief", "")
        if brief not in ("", "0", "1"):
            raise BadRequest(f"'brief' must be 0 or 1, got {brief!r}")
        if brief == "1":
            return D.feature_brief(reg, run, layer, index, variant)
        return D.feature_payload(reg, run, layer, index, variant)

    def api_search(request: Request):
        q = request.query_params
        return D.search(reg, q.get("q"), q.get("run") or None, D.parse_int(q.get("limit"), "limit", default=D.SEARCH_LIMIT,
                                                                            lo=1, hi=1000))

    async def api_heads(request: Request):
        g, q = request.path_params["graph"], request.query_params

        def check():
            reg.graph(g)
            return D.graph_node(reg, g, q.get("src"), "src"), D.graph_node(reg, g, q.get("dst"), "dst")

        ends = await guarded(check)
        if isinstance(ends, Response):
            return ends
        try:
            return JSON(await asyncio.wrap_future(worker.call(lambda: worker.heads(g, *ends))))
        except ViewerError as exc:
            return _error(exc.status, str(exc))
        except Exception as exc:
            return _server_error(exc)

    async def api_trace(request: Request):
        if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
            return _error(400, "send the trace request as JSON (Content-Type: application/json)")
        origin = request.headers.get("origin")
        if origin is not None and origin.split("://", 1)[-1] != request.headers.get("host", ""):
            return _error(400, f"cross-origin trace request from {origin!r} refused")
        raw = await request.body()
        if len(raw) > MAX_BODY:
            return _error(400, f"the request body is over {MAX_BODY} bytes")
        try:
            body = json.loads(raw)
        except ValueError:
            return _error(400, "the body is not valid JSON")

        def submit():
            run, prompt, targets, n = parse_trace_request(body, reg)
            return worker.submit_trace(run, prompt, targets, n)

        job = await guarded(submit)
        if isinstance(job, Response):
            return job
        return JSON({"job": job.id}, status_code=202)

    async def api_job(request: Request):
        try:
            return JSON(worker.job(request.path_params["job"]).status())
        except NotFound as exc:
            return _error(404, str(exc))

    async def http_error(request: Request, exc: Exception):
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        detail = exc.detail if isinstance(exc, HTTPException) else "internal error"
        return _error(status, f"{request.method} {request.url.path}: {detail}")

    routes = [
        Route("/", page("index")),
        Route("/run/{run}", page("run")),
        Route("/graph/{graph}", page("graph")),
        Route("/feature/{run}/{layer}/{index}", page("feature")),
        Route("/search", page("search")),
        Route("/export/graph/{graph}.html", export("graph")),
        Route("/export/feature/{run}/{layer}/{index}.html", export("feature")),
        Route("/export/run/{run}.html", export("run")),
        Route("/api/index", as_json(lambda _r: D.index(reg))),
        Route("/api/runs/{run}", as_json(api_run)),
        Route("/api/graphs/{graph}", as_json(api_graph)),
        Route("/api/graphs/{graph}/edges.bin", as_json(api_edges)),
        Route("/api/graphs/{graph}/heads", api_heads),
        Route("/api/features/{run}/{layer}/{index}", as_json(api_feature)),
        Route("/api/search", as_json(api_search)),
        Route("/api/trace", api_trace, methods=["POST"]),
        Route("/api/jobs/{job}", api_job),
        Mount("/static", app=StaticFiles(directory=static, check_dir=False), name="static"),
    ]
    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        worker.close()

    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error}, lifespan=lifespan,
                    middleware=[Middleware(SecurityHeaders, allowed_hosts=allowed_hosts)])
    app.router.redirect_slashes = False  # "/run/..%2F" is a 404, not a redirect to "/run/.."
    app.state.registry = reg
    app.state.worker = worker
    return app
