"""The viewer's HTML: the page shell every page shares, and the self-contained export.

A served page links ``/static/viewer.css``, ``/static/vendor/d3.min.js`` and
``/static/viewer.js`` and boots from ``<script id="tc-boot" type="application/json">``. An
export inlines the three files, allows exactly them by their sha256 hashes in a CSP ``<meta>``
(``connect-src 'none'``: the page cannot fetch anything) and fills the boot's ``data`` with
every API response the page needs, keyed by the API path the script would fetch
(:func:`graph_path`, :func:`feature_path`, :func:`run_path`).

The boot JSON escapes ``<``, ``>``, ``&``, U+2028 and U+2029 as ``\\u003c``..., so no text in it
(a prompt, a label) can end the script element or open another.
"""

from __future__ import annotations

import base64
import hashlib
import html
import re
from pathlib import Path
from typing import Any
from urllib.parse import quote

from .encode import dumps

PAGES = ("index", "run", "graph", "feature", "search")
STATIC_DIR = Path(__file__).parent / "static"
ASSETS = ("viewer.css", "vendor/d3.min.js", "viewer.js")
SERVED_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
              "object-src 'none'; base-uri 'none'; frame-ancestors 'none'")
# frame-ancestors only counts in a header; in a <meta> Chromium ignores it and logs an error
META_CSP = SERVED_CSP.removesuffix("; frame-ancestors 'none'")
MAX_FULL_FEATURES = 300
EDGE_PAGE = 2_000_000  # the page size viewer.js asks edges.bin for
MAX_EXPORT_EDGES = 250_000  # a graph export holds all edges (base64) up to this many
_BOOT_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}
_BOOT_RE = re.compile("[<>&\u2028\u2029]")
_CLOSE_SCRIPT = re.compile(r"</(script)", re.IGNORECASE)
_CLOSE_STYLE = re.compile(r"</(style)", re.IGNORECASE)


# ---------------------------------------------------------------------------------- API paths
def _seg(text: str) -> str:
    """A URL path segment as JavaScript's ``encodeURIComponent`` writes it."""
    return quote(str(text), safe="!'()*")


def graph_path(graph: str) -> str:
    """``/api/graphs/{graph}``: the key of a graph payload in an export's ``data``."""
    return f"/api/graphs/{_seg(graph)}"


def edges_path(graph: str, offset: int = 0, limit: int = EDGE_PAGE) -> str:
    """``/api/graphs/{graph}/edges.bin?offset=O&limit=N`` (in an export: base64 of the bytes)."""
    return f"/api/graphs/{_seg(graph)}/edges.bin?offset={int(offset)}&limit={int(limit)}"


def run_path(run: str) -> str:
    """``/api/runs/{run}``."""
    return f"/api/runs/{_seg(run)}"


def feature_path(run: str, layer: int, index: int, variant: str = "", *, brief: bool = False) -> str:
    """``/api/features/{run}/{layer}/{index}``, then ``?variant=V`` when there is a variant and
    ``brief=1`` for the hover card, in that order (``?variant=V&brief=1``)."""
    query = ([f"variant={_seg(variant)}"] if variant else []) + (["brief=1"] if brief else [])
    return f"/api/features/{_seg(run)}/{int(layer)}/{int(index)}" + ("?" + "&".join(query) if query else "")


# ---------------------------------------------------------------------------------- the shell
def _attr(text: str) -> str:
    """``text`` for a double-quoted attribute (CSP quotes stay readable)."""
    return html.escape(text, quote=False).replace('"', "&quot;")


def boot_json(page: str, args: dict, api: str | None, data: dict | None) -> str:
    """The boot object as JSON text safe inside a ``<script>`` element (see the module doc)."""
    if page not in PAGES:
        raise ValueError(f"unknown page {page!r}; one of {', '.join(PAGES)}")
    text = dumps({"page": page, "args": args, "api": api, "data": data})
    return _BOOT_RE.sub(lambda m: _BOOT_ESCAPES[m.group(0)], text)


def page_title(page: str, args: dict) -> str:
    """The ``<title>`` text of a page (not yet HTML-escaped)."""
    what = {"index": "runs and graphs", "run": f"run {args.get('run', '')}", "graph": f"graph {args.get('graph', '')}",
            "feature": f"feature {args.get('run', '')} L{args.get('layer', '')}"
                       f"{'/' + args['variant'] if args.get('variant') else ''} f{args.get('index', '')}",
            "search": f"search {args.get('q') or ''}".rstrip()}[page]
    return f"{what} - transcoders viewer"


def page_html(page: str, args: dict, *, title: str | None = None) -> str:
    """The served page: the shell of ``docs/viewer.md`` that loads ``/static/`` files and fetches ``/api``."""
    title = html.escape(title if title is not None else page_title(page, args))
    return ('<!doctype html><html><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{_attr(META_CSP)}">'
            f'<title>{title}</title><link rel="stylesheet" href="/static/viewer.css"></head>'
            '<body><div id="app"></div>'
            f'<script id="tc-boot" type="application/json">{boot_json(page, args, "/api", None)}</script>'
            '<script src="/static/vendor/d3.min.js"></script><script src="/static/viewer.js"></script></body></html>')


# ---------------------------------------------------------------------------------- exports
def _sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii") + "'"


def read_assets(static_dir: Path | None = None) -> tuple[str, str, str]:
    """``(css, d3, viewer_js)`` from the static folder, made safe to inline: ``</script`` and
    ``</style`` become ``<\\/script`` / ``<\\/style`` (the same text to JavaScript's strings and
    CSS).

    Raises:
        OSError: a file is missing (the message names it).
        ValueError: a script holds ``<!--``, which cannot be inlined without changing it.
    """
    folder = Path(static_dir) if static_dir is not None else STATIC_DIR
    texts = []
    for name in ASSETS:
        path = folder / name
        try:
            texts.append(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise OSError(f"the viewer's static file {path} is missing or unreadable ({exc.strerror or exc}); "
                          "reinstall transcoders (scripts/vendor_js.sh re-vendors d3)") from None
    css, d3, js = texts
    for name, text in zip(ASSETS[1:], (d3, js)):
        if "<!--" in text:
            raise ValueError(f"{folder / name} contains '<!--', which an inline script cannot hold unchanged")
    return _CLOSE_STYLE.sub(r"<\\/\1", css), _CLOSE_SCRIPT.sub(r"<\\/\1", d3), _CLOSE_SCRIPT.sub(r"<\\/\1", js)


def export_csp(css: str, scripts: tuple[str, ...]) -> str:
    """The CSP of an export: only the inline style and scripts with these exact texts, no
    connections, no other sources."""
    return (f"default-src 'none'; script-src {' '.join(_sha256(s) for s in scripts)}; style-src {_sha256(css)}; "
            "img-src data:; connect-src 'none'; object-src 'none'; base-uri 'none'; form-action 'none'")


def export_html(page: str, args: dict, data: dict, *, title: str | None = None,
                static_dir: Path | None = None) -> tuple[str, str]:
    """``(html, csp)``: the page as one self-contained file (inline CSS and scripts allowed by
    hash, ``api`` null, ``data`` = ``{API path: response}``).

    Raises:
        OSError / ValueError: see :func:`read_assets`.
    """
    css, d3, js = read_assets(static_dir)
    csp = export_csp(css, (d3, js))
    title = html.escape(title if title is not None else page_title(page, args))
    doc = ('<!doctype html><html><head><meta charset="utf-8">'
           f'<meta http-equiv="Content-Security-Policy" content="{_attr(csp)}">'
           f'<title>{title}</title><style>{css}</style></head>'
           '<body><div id="app"></div>'
           f'<script id="tc-boot" type="application/json">{boot_json(page, args, None, data)}</script>'
           f'<script>{d3}</script><script>{js}</script></body></html>')
    return doc, csp


def export_data(reg, page: str, args: dict) -> dict[str, Any]:
    """Every API response an exported page may ask for, keyed by its API path:

    - ``graph``: the graph payload; all edges as one ``edges.bin`` page (base64, when there are
      at most :data:`MAX_EXPORT_EDGES`); for the feature nodes the pruned graph shows (when its
      run is served with a feature store) every brief card and, for the
      :data:`MAX_FULL_FEATURES` most influential, the full feature payload;
    - ``feature``: the feature's payload and brief card;
    - ``run``: the run overview.

    Raises:
        NotFound: an unknown id or feature. BadRequest: another page.
    """
    from . import data as D
    from .registry import BadRequest, NotFound

    out: dict[str, Any] = {}
    if page == "graph":
        g = args["graph"]
        payload = D.graph_payload(reg, g)
        out[graph_path(g)] = payload
        if payload["n_edges_total"] <= min(MAX_EXPORT_EDGES, EDGE_PAGE):
            out[edges_path(g)] = base64.b64encode(D.edges_page(reg, g, 0, EDGE_PAGE)).decode("ascii")
        run = payload["run"]
        if run is None or not reg.run(run).has_features:
            return out
        nodes = payload["nodes"]
        seen: dict[tuple[int, int], float] = {}
        for i in set(payload["edges"]["src"]) | set(payload["edges"]["dst"]):
            n = nodes[i]
            if n["kind"] == "feature":
                k = (n["layer"], n["feature"])
                seen[k] = min(seen.get(k, 1.0), n["cum"] if n["cum"] is not None else 1.0)
        ranked = sorted(seen, key=lambda k: (seen[k], k))
        for rank, (layer, index) in enumerate(ranked):
            try:
                out[feature_path(run, layer, index, brief=True)] = D.feature_brief(reg, run, layer, index)
                if rank < MAX_FULL_FEATURES:
                    out[feature_path(run, layer, index)] = D.feature_payload(reg, run, layer, index)
            except NotFound:  # a layer the store does not cover: "not in this export"
                continue
    elif page == "feature":
        run, layer, index, variant = args["run"], args["layer"], args["index"], args.get("variant", "")
        out[feature_path(run, layer, index, variant)] = D.feature_payload(reg, run, layer, index, variant)
        out[feature_path(run, layer, index, variant, brief=True)] = D.feature_brief(reg, run, layer, index, variant)
    elif page == "run":
        out[run_path(args["run"])] = D.run_overview(reg, args["run"])
    else:
        raise BadRequest(f"a {page!r} page cannot be exported; export a graph, a feature or a run")
    return out


def export_page(reg, page: str, args: dict, *, static_dir: Path | None = None) -> tuple[str, str]:
    """``(html, csp)`` of the export of a graph, feature or run page (see :func:`export_data`)."""
    return export_html(page, args, export_data(reg, page, args), static_dir=static_dir)
