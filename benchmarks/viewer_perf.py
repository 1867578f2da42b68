"""How the viewer's graph page holds up on a big graph: load time and frame times in headless
Chromium.

Builds a synthetic but valid ``transcoders.graph/1`` file (the project's :class:`Graph` and
:func:`~transcoders.circuits.export.save_graph`): 30 layers x 20 positions, 2,000 feature nodes,
an error node per layer and position, the embeddings, a bias node per layer and position and 5
logit targets, each feature and target with ~30 incoming edges from earlier layers (heavy-tailed
random weights, rows balanced). Serves it with ``transcoders.viewer.app.create_app`` on loopback,
opens the graph page and measures:

- ``load_ms``: navigation start to ``tcViewer.ready`` (the page drawn), in the page's clock;
- ``hover``: requestAnimationFrame deltas while the mouse moves over nodes (hover cards, edge
  highlight), with every node shown (threshold 1.0);
- ``slider``: rAF deltas while the threshold slider is dragged from 1.0 to 0.05 and back, with
  the payload's edges (the pruned graph, at most 20,000), then again after "Load all edges".

Prints one JSON object (medians and 95th percentiles in ms). A frame at 60 Hz is 16.7 ms; the
page should keep the median there and the p95 under ~50 ms.

With ``--run RUN --graph NAME`` it measures a real graph of a run instead (``RUN/graphs/NAME.json``,
with the run's feature store), and with ``--screenshots DIR`` it also writes the graph page (the
most influential feature selected) and that feature's page as PNG, as in ``docs/viewer.md``.

    .venv/bin/python benchmarks/viewer_perf.py [--features 2000] [--layers 30] [--positions 20]
    .venv/bin/python benchmarks/viewer_perf.py --run runs/all --graph my-prompt --screenshots docs/images
"""

from __future__ import annotations

import argparse
import json
import math
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transcoders.circuits.export import save_graph
from transcoders.circuits.graph import BIAS, EMBEDDING, ERROR, FEATURE, TARGET, Graph
from transcoders.circuits.targets import Target

CHROMIUM = "/usr/bin/chromium"
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
               "--disable-sync", "--no-first-run"]


def synthetic_graph(n_features: int, n_layers: int, n_pos: int, fan_in: int = 30, n_targets: int = 5, seed: int = 0) -> Graph:
    """A random, valid graph: rows (features, targets) get ``fan_in`` edges from nodes of earlier
    layers at positions at or before theirs; ``value = sum of incoming + const + dropped``."""
    g = torch.Generator().manual_seed(seed)
    kind, layer, pos, feat = [], [], [], []

    def add(k, lay, p, f=-1):
        kind.append(k)
        layer.append(lay)
        pos.append(p)
        feat.append(f)

    for p in range(n_pos):
        add(EMBEDDING, -1, p)
    f_layer = torch.randint(0, n_layers, (n_features,), generator=g)
    # later positions hold more features, as in real graphs
    f_pos = (torch.rand(n_features, generator=g).sqrt() * n_pos).long().clamp_max(n_pos - 1)
    f_idx = torch.randint(0, 16384, (n_features,), generator=g)
    for lay, p, f in zip(f_layer.tolist(), f_pos.tolist(), f_idx.tolist()):
        add(FEATURE, lay, p, f)
    for lay in range(n_layers):
        for p in range(n_pos):
            add(ERROR, lay, p)
            add(BIAS, lay, p)
    for _ in range(n_targets):
        add(TARGET, n_layers, n_pos - 1)
    N = len(kind)
    kind_t, layer_t, pos_t = torch.tensor(kind), torch.tensor(layer), torch.tensor(pos)

    rows = ((kind_t == FEATURE) | (kind_t == TARGET)).nonzero().flatten().tolist()
    src, dst = [], []
    is_feat = kind_t == FEATURE
    for r in rows:
        # mostly features (as in real graphs), some error, embedding and bias nodes
        # features from the few layers just below (long chains, as in real graphs: pruning then
        # keeps many of them), other sources from any earlier layer
        near = (layer_t < layer_t[r]) & (layer_t >= layer_t[r] - 3) & (pos_t <= pos_t[r]) & is_feat
        earlier = (layer_t < layer_t[r]) & (pos_t <= pos_t[r]) & (kind_t != TARGET) & ~is_feat
        for pool, share in ((near, 0.8), (earlier, 0.2)):
            ok = pool.nonzero().flatten()
            n = min(round(fan_in * share), ok.numel())
            if n == 0:
                continue
            pick = ok[torch.randperm(ok.numel(), generator=g)[:n]]
            src += pick.tolist()
            dst += [r] * n
    E = len(src)
    # heavy-tailed weights: a few strong edges, many weak ones
    weight = torch.randn(E, generator=g, dtype=torch.float64) * torch.rand(E, generator=g, dtype=torch.float64) ** 2
    edge_src, edge_dst = torch.tensor(src), torch.tensor(dst)

    activation = torch.rand(N, generator=g, dtype=torch.float64) * 3
    incoming = torch.zeros(N, dtype=torch.float64).index_add_(0, edge_dst, weight)
    is_row = (kind_t == FEATURE) | (kind_t == TARGET)
    nan = torch.full((N,), math.nan, dtype=torch.float64)
    const = torch.where(is_row, torch.zeros(N, dtype=torch.float64), nan)
    dropped = const.clone()
    value = torch.where(is_row, incoming, nan)
    tnodes = (kind_t == TARGET).nonzero().flatten()
    probs = torch.softmax(torch.randn(n_targets, generator=g, dtype=torch.float64), 0).tolist()
    targets = [Target("logit", pos=n_pos - 1, token=100 + i, label=f"logit(' tok{i}')@{n_pos - 1}", weight=probs[i])
               for i in range(n_targets)]
    token_strs = [f" w{p}" for p in range(n_pos)]
    return Graph(tokens=list(range(n_pos)), token_strs=token_strs, n_layers=n_layers, kind=kind_t, layer=layer_t, pos=pos_t,
                 feature=torch.tensor(feat), activation=activation, value=value, const=const, dropped=dropped,
                 edge_src=edge_src, edge_dst=edge_dst, edge_weight=weight, targets=targets, target_nodes=tnodes,
                 meta={"model": "synthetic", "prompt": "".join(token_strs)})


def serve(graph_dir: Path | None, runs: list[Path] = ()):
    import uvicorn

    from transcoders.viewer.app import create_app

    app = create_app(list(runs), [graph_dir] if graph_dir else [])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started:
        if not thread.is_alive():
            raise SystemExit("the viewer did not start")
        time.sleep(0.02)
    return srv, thread, f"http://127.0.0.1:{port}"


def summary(deltas: list[float]) -> dict:
    """Count, median, 95th percentile and maximum of a list of durations (ms)."""
    if not deltas:
        return {"n": 0}
    s = sorted(deltas)
    p95 = s[min(len(s) - 1, math.ceil(0.95 * len(s)) - 1)]
    return {"n": len(s), "median_ms": round(statistics.median(s), 2), "p95_ms": round(p95, 2), "max_ms": round(s[-1], 2)}


START_FRAMES = """() => {
  window.__frames = []; window.__recording = true;
  let last = performance.now();
  const tick = (t) => { window.__frames.push(t - last); last = t; if (window.__recording) requestAnimationFrame(tick); };
  requestAnimationFrame(tick);
}"""
STOP_FRAMES = "() => { window.__recording = false; return window.__frames.slice(1); }"


def drag_slider(page, steps: int) -> None:
    box = page.locator("#threshold").bounding_box()
    y = box["y"] + box["height"] / 2
    right, left = box["x"] + box["width"] - 4, box["x"] + 4
    page.mouse.move(right, y)
    page.mouse.down()
    for i in range(1, steps + 1):
        page.mouse.move(right + (left - right) * i / steps, y)
    for i in range(1, steps + 1):
        page.mouse.move(left + (right - left) * i / steps, y)
    page.mouse.up()


def measure(page, args) -> dict:
    """Frame times while hovering over nodes in view, then while dragging the slider 1 -> 0.05 -> 1;
    and the page's own time to filter and draw (``stats.drawHistory``) over the drag."""
    pts = page.evaluate("""(n) => {
        const v = window.tcViewer.graph, wrap = document.querySelector('.graph-wrap').getBoundingClientRect();
        const out = [];
        for (let k = 0; k < v.N && out.length < n; k += 7) {
          const p = v.nodeClientXY(k);
          const inside = p.x > wrap.left + 5 && p.x < wrap.right - 5 && p.y > wrap.top + 5 && p.y < wrap.bottom - 5;
          if (p.shown && inside) out.push(p);
        }
        return out;
    }""", args.hover_nodes)
    page.evaluate(START_FRAMES)
    for pt in pts:
        page.mouse.move(pt["x"], pt["y"], steps=2)
    page.wait_for_timeout(100)
    hover = page.evaluate(STOP_FRAMES)
    page.evaluate("window.tcViewer.stats.drawHistory = []")
    page.evaluate(START_FRAMES)
    drag_slider(page, args.slider_steps)
    page.wait_for_timeout(100)
    slider = page.evaluate(STOP_FRAMES)
    draws = page.evaluate("window.tcViewer.stats.drawHistory")
    return {"hover": summary(hover) | {"nodes_hovered": len(pts)}, "slider": summary(slider),
            "slider_filter_and_draw_js": summary(draws)}


def screenshots(page, base: str, run: Path | None, out: Path) -> None:
    """The graph page with its most influential feature selected (side panel: edges and
    dashboard), and that feature's own page."""
    out.mkdir(parents=True, exist_ok=True)
    k = page.evaluate("""() => {
        const v = window.tcViewer.graph;
        let best = -1;
        v.nodes.forEach((n, i) => { if (n.kind === 'feature' && (best < 0 || n.cum < v.nodes[best].cum)) best = i; });
        v.select(best);
        return best;
    }""")
    page.wait_for_timeout(1500)
    page.screenshot(path=str(out / "viewer_graph.png"))
    node = page.evaluate("(k) => window.tcViewer.graph.nodes[k]", k)
    if run is not None:
        page.goto(f"{base}/feature/{run.name}/{node['layer']}/{node['feature']}")
        page.evaluate("window.tcViewer.ready")
        page.wait_for_timeout(500)
        page.screenshot(path=str(out / "viewer_feature.png"), full_page=True)


def wait_for(page, js: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if page.evaluate(js):
            return
        time.sleep(0.05)
    raise SystemExit(f"timed out waiting for {js}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--features", type=int, default=2000)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--positions", type=int, default=20)
    ap.add_argument("--hover-nodes", type=int, default=150)
    ap.add_argument("--slider-steps", type=int, default=60)
    ap.add_argument("--run", type=Path, default=None, help="measure a real graph of this run instead")
    ap.add_argument("--graph", default=None, help="with --run: the graph's name (file stem in RUN/graphs)")
    ap.add_argument("--screenshots", type=Path, default=None, help="write viewer_graph.png and viewer_feature.png here")
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    from transcoders.circuits.export import load_graph

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        if args.run is not None:
            name = args.graph
            graph = load_graph(args.run / "graphs" / f"{name}.json")
            args.features = int((graph.kind == FEATURE).sum())
            args.layers, args.positions = graph.n_layers, len(graph.tokens)
            srv, thread, base = serve(None, [args.run])
        else:
            name = "bench"
            graph = synthetic_graph(args.features, args.layers, args.positions)
            folder = Path(tmp) / "graphs"
            folder.mkdir()
            save_graph(graph, folder / "bench.json")
            srv, thread, base = serve(folder)
        build_s = time.perf_counter() - t0
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
                page = browser.new_page(viewport={"width": 1600, "height": 1000})
                errors: list[str] = []
                page.on("pageerror", lambda e: errors.append(str(e)))
                t1 = time.perf_counter()
                page.goto(f"{base}/graph/{name}")
                load_ms = page.evaluate("window.tcViewer.ready.then(() => performance.now())")
                first_s = time.perf_counter() - t1  # includes the server building the payload (cold)
                page.goto(f"{base}/graph/{name}")  # warm: the payload is cached by the server
                warm_ms = page.evaluate("window.tcViewer.ready.then(() => performance.now())")
                stats = page.evaluate("window.tcViewer.stats")
                if stats.get("error"):
                    raise SystemExit(f"the page failed: {stats['error']}")
                if args.screenshots is not None:
                    screenshots(page, base, args.run, args.screenshots)
                    page.goto(f"{base}/graph/{name}")
                    page.evaluate("window.tcViewer.ready")
                # every node shown
                page.locator("#threshold").focus()
                page.keyboard.press("End")
                wait_for(page, "window.tcViewer.stats.nodesDrawn > 0 && document.querySelector('#threshold').value === '1'")
                page.wait_for_timeout(200)
                full = page.evaluate("window.tcViewer.stats")

                payload_view = measure(page, args)

                t2 = time.perf_counter()
                page.click("button.load-edges")
                wait_for(page, f"window.tcViewer.stats.edgesLoaded === {graph.n_edges}")
                load_edges_s = time.perf_counter() - t2
                page.wait_for_timeout(200)
                all_edges = page.evaluate("window.tcViewer.stats")
                all_view = measure(page, args)
                browser.close()
        finally:
            srv.should_exit = True
            thread.join(10)
    out = {
        "graph": {"nodes": graph.n_nodes, "feature_nodes": args.features, "layers": args.layers, "positions": args.positions,
                  "edges_in_file": graph.n_edges, "edges_in_payload": stats["edgesLoaded"], "build_s": round(build_s, 2)},
        "load_ms": round(warm_ms, 1),
        "first_load_s_cold_server": round(first_s, 2),
        "first_load_ms_in_page": round(load_ms, 1),
        "drawn_at_threshold_1": {"nodes": full["nodesDrawn"], "edges": full["edgesDrawn"], "draw_ms": full["drawMs"]},
        "payload_edges": payload_view,
        "load_all_edges_s": round(load_edges_s, 2),
        "drawn_all_edges": {"nodes": all_edges["nodesDrawn"], "edges": all_edges["edgesDrawn"], "draw_ms": all_edges["drawMs"]},
        "all_edges": all_view,
        "page_errors": errors,
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
