"""The viewer's server side on a real tiny setup: a tiny Llama saved to disk with random
transcoders, graphs made by `transcoders trace`, a feature store made by `transcoders features`.
Every payload is checked against an independent computation from the files (load_graph, prune,
top_paths, FeatureStore), ids that try to leave the registry get 404, a trace job runs to the
end while the server keeps answering, per-head splits add up to their edge, and the HTML shell
and exports never carry a raw ``<script`` from data."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import struct
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import assert_one_line_error, tiny_llama_run
from starlette.testclient import TestClient

from transcoders.circuit_cli import replacement_for_graph
from transcoders.circuits.export import load_graph
from transcoders.circuits.graph import BIAS, EMBEDDING, FEATURE, KINDS, TARGET
from transcoders.circuits.paths import top_paths
from transcoders.circuits.prune import prune
from transcoders.circuits.qk import qk_attribution
from transcoders.cli import main
from transcoders.coders.run_folder import CoderKey
from transcoders.features.store import LABELS, FeatureStore, layer_folder
from transcoders.files import slugify
from transcoders.viewer.app import create_app
from transcoders.viewer.html import feature_path, graph_path

pytestmark = pytest.mark.usefixtures("single_thread")

PROMPT = "The quick brown fox jumps over the lazy dog"
XSS = "</script><script>alert(1)</script> the union"
FEATURE_ARGS = ["--tokens", "160", "--top-k", "5", "--n-samples", "6", "--before", "3", "--after", "2",
                "--random-every", "1", "--model-batch", "4", "--harvest-dtype", "float32", "--device", "cpu", "--quiet"]
EVIL_LABEL = "<script>alert('label')</script> zebra-marker"
STATIC_CSS = "body { color: black } /* </style> must not end the style */"
STATIC_D3 = "window.d3 = {version: 'stub'};"
STATIC_JS = "document.title = '</script>';"


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def setup(tmp_path_factory, single_thread):
    """A run (tiny Llama, random transcoders, train config) with two graphs from `trace`, a
    feature store from `features` with a label and an explanation written in, a --graphs
    folder holding a graph of a prompt full of markup, and a stand-in static folder."""
    mp = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("viewer")
    mp.setenv("TRANSCODERS_CACHE", str(root / "cache"))
    model_dir, run = tiny_llama_run(root)
    result = invoke("trace", run, "--model", model_dir, "--prompt", PROMPT, "--max-feature-nodes", "40")
    assert result.exit_code == 0, result.output
    graph_file = run / "graphs" / f"{slugify(PROMPT)}.json"
    assert graph_file.exists()
    other = root / "more-graphs"
    xss_file = other / "xss.json"
    result = invoke("trace", run, "--model", model_dir, "--prompt", XSS, "--out", xss_file, "--max-feature-nodes", "20")
    assert result.exit_code == 0, result.output
    (other / "notes.json").write_text('{"schema": "something/else"}')  # skipped with a warning
    result = invoke("features", run, *FEATURE_ARGS)
    assert result.exit_code == 0, result.output
    # a label with markup (it must come back verbatim in JSON) and an LLM explanation to search for
    store = FeatureStore(run / "features")
    key = CoderKey(1)
    live = sorted(int(i) for i in store.labels(key)["labels"])
    labels_path = store.folder / layer_folder(key) / LABELS
    obj = json.loads(labels_path.read_text())
    obj["labels"][str(live[0])] = EVIL_LABEL
    labels_path.write_text(json.dumps(obj))
    record = {"layer": 1, "variant": "", "index": live[1], "explainer": "tiny-llm", "judge": "tiny-llm",
              "text": "fires on quokka sightings", "scores": {"detection": 0.75, "fuzzing": 0.25}, "frequency": 0.1}
    (store.folder / layer_folder(key) / "explanations.jsonl").write_text(json.dumps(record) + "\n")
    static = root / "static"
    (static / "vendor").mkdir(parents=True)
    (static / "viewer.css").write_text(STATIC_CSS)
    (static / "vendor" / "d3.min.js").write_text(STATIC_D3)
    (static / "viewer.js").write_text(STATIC_JS)
    (root / "secret.txt").write_text("top secret")
    yield {"root": root, "model": model_dir, "run": run, "graph_file": graph_file, "xss_file": xss_file,
           "graphs_dir": other, "static": static, "labelled": live[0], "explained": live[1]}
    mp.undo()


@pytest.fixture(scope="module")
def client(setup):
    app = create_app([setup["run"]], [setup["graphs_dir"]], static_dir=setup["static"])
    with TestClient(app) as c:
        yield c


def _gid(client, path: Path) -> str:
    return client.app.state.registry.graph_id_for(path)


# ------------------------------------------------------------------------------------ index, runs
def test_index_lists_the_run_and_every_graph_file(client, setup):
    idx = client.get("/api/index").json()
    assert [r["id"] for r in idx["runs"]] == ["run"]
    r = idx["runs"][0]
    assert r["layers"] == [0, 1, 2] and r["has_features"] is True and r["model"] == str(setup["model"])
    assert r["n_graphs"] == 2  # its own graph, and the --graphs one that records this run
    by_id = {g["id"]: g for g in idx["graphs"]}
    assert set(by_id) == {slugify(PROMPT), "xss"}  # notes.json is not a graph
    for path in (setup["graph_file"], setup["xss_file"]):
        g, entry = load_graph(path), by_id[path.stem]
        assert (entry["n_nodes"], entry["n_edges"], entry["run"]) == (g.n_nodes, g.n_edges, "run")
        assert entry["prompt"] == g.meta["prompt"]


def test_run_overview_reads_metrics_and_nan_becomes_null(client, setup):
    metrics = {"model": "m", "layers": {"1": {"l0": 4.0, "fvu": float("nan"), "ce_loss_recovered": 0.9, "kl": 0.01,
                                             "dead_fraction": 0.5, "dead_in_training": 0.25},
                                       "2/k8": {"l0": 8.0, "fvu": 0.3, "ce_loss_recovered": float("inf"), "kl": 0.2,
                                                "dead_fraction": 0.1}},
               "spliced_together": {"ce_clean": 3.0, "ce_spliced": 3.5, "kl": 0.4, "ce_loss_recovered": 0.8}}
    path = setup["run"] / "metrics.json"
    path.write_text(json.dumps(metrics))  # json writes NaN / Infinity, as Python's json reads them
    try:
        body = client.get("/api/runs/run")
        assert body.status_code == 200
        ov = json.loads(body.text)  # strict JSON: no NaN tokens
    finally:
        path.unlink()
    assert ov["kind"] == "transcoder" and ov["has_features"] is True
    assert ov["layers"] == [
        {"key": "1", "layer": 1, "variant": "", "l0": 4.0, "fvu": None, "ce_loss_recovered": 0.9, "kl": 0.01,
         "dead_in_training": 0.25, "dead_fraction": 0.5},
        {"key": "2/k8", "layer": 2, "variant": "k8", "l0": 8.0, "fvu": 0.3, "ce_loss_recovered": None, "kl": 0.2,
         "dead_in_training": None, "dead_fraction": 0.1}]
    assert ov["spliced_together"] == metrics["spliced_together"]
    assert sorted(ov["graphs"]) == sorted([slugify(PROMPT), "xss"])
    # without metrics.json: the coders, with null metrics
    bare = client.get("/api/runs/run").json()
    assert [(x["key"], x["l0"]) for x in bare["layers"]] == [("0", None), ("1", None), ("2", None)]
    assert bare["spliced_together"] is None


# ------------------------------------------------------------------------------------ graphs
def _cum(infl: np.ndarray) -> np.ndarray:
    """circuit-tracer's cumulative score, written out: share of the total held by the nodes
    ranked at or above each node."""
    order = sorted(range(len(infl)), key=lambda i: (-infl[i], i))
    out, acc, total = np.ones(len(infl)), 0.0, infl.sum()
    for i in order:
        acc += infl[i]
        out[i] = min(acc / total, 1.0)
    return out


def test_graph_payload_equals_the_file(client, setup):
    gid = slugify(PROMPT)
    p = client.get(f"/api/graphs/{gid}").json()
    g = load_graph(setup["graph_file"])
    assert (p["id"], p["name"], p["prompt"], p["run"], p["n_layers"]) == (gid, gid, PROMPT, "run", g.n_layers)
    assert p["tokens"] == g.token_strs and p["n_edges_total"] == g.n_edges
    assert p["scores"] == json.loads(json.dumps(g.meta["scores"]))
    nodes = p["nodes"]
    assert [n["i"] for n in nodes] == list(range(g.n_nodes))
    assert [n["kind"] for n in nodes] == [KINDS[k] for k in g.kind.tolist()]
    for col in ("layer", "pos", "feature"):
        assert [n[col] for n in nodes] == getattr(g, col).tolist()
    for col in ("activation", "value", "influence"):
        want = getattr(g, col).double().tolist()
        assert [n[col] for n in nodes] == [None if x != x else x for x in want]
    cum = _cum(g.influence.double().numpy())
    cum[g.kind.numpy() == TARGET] = 0.0
    assert np.allclose([n["cum"] for n in nodes], cum, atol=1e-12)
    # labels: the store's, for feature nodes of layers it covers (the one with markup verbatim)
    store = FeatureStore(setup["run"] / "features")
    for n in nodes:
        want = store.labels(CoderKey(n["layer"]))["labels"].get(str(n["feature"])) if n["kind"] == "feature" else None
        assert n["label"] == want
    # edges: prune(graph) with trace's thresholds, mapped back through kept_nodes
    pr = prune(load_graph(setup["graph_file"]), node_threshold=0.8, edge_threshold=0.98)
    kept = pr.meta["pruned"]["kept_nodes"]
    want = {(kept[s], kept[d]): w for s, d, w in zip(pr.edge_src.tolist(), pr.edge_dst.tolist(),
                                                      pr.edge_weight.double().tolist())}
    got = dict(zip(zip(p["edges"]["src"], p["edges"]["dst"]), p["edges"]["weight"]))
    assert len(got) == len(p["edges"]["src"]) and got == want
    assert 0 < len(got) < g.n_edges
    targets = [{"node": int(n), "label": t.label, "weight": t.weight} for t, n in zip(g.targets, g.target_nodes.tolist())]
    assert p["targets"] == targets
    paths = top_paths(g, n=10)
    assert [(q["nodes"], q["weight"]) for q in p["paths"]] == [(x.nodes, x.weight) for x in paths]
    assert all(q["text"] for q in p["paths"]) and len(paths) > 0


def test_edges_bin_pages_cover_every_edge_once(client, setup):
    gid = slugify(PROMPT)
    g = load_graph(setup["graph_file"])
    whole = client.get(f"/api/graphs/{gid}/edges.bin")
    assert whole.headers["content-type"] == "application/octet-stream"
    total, offset, n = struct.unpack_from("<III", whole.content)
    assert (total, offset, n) == (g.n_edges, 0, g.n_edges) and len(whole.content) == 12 + 12 * n
    src = np.frombuffer(whole.content, "<i4", n, 12)
    assert src.tolist() == g.edge_src.tolist()
    assert np.frombuffer(whole.content, "<i4", n, 12 + 4 * n).tolist() == g.edge_dst.tolist()
    assert np.array_equal(np.frombuffer(whole.content, "<f4", n, 12 + 8 * n), g.edge_weight.numpy().astype(np.float32))
    seen, off, limit = [], 0, max(1, g.n_edges // 7)
    while True:
        page = client.get(f"/api/graphs/{gid}/edges.bin?offset={off}&limit={limit}").content
        t, o, k = struct.unpack_from("<III", page)
        assert (t, o) == (g.n_edges, off) and k <= limit
        seen += list(zip(np.frombuffer(page, "<i4", k, 12).tolist(), np.frombuffer(page, "<i4", k, 12 + 4 * k).tolist()))
        off += k
        if k == 0 or off >= t:
            break
    assert seen == list(zip(g.edge_src.tolist(), g.edge_dst.tolist()))
    for bad in ("offset=x", "limit=-1", f"offset={g.n_edges + 1}"):
        r = client.get(f"/api/graphs/{gid}/edges.bin?{bad}")
        assert r.status_code == 400 and "error" in r.json(), bad


# ------------------------------------------------------------------------------------ features
def test_feature_payload_equals_the_store_record(client, setup):
    store = FeatureStore(setup["run"] / "features")
    f = setup["explained"]
    rec = store.feature(1, f)
    p = client.get(f"/api/features/run/1/{f}").json()
    assert (p["run"], p["layer"], p["index"], p["variant"], p["label"]) == ("run", 1, f, "", rec.label)
    assert (p["n_tokens"], p["count"], p["max"]) == (rec.n_tokens, rec.count, pytest.approx(rec.max))
    assert p["frequency"] == pytest.approx(rec.frequency) and p["mean"] == pytest.approx(rec.mean)
    assert p["hist"] == {"counts": rec.hist, "edges": pytest.approx(rec.hist_edges)}
    ex = lambda e: {"tokens": e.tokens, "acts": pytest.approx(e.acts), "center": e.center}
    assert p["top"] == [ex(e) for e in rec.top] and len(rec.top) > 0
    assert p["quantile_groups"] == [[ex(e) for e in grp] for grp in rec.quantile_groups()]
    pairs = lambda xs: [[a, pytest.approx(b)] for a, b in xs]
    for name in ("logit_top", "logit_bottom", "deembedding", "pullback", "neighbours"):
        assert p[name] == pairs(getattr(rec, name)), name
    assert p["ov_heads"] == [[a, h, pytest.approx(s)] for a, h, s in rec.ov_heads]
    assert p["cooccurring"] == [[i, pytest.approx(j), n] for i, j, n in rec.cooccurring]
    assert p["explanations"] == [{"text": "fires on quokka sightings", "scores": {"detection": 0.75, "fuzzing": 0.25},
                                  "model": "tiny-llm", "judge": "tiny-llm"}]
    brief = client.get(f"/api/features/run/1/{f}?brief=1").json()
    assert brief == {"label": rec.label, "frequency": pytest.approx(rec.frequency), "max": pytest.approx(rec.max),
                     "top_tokens": [e.tokens[e.center] for e in rec.top[:5]], "logit_top": [t for t, _ in rec.logit_top[:5]]}
    assert client.get(f"/api/features/run/1/{setup['labelled']}?brief=1").json()["label"] == EVIL_LABEL
    assert client.get("/api/features/run/1/999").status_code == 404  # out of range
    assert client.get("/api/features/run/7/0").status_code == 404  # no such layer
    assert client.get("/api/features/run/1/0?variant=k64").status_code == 404
    assert client.get("/api/features/run/x/0").status_code == 400
    assert client.get("/api/features/run/1/0?brief=yes").status_code == 400


def test_search_finds_labels_and_explanations(client, setup):
    r = client.get("/api/search?q=ZEBRA-marker")
    assert r.status_code == 200
    assert '"<script>alert(' in r.text  # data comes back verbatim in JSON; escaping is the page's job
    hits = r.json()["results"]
    assert [(h["run"], h["layer"], h["index"], h["variant"], h["label"]) for h in hits] == [
        ("run", 1, setup["labelled"], "", EVIL_LABEL)]
    hits = client.get("/api/search?q=quokka").json()["results"]
    assert [(h["index"], h["explanation"], h["score"]) for h in hits] == [
        (setup["explained"], "fires on quokka sightings", 0.5)]
    assert client.get("/api/search?q=&run=run").status_code == 400
    assert client.get("/api/search?q=quokka&run=nope").status_code == 404
    assert client.get("/api/search?q=a&limit=0").status_code == 400


# ------------------------------------------------------------------------------------ safety
def test_ids_that_leave_the_registry_are_404(client, setup):
    gid = slugify(PROMPT)
    # (a bare ".." segment is resolved by the HTTP client itself, into another valid URL)
    bad = ["..%2Fsecret.txt", "..%2F..%2Fsecret.txt", "%2E%2E%2Fsecret.txt", "%2E%2E", "..%2F", "../secret.txt", "nope"]
    urls = []
    for b in bad:
        urls += [f"/api/runs/{b}", f"/api/graphs/{b}", f"/api/graphs/{b}/edges.bin", f"/api/graphs/{b}/heads?src=0&dst=1",
                 f"/api/features/{b}/1/0", f"/api/jobs/{b}", f"/run/{b}", f"/graph/{b}", f"/feature/{b}/1/0",
                 f"/export/graph/{b}.html", f"/export/run/{b}.html", f"/export/feature/{b}/1/0.html",
                 f"/api/search?q=a&run={b}", f"/search?q=a&run={b}"]
    urls += ["/static/..%2F..%2Fpyproject.toml", "/static/../secret.txt", "/static/..%2Fsecret.txt",
             "/static/%2E%2E/secret.txt", f"/api/graphs/{gid}%2F..%2F..%2Fsecret.txt"]
    for url in urls:
        r = client.get(url)
        assert r.status_code == 404, (url, r.status_code, r.text[:200])
        assert "top secret" not in r.text and "[build-system]" not in r.text
        assert r.headers["x-content-type-options"] == "nosniff"
        assert "error" in r.json()
    ok = client.get("/static/viewer.css")
    assert ok.status_code == 200 and ok.text == STATIC_CSS


def test_pages_are_the_shell_with_escaped_boot_json(client, setup):
    r = client.get("/graph/xss")
    assert r.status_code == 200 and r.headers["content-security-policy"].startswith("default-src 'self'")
    assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
    boot = re.search(r'<script id="tc-boot" type="application/json">(.*?)</script>', r.text).group(1)
    assert json.loads(boot) == {"page": "graph", "args": {"graph": "xss"}, "api": "/api", "data": None}
    assert r.text.count("<script") == 3
    r = client.get("/feature/run/1/3?variant=k8")
    boot = json.loads(re.search(r'type="application/json">(.*?)</script>', r.text).group(1))
    assert boot["args"] == {"run": "run", "layer": 1, "index": 3, "variant": "k8"}
    r = client.get("/search?q=%3C/script%3E%3Cscript%3Ealert(1)%3C/script%3E")
    assert r.status_code == 200 and "alert(1)</script>" not in r.text and r.text.count("<script") == 3
    boot = json.loads(re.search(r'type="application/json">(.*?)</script>', r.text).group(1))
    assert boot["args"]["q"] == "</script><script>alert(1)</script>"
    assert client.get("/feature/run/one/3").status_code == 400


def _sha(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def test_graph_export_is_self_contained_and_never_carries_raw_script_from_data(client, setup):
    r = client.get("/export/graph/xss.html")
    assert r.status_code == 200 and "attachment" in r.headers["content-disposition"]
    doc = r.text
    boot_m = re.search(r'<script id="tc-boot" type="application/json">(.*?)</script>', doc, re.S)
    boot_text = boot_m.group(1)
    for ch in "<>&\u2028\u2029":
        assert ch not in boot_text
    outside = doc[:boot_m.start(1)] + doc[boot_m.end(1):]
    assert "alert(1)" not in outside  # the prompt only appears escaped, inside the boot JSON
    assert outside.count("<script") == 3 and "</script><script>alert" not in doc
    boot = json.loads(boot_text)
    assert boot["page"] == "graph" and boot["api"] is None
    data = boot["data"]
    payload = data[graph_path("xss")]
    assert payload["prompt"] == XSS and payload == client.get("/api/graphs/xss").json()
    # every feature node the pruned graph shows has its brief card and (here, all) its full payload
    nodes = payload["nodes"]
    shown = {(nodes[i]["layer"], nodes[i]["feature"]) for i in payload["edges"]["src"] + payload["edges"]["dst"]
             if nodes[i]["kind"] == "feature"}
    assert shown
    for layer, index in shown:
        api = f"/api/features/run/{layer}/{index}"
        assert data[feature_path("run", layer, index, brief=True)] == client.get(api + "?brief=1").json()
        assert data[feature_path("run", layer, index)] == client.get(api).json()
    edges = base64.b64decode(data["/api/graphs/xss/edges.bin?offset=0&limit=2000000"])
    assert edges == client.get("/api/graphs/xss/edges.bin").content
    # CSP: exactly the inline style and scripts, by hash; no connections
    csp = re.search(r'<meta http-equiv="Content-Security-Policy" content="([^"]*)">', doc).group(1)
    assert csp == r.headers["content-security-policy"]
    css = re.search(r"<style>(.*?)</style>", doc, re.S).group(1)
    scripts = re.findall(r"<script>(.*?)</script>", doc, re.S)
    assert css == STATIC_CSS.replace("</style", "<\\/style")
    assert scripts == [STATIC_D3, STATIC_JS.replace("</script", "<\\/script")]
    assert f"script-src {_sha(scripts[0])} {_sha(scripts[1])};" in csp and f"style-src {_sha(css)};" in csp
    assert "connect-src 'none'" in csp and "default-src 'none'" in csp


def test_feature_and_run_exports_hold_their_payloads(client, setup):
    f = setup["labelled"]
    doc = client.get(f"/export/feature/run/1/{f}.html").text
    data = json.loads(re.search(r'type="application/json">(.*?)</script>', doc, re.S).group(1))["data"]
    assert data[f"/api/features/run/1/{f}"] == client.get(f"/api/features/run/1/{f}").json()
    assert data[f"/api/features/run/1/{f}"]["label"] == EVIL_LABEL and "zebra" not in doc.replace(
        re.search(r'type="application/json">(.*?)</script>', doc, re.S).group(1), "")
    doc = client.get("/export/run/run.html").text
    data = json.loads(re.search(r'type="application/json">(.*?)</script>', doc, re.S).group(1))["data"]
    assert data == {"/api/runs/run": client.get("/api/runs/run").json()}


# ------------------------------------------------------------------------------------ jobs
def test_trace_job_runs_to_done_without_replacing_a_file(client, setup):
    worker = client.app.state.worker
    from transcoders.circuit_cli import trace_prompt

    entered, release = threading.Event(), threading.Event()

    def held_trace(*args, progress, **kwargs):
        def report(f, msg):
            progress(f, msg)
            if not entered.is_set():
                entered.set()
                release.wait(timeout=600)
        return trace_prompt(*args, progress=report, **kwargs)

    original = setup["graph_file"].read_bytes()
    worker._trace = held_trace
    try:
        r = client.post("/api/trace", json={"run": "run", "prompt": PROMPT, "max_feature_nodes": 30})
        assert r.status_code == 202, r.text
        job = r.json()["job"]
        assert entered.wait(timeout=600)
        st = client.get(f"/api/jobs/{job}").json()
        assert st["state"] == "running" and 0.0 <= st["progress"] < 1 and st["graph"] is None
        assert client.get("/api/index").status_code == 200  # the server answers while the trace runs
        release.set()
        for _ in range(6000):
            st = client.get(f"/api/jobs/{job}").json()
            if st["state"] in ("done", "error"):
                break
            time.sleep(0.05)
    finally:
        release.set()
        worker._trace = None
    assert st["state"] == "done", st
    assert st["progress"] == 1.0 and st["error"] is None and st["elapsed_s"] > 0
    new_id = st["graph"]
    new_file = setup["run"] / "graphs" / f"{slugify(PROMPT)}-2.json"
    assert new_id == new_file.stem and new_file.exists()
    assert setup["graph_file"].read_bytes() == original  # the existing file was not replaced
    assert new_id in [g["id"] for g in client.get("/api/index").json()["graphs"]]
    g = load_graph(new_file)
    assert g.meta["prompt"] == PROMPT and g.meta["run_dir"] == str(setup["run"].resolve())
    assert client.get(f"/api/graphs/{new_id}").json()["n_edges_total"] == g.n_edges
    assert new_id in client.get("/api/runs/run").json()["graphs"]
    new_file.unlink()  # leave the run as the other tests expect it


def test_trace_requests_are_checked(client):
    post = lambda body, **kw: client.post("/api/trace", **({"json": body} if "content" not in kw else {}), **kw)
    assert post({"run": "nope", "prompt": "x"}).status_code == 404
    for body in ({"prompt": "x"}, {"run": "run"}, {"run": "run", "prompt": ""}, {"run": "run", "prompt": "x", "targets": "a"},
                 {"run": "run", "prompt": "x", "max_feature_nodes": -1}, {"run": "run", "prompt": "x", "extra": 1}, [1]):
        r = post(body)
        assert r.status_code == 400 and r.json()["error"], body
    r = client.post("/api/trace", content=json.dumps({"run": "run", "prompt": "x"}), headers={"content-type": "text/plain"})
    assert r.status_code == 400 and "application/json" in r.json()["error"]
    r = client.post("/api/trace", content="{", headers={"content-type": "application/json"})
    assert r.status_code == 400
    r = client.post("/api/trace", json={"run": "run", "prompt": "x"}, headers={"origin": "http://evil.example"})
    assert r.status_code == 400 and "cross-origin" in r.json()["error"]
    assert client.get("/api/jobs/0123456789abcdef").status_code == 404


def test_trace_job_error_is_reported(client):
    r = client.post("/api/trace", json={"run": "run", "prompt": "x", "targets": ["feature:9.0"]})
    job = r.json()["job"]
    for _ in range(6000):
        st = client.get(f"/api/jobs/{job}").json()
        if st["state"] in ("done", "error"):
            break
        time.sleep(0.05)
    assert st["state"] == "error" and st["error"] and st["graph"] is None


# ------------------------------------------------------------------------------------ heads
def test_heads_split_an_edge_into_parts_that_sum_to_it(client, setup):
    gid = slugify(PROMPT)
    g = load_graph(setup["graph_file"])
    src, dst, w = g.edge_src, g.edge_dst, g.edge_weight.double()
    ok = torch.isin(g.kind[src], torch.tensor([FEATURE, EMBEDDING])) & (g.kind[dst] == FEATURE) & (g.pos[src] != g.pos[dst])
    e = int(torch.where(ok, w.abs(), torch.tensor(-1.0, dtype=torch.float64)).argmax())
    r = client.get(f"/api/graphs/{gid}/heads?src={int(src[e])}&dst={int(dst[e])}").json()
    assert r["available"] is True and r["reason"] is None
    parts = r["components"]
    assert any(c["kind"] == "head" and c["head"] is not None and c["pos"] == int(g.pos[src[e]]) for c in parts)
    assert sum(c["weight"] for c in parts) == pytest.approx(float(w[e]), rel=1e-3, abs=1e-5)
    # The largest parts that move between positions say why their head attends there (QK attribution):
    # the score whose softmax over the keys is the head's attention weight there.
    moving = [c for c in parts if c["kind"] == "head" and c["pos"] != c["dst_pos"]]
    explained = [c for c in parts if c["qk"] is not None]
    assert explained == moving[:3] and explained
    rep = replacement_for_graph(g, setup["graph_file"], str(setup["model"]), setup["run"])
    for c in explained:
        assert c["qk"]["pattern"] == pytest.approx(float(rep.layers[c["layer"]].pattern[c["head"], c["dst_pos"], c["pos"]]))
        assert c["qk"]["because"].startswith("because query-side ") and " matches key-side " in c["qk"]["because"]
        others = [qk_attribution(rep, c["layer"], c["head"], c["dst_pos"], j).score for j in range(c["dst_pos"] + 1)]
        assert c["qk"]["score"] == pytest.approx(others[c["pos"]], rel=1e-5)
        weights = torch.softmax(torch.tensor(others, dtype=torch.float64), 0)
        assert float(weights[c["pos"]]) == pytest.approx(c["qk"]["pattern"], rel=1e-4)
    b = int(((g.kind[src] == BIAS)).nonzero()[0, 0])
    r = client.get(f"/api/graphs/{gid}/heads?src={int(src[b])}&dst={int(dst[b])}").json()
    assert r["available"] is False and "bias" in r["reason"] and r["components"] == []
    assert client.get(f"/api/graphs/{gid}/heads?src=0&dst=0").status_code == 404  # not an edge
    assert client.get(f"/api/graphs/{gid}/heads?src=x&dst=1").status_code == 400
    assert client.get(f"/api/graphs/{gid}/heads?src=0&dst={g.n_nodes}").status_code == 400


def test_heads_unavailable_without_the_run(setup):
    with TestClient(create_app([], [setup["graphs_dir"]], static_dir=setup["static"])) as c:
        g = load_graph(setup["xss_file"])
        e = int((g.kind[g.edge_src] == FEATURE).nonzero()[0, 0])
        r = c.get(f"/api/graphs/xss/heads?src={int(g.edge_src[e])}&dst={int(g.edge_dst[e])}").json()
        assert r["available"] is False and "RUN_DIR" in r["reason"]
        assert c.get("/api/graphs/xss").json()["run"] is None  # no run served: no labels, no run
        assert c.get("/api/index").json()["runs"] == []


def test_unexpected_host_is_refused_when_hosts_are_pinned(setup):
    app = create_app([setup["run"]], static_dir=setup["static"], allowed_hosts=["127.0.0.1", "localhost", "::1"])
    c = TestClient(app, base_url="http://127.0.0.1:8765")
    assert c.get("/api/index").status_code == 200
    assert TestClient(app, base_url="http://[::1]:8765").get("/api/index").status_code == 200
    r = TestClient(app, base_url="http://attacker.example").get("/api/index")
    assert r.status_code == 400 and "Host" in r.json()["error"]


# ------------------------------------------------------------------------------------ CLI
def test_serve_refuses_a_remote_host_without_allow_remote(setup, monkeypatch):
    import uvicorn

    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda _app, **kw: calls.append(kw))
    assert_one_line_error(invoke("serve", setup["run"], "--host", "0.0.0.0"), "--allow-remote", "0.0.0.0")
    assert calls == []
    result = CliRunner().invoke(main, ["serve", str(setup["run"]), "--host", "0.0.0.0", "--allow-remote", "--port", "9"])
    assert result.exit_code == 0, result.output
    assert "no authentication" in result.stderr
    assert calls == [{"host": "0.0.0.0", "port": 9, "log_level": "warning"}]
    result = invoke("serve", setup["run"], "--graphs", setup["graphs_dir"])
    assert result.exit_code == 0 and "1 runs and 2 graphs" in result.output
    assert calls[-1]["host"] == "127.0.0.1"
    assert_one_line_error(invoke("serve", setup["root"] / "missing"), "does not exist")


def test_export_html_writes_once_and_refuses_to_overwrite(setup, tmp_path):
    out = tmp_path / "graph.html"
    result = invoke("export-html", "--graph", setup["graph_file"], "--out", out)
    assert result.exit_code == 0, result.output
    doc = out.read_text()
    boot = json.loads(re.search(r'type="application/json">(.*?)</script>', doc, re.S).group(1))
    assert boot["page"] == "graph" and boot["args"] == {"graph": slugify(PROMPT)}
    payload = boot["data"][graph_path(slugify(PROMPT))]
    assert payload["run"] == "run" and payload["n_edges_total"] == load_graph(setup["graph_file"]).n_edges
    assert any(k.startswith("/api/features/run/") for k in boot["data"])
    before = out.read_bytes()
    assert_one_line_error(invoke("export-html", "--graph", setup["graph_file"], "--out", out), "--force")
    assert out.read_bytes() == before
    assert invoke("export-html", "--graph", setup["graph_file"], "--out", out, "--force").exit_code == 0
    feat = tmp_path / "feature.html"
    assert invoke("export-html", "--run", setup["run"], "--feature", f"1.{setup['labelled']}", "--out", feat).exit_code == 0
    boot = json.loads(re.search(r'type="application/json">(.*?)</script>', feat.read_text(), re.S).group(1))
    assert boot["data"][f"/api/features/run/1/{setup['labelled']}"]["label"] == EVIL_LABEL
    assert invoke("export-html", "--run", setup["run"], "--out", tmp_path / "run.html").exit_code == 0
    assert_one_line_error(invoke("export-html", "--out", tmp_path / "x.html"), "--graph")
    assert_one_line_error(invoke("export-html", "--run", setup["run"], "--feature", "1.x", "--out", tmp_path / "y.html"),
                          "LAYER.FEATURE")
