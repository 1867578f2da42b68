"""The viewer in a real browser (Debian's headless Chromium driven by Playwright), end to end on
a tiny Llama: a real run folder with random transcoders, a real feature store (``transcoders
features``) and a real graph (``transcoders trace``) served by ``transcoders.viewer.app``.

The graph page draws its nodes and edges, a click shows a node's incoming edges and its feature
dashboard, the threshold slider prunes live, a trace started on the run page ends on its new
graph, the feature page highlights tokens by activation, and an exported graph renders from
``file://`` with the network cut off. Untrusted text (corpus lines, the prompt, labels,
explanations) carrying ``<script>``, ``onerror=`` and ``javascript:`` payloads shows as text and
never runs: those pages are also opened with the page's CSP bypassed, so it is the script's own
handling that is tested, not the CSP.

Skipped when Chromium or Playwright is missing, unless the environment variable ``CI`` is set
(then that is a failure). ``TC_SCREENSHOTS=1`` also writes ``docs/images/viewer_graph.png`` and
``docs/images/viewer_feature.png``.
"""

from __future__ import annotations

import json
import os
import random
import re
import socket
import threading
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
               "--disable-sync", "--no-first-run"]


def _missing() -> str | None:
    if not Path(CHROMIUM).exists():
        return f"{CHROMIUM} is not installed (apt-get install chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the Python package playwright is not installed (pip install playwright)"
    return None


_WHY = _missing()
if _WHY is not None:
    if os.environ.get("CI"):
        pytest.fail(f"the browser tests cannot run: {_WHY}", pytrace=False)
    pytest.skip(f"browser tests skipped: {_WHY}", allow_module_level=True)

from click.testing import CliRunner  # noqa: E402
from conftest import save_random_transcoders  # noqa: E402
from playwright.sync_api import sync_playwright  # noqa: E402
from test_cli import _save_llama  # noqa: E402

from transcoders.cli import main  # noqa: E402
from transcoders.features.store import ACTS, EXPLANATIONS, LABELS, FeatureStore  # noqa: E402
from transcoders.training.config import TrainConfig  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

XSS = ("<script>window.__pwned=1</script>", '"><img src=x onerror="window.__pwned=1">', "javascript:window.__pwned=1")
PROMPT = f"The quick brown fox {XSS[0]} jumps {XSS[1]} over {XSS[2]}"
FEATURE_ARGS = ["--tokens", "400", "--top-k", "5", "--n-samples", "8", "--before", "4", "--after", "3", "--random-every", "1",
                "--model-batch", "4", "--harvest-dtype", "float32", "--device", "cpu", "--quiet"]
SCREENSHOTS = Path(__file__).resolve().parents[1] / "docs" / "images"
BOOT = re.compile(r'<script id="tc-boot" type="application/json">(.*?)</script>', re.S)
THRESHOLD = 0.8  # the page's default node threshold


def tokenizer():
    """The tests' tiny byte-level BPE tokenizer (conftest.build_tiny_tokenizer) also trained on
    the payloads, so that the prompt fits the tiny model's 64 positions."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    sentences = ["Fellow citizens of the Senate and House of Representatives.", "The quick brown fox jumps over the lazy dog.",
                 "the state of the union is strong", *XSS]
    tok.train_from_iterator(sentences * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


# ---------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def files(tmp_path_factory, single_thread):
    """A tiny Llama, random transcoders for its 3 layers, a corpus full of payloads, the feature
    store (labels replaced by payloads, one explanation per live feature) and a traced graph
    whose prompt carries the payloads, in ``run/graphs/``."""
    root = tmp_path_factory.mktemp("viewer")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRANSCODERS_CACHE", str(root / "cache"))
        model_dir = _save_llama(root / "model", tokenizer())
        rng = random.Random(0)
        words = "the state of the union is strong fellow citizens of the senate quick brown fox".split()
        docs = []
        for _ in range(12):
            parts = []
            for _ in range(10):
                parts.append(" ".join(rng.choice(words) for _ in range(rng.randint(2, 5))))
                parts.append(rng.choice(XSS))
            docs.append(" ".join(parts))
        train = root / "train.jsonl"
        train.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
        run = save_random_transcoders(root / "run", str(model_dir), d_sae=64, k=4)
        cfg = TrainConfig(model=str(model_dir), data=str(train), ctx_len=32, skip_first_tokens=1)
        (run / "train_config.json").write_text(cfg.model_dump_json())

        result = invoke("features", run, *FEATURE_ARGS)
        assert result.exit_code == 0, result.output
        store = FeatureStore(run / "features")
        live = {}
        for key in store.keys:
            folder = store.folder / store.info(key)["folder"]
            labels = json.loads((folder / LABELS).read_text())
            labels["labels"] = {i: f"{XSS[int(i) % 3]} #{i}" for i in labels["labels"]}
            (folder / LABELS).write_text(json.dumps(labels))
            with open(folder / EXPLANATIONS, "a", encoding="utf-8") as fh:
                for i in labels["labels"]:
                    fh.write(json.dumps({"layer": key.layer, "variant": key.variant, "index": int(i), "explainer": XSS[1],
                                         "judge": "rule", "text": f"fires on {XSS[(int(i) + 1) % 3]}",
                                         "scores": {"detection": 0.75, "fuzzing": None}, "frequency": 0.1}) + "\n")
            count = store.tensor(key, ACTS, "count")
            live[key.layer] = int(count.argmax())

        graph_file = run / "graphs" / "fox.json"
        graph_file.parent.mkdir()
        result = invoke("trace", run, "--model", model_dir, "--prompt", PROMPT, "--out", graph_file)
        assert result.exit_code == 0, result.output
    return {"root": root, "run": run, "model": model_dir, "graph": "fox", "live": live}


@pytest.fixture(scope="module")
def server(files):
    """The viewer app on a free loopback port, served by uvicorn in a background thread."""
    import uvicorn

    from transcoders.viewer.app import create_app

    app = create_app([files["run"]], [])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the viewer did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        yield b
        b.close()


class Page:
    """A browser page that records uncaught script errors (each test asserts there are none)."""

    def __init__(self, browser, **context_args):
        self.context = browser.new_context(viewport={"width": 1400, "height": 900}, **context_args)
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        self.page.on("console", lambda msg: self.errors.append(msg.text)
                     if msg.type == "error" and "violates the following Content Security Policy" in msg.text else None)

    def open(self, url: str) -> dict:
        """Go to ``url`` and wait for ``tcViewer.ready``; returns ``tcViewer.stats``."""
        self.page.goto(url)
        stats = self.page.evaluate("window.tcViewer.ready")
        assert stats["error"] is None, stats
        return stats

    def stats(self) -> dict:
        return self.page.evaluate("window.tcViewer.stats")

    def wait(self, js: str, timeout: float = 10.0):
        """Poll ``js`` until truthy (wait_for_function would need 'unsafe-eval' under the CSP)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.page.evaluate(js)
            if value:
                return value
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {js}")

    def click_node(self, k: int, *, shift: bool = False) -> None:
        """A real mouse click at node ``k``'s centre (circles may overlap, so not locator.click)."""
        loc = self.page.locator(f'circle[data-i="{k}"]')
        loc.scroll_into_view_if_needed()
        box = loc.bounding_box()
        assert box is not None, f"node {k} is not drawn"
        if shift:
            self.page.keyboard.down("Shift")
        self.page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        if shift:
            self.page.keyboard.up("Shift")

    def pwned(self):
        return self.page.evaluate("window.__pwned")

    def close(self):
        assert not self.errors, self.errors
        self.context.close()


@pytest.fixture
def page(browser):
    p = Page(browser)
    yield p
    p.close()


@pytest.fixture
def unsafe_page(browser):
    """A page with the Content-Security-Policy bypassed: only the script's own care keeps text inert."""
    p = Page(browser, bypass_csp=True)
    yield p
    p.close()


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def pick_feature(payload: dict, *, allowed=None) -> int:
    """The most influential drawn feature node with incoming edges in the pruned graph (among
    ``allowed`` node indices if given)."""
    incoming = set(payload["edges"]["dst"])
    cands = [n for n in payload["nodes"] if n["kind"] == "feature" and n["i"] in incoming and n["cum"] is not None
             and n["cum"] <= THRESHOLD and (allowed is None or n["i"] in allowed)]
    assert cands, "no drawn feature node with incoming edges"
    return min(cands, key=lambda n: n["cum"])["i"]


def visible_circles(p: Page) -> int:
    return p.page.evaluate("document.querySelectorAll('svg.graph circle.node:not([display=none])').length")


# ------------------------------------------------------------------------------------- tests
def test_the_script_has_no_html_sinks_and_d3_is_the_pinned_version():
    """Static guards beside the browser tests: viewer.js never turns text into markup or code,
    and the vendored d3 is the version js/package-lock.json pins."""
    root = Path(__file__).resolve().parents[1]
    static = root / "transcoders" / "viewer" / "static"
    code = re.sub(r"/\*.*?\*/", "", (static / "viewer.js").read_text(), flags=re.S)
    code = "\n".join(line for line in code.splitlines() if not line.lstrip().startswith("//"))
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function", "javascript:",
                 ".html(", "setTimeout(\"", "setAttribute(\"style", 'attr("style'):
        assert sink not in code, sink
    pin = json.loads((root / "js" / "package.json").read_text())["dependencies"]["d3"]
    lock = json.loads((root / "js" / "package-lock.json").read_text())["packages"]["node_modules/d3"]["version"]
    assert pin == lock and re.fullmatch(r"\d+\.\d+\.\d+", pin)
    assert (static / "vendor" / "d3.min.js").read_text()[:100].startswith(f"// https://d3js.org v{pin} ")
    assert "Mike Bostock" in (static / "vendor" / "d3.LICENSE").read_text()


def test_graph_page_draws_nodes_and_a_click_shows_edges_and_the_dashboard(server, files, page):
    gid = files["graph"]
    payload = get_json(f"{server}/api/graphs/{gid}")
    stats = page.open(f"{server}/graph/{gid}")
    assert stats["nodes"] == len(payload["nodes"])
    assert 0 < stats["nodesDrawn"] <= stats["nodes"]
    assert stats["edgesDrawn"] > 0 and stats["edgesLoaded"] == len(payload["edges"]["src"])
    assert visible_circles(page) == stats["nodesDrawn"]
    assert page.page.get_attribute("a.export-link", "href") == f"/export/graph/{gid}.html"
    # the token axis holds the prompt's tokens
    axis = page.page.locator("svg.graph text.token").all_text_contents()
    assert len(axis) == len(payload["tokens"])

    k = pick_feature(payload)
    node = payload["nodes"][k]
    page.page.mouse.move(0, 0)
    page.click_node(k)
    page.page.wait_for_selector("#feature-panel .dashboard")
    assert page.stats()["selected"] == k
    assert page.page.locator("#selection .sel-name").text_content() == node["name"]
    # the incoming edges: the node's strongest sources in the pruned graph, strongest first
    e = payload["edges"]
    ins = sorted((abs(w), s) for s, d, w in zip(e["src"], e["dst"], e["weight"]) if d == k)[::-1]
    rows = page.page.locator("#incoming li button.node-ref")
    assert rows.count() == min(10, len(ins))
    assert rows.first.text_content() == payload["nodes"][ins[0][1]]["name"]
    # the dashboard: the stored label and examples with tokens highlighted by activation
    panel = page.page.locator("#feature-panel")
    assert node["label"] and node["label"] in panel.locator(".feature-label").text_content()
    assert panel.locator(".tok.active").count() > 0
    href = panel.locator("a.feature-page-link").get_attribute("href")
    assert href == f"/feature/run/{node['layer']}/{node['feature']}"
    # clicking an incoming edge's source selects that node
    rows.first.click()
    assert page.stats()["selected"] == ins[0][1]
    if os.environ.get("TC_SCREENSHOTS"):
        page.click_node(k)
        page.page.wait_for_selector("#feature-panel .dashboard")
        page.page.screenshot(path=str(SCREENSHOTS / "viewer_graph.png"))


def test_threshold_slider_prunes_nodes_live(server, files, page):
    stats = page.open(f"{server}/graph/{files['graph']}")
    before_nodes, before_edges = stats["nodesDrawn"], stats["edgesDrawn"]
    slider = page.page.locator("#threshold")
    assert float(slider.input_value()) == THRESHOLD
    slider.focus()
    page.page.keyboard.press("Home")  # the slider's minimum, 0.05
    page.wait(f"window.tcViewer.stats.nodesDrawn < {before_nodes}")
    low = page.stats()
    assert low["edgesDrawn"] <= before_edges
    assert visible_circles(page) == low["nodesDrawn"]
    assert page.page.locator(".threshold-value").text_content() == "0.05"
    page.page.keyboard.press("End")  # 1.0: every node but the hidden bias nodes
    page.wait(f"window.tcViewer.stats.nodesDrawn > {before_nodes}")
    payload = get_json(f"{server}/api/graphs/{files['graph']}")
    assert page.stats()["nodesDrawn"] == sum(n["kind"] != "bias" for n in payload["nodes"])
    page.page.check("#show-bias")
    page.wait(f"window.tcViewer.stats.nodesDrawn == {len(payload['nodes'])}")


def test_pins_supernodes_paths_and_all_edges(server, files, page):
    gid = files["graph"]
    payload = get_json(f"{server}/api/graphs/{gid}")
    page.open(f"{server}/graph/{gid}")
    # a path: its nodes are marked
    assert page.page.locator("button.path").count() == len(payload["paths"]) > 0
    page.page.locator("button.path").first.click()
    assert page.stats()["pathNodes"] == len(payload["paths"][0]["nodes"])
    assert page.page.locator("circle.node.on-path").count() == len(set(payload["paths"][0]["nodes"]))
    # pin two nodes (shift-click and the Pin button) and group them into a supernode
    a = pick_feature(payload)
    b = next(n["i"] for n in payload["nodes"] if n["kind"] == "target")
    page.click_node(a, shift=True)
    page.click_node(b)
    page.page.click("#selection button.pin")
    assert page.stats()["pinned"] == 2
    page.page.fill(".group-form input", "my group")
    page.page.click("button.group")
    assert page.page.locator("svg.graph text.supernode-label").text_content() == "my group"
    page.page.check("#sub-only")
    page.wait("window.tcViewer.stats.nodesDrawn === 2")
    page.page.uncheck("#sub-only")
    # load every edge of the file through edges.bin
    page.page.click("button.load-edges")
    page.wait(f"window.tcViewer.stats.edgesLoaded === {payload['n_edges_total']}")
    assert page.page.locator("button.load-edges").is_disabled()


def test_a_trace_from_the_run_page_ends_on_its_new_graph(server, files, page):
    before = {g["id"] for g in get_json(f"{server}/api/index")["graphs"]}
    page.open(f"{server}/run/run")
    assert page.page.locator("svg.bars").count() == 4  # L0, FVU, loss recovered, dead
    assert page.page.get_attribute("a.export-link", "href") == "/export/run/run.html"
    page.page.fill("textarea[name=prompt]", f"Fellow citizens {XSS[1]}")
    page.page.fill("textarea[name=targets]", "logit:#5\nlogit:#7")
    page.page.click(".trace-form button[type=submit]")
    page.page.wait_for_selector(".job progress", state="attached")
    page.page.wait_for_url(re.compile(r"/graph/[^/]+$"), timeout=60_000)
    stats = page.page.evaluate("window.tcViewer.ready")
    assert stats["error"] is None and stats["nodesDrawn"] > 0
    new = page.page.url.rsplit("/", 1)[1]
    assert new not in before and new in {g["id"] for g in get_json(f"{server}/api/index")["graphs"]}
    assert len(get_json(f"{server}/api/graphs/{new}")["targets"]) == 2
    assert XSS[1] in page.page.locator(".page-head .prompt").text_content()
    assert page.pwned() is None


def test_feature_page_highlights_tokens_by_activation(server, files, page):
    layer, index = 1, files["live"][1]
    f = get_json(f"{server}/api/features/run/{layer}/{index}")
    stats = page.open(f"{server}/feature/run/{layer}/{index}")
    assert stats["examples"] >= len(f["top"]) > 0
    active = page.page.locator(".dashboard > section .tok.active")
    assert active.count() > 0
    # the highlight's strength is the token's activation over the feature's maximum
    top = f["top"][0]
    first = page.page.locator(".examples").first.locator(".example").first
    centre = first.locator(".tok.center")
    assert centre.text_content() == top["tokens"][top["center"]].replace("\n", "↵").replace("\t", "⇥")
    strength = float(centre.evaluate("el => el.style.getPropertyValue('--a')"))
    assert strength == pytest.approx(min(1.0, top["acts"][top["center"]] / f["max"]), abs=2e-3)
    assert page.page.locator("figure.hist rect.bar").count() == len(f["hist"]["counts"])
    assert page.page.locator(".explanation").count() == len(f["explanations"]) > 0
    assert page.page.get_attribute("a.export-link", "href") == f"/export/feature/run/{layer}/{index}.html"
    if os.environ.get("TC_SCREENSHOTS"):
        page.page.screenshot(path=str(SCREENSHOTS / "viewer_feature.png"), full_page=True)


def _no_live_markup(p: Page) -> None:
    """Nothing from the data became markup: no images, no handlers, only our own hrefs."""
    found = p.page.evaluate("""() => ({
        imgs: document.querySelectorAll('img').length,
        scripts: [...document.scripts].filter(s => !s.src && s.type !== 'application/json').length,
        handlers: [...document.querySelectorAll('*')].filter(el => [...el.attributes].some(a => a.name.startsWith('on'))).length,
        hrefs: [...document.querySelectorAll('[href]')].map(el => el.getAttribute('href')).filter(h => !h.startsWith('/')),
    })""")
    assert found == {"imgs": 0, "scripts": 0, "handlers": 0, "hrefs": []}, found
    assert p.pwned() is None


def test_untrusted_text_shows_as_text_and_never_runs(server, files, unsafe_page):
    p, gid = unsafe_page, files["graph"]
    payload = get_json(f"{server}/api/graphs/{gid}")
    # graph page: prompt, token axis, labels in hover cards, side panel, dashboards, paths, supernode name
    p.open(f"{server}/graph/{gid}")
    assert p.page.locator(".page-head .prompt").text_content().endswith(PROMPT)
    shown = [n["i"] for n in payload["nodes"] if n["kind"] == "feature" and n["cum"] is not None and n["cum"] <= THRESHOLD]
    for k in shown[:8]:
        loc = p.page.locator(f'circle[data-i="{k}"]')
        loc.scroll_into_view_if_needed()
        box = loc.bounding_box()
        p.page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        p.wait(f"window.tcViewer.stats.hovered === {k}")
    p.wait("document.querySelector('.hovercard .card-brief .tok')")
    assert any(x in p.page.locator(".hovercard").text_content() for x in XSS)
    k = pick_feature(payload)
    p.click_node(k)
    p.page.wait_for_selector("#feature-panel .dashboard .tok.active")
    text = p.page.locator("#selection").text_content()
    assert payload["nodes"][k]["label"] in text
    for button in p.page.locator("#paths button.path").all()[:3]:
        button.click()
    p.page.locator("#incoming button.small").first.click()  # the per-head split of an edge
    p.wait("!document.querySelector('#edge-detail .heads').textContent.includes('computing')", timeout=30)
    heads = p.page.locator("#edge-detail .heads").text_content()
    assert "why the head attends there (QK)" in heads or "not available" in heads
    for why in p.page.locator("#edge-detail .heads .qk").all():  # QK attribution of the parts between positions
        assert why.text_content().startswith("because query-side ")
    p.click_node(k, shift=True)
    p.page.fill(".group-form input", XSS[1])
    p.page.click("button.group")
    assert p.page.locator("svg.graph text.supernode-label").text_content() == XSS[1]
    _no_live_markup(p)
    # feature page: corpus tokens, label, explanation text and explainer name
    layer, index = 2, files["live"][2]
    p.open(f"{server}/feature/run/{layer}/{index}")
    body = p.page.locator("main").text_content()
    assert f"{XSS[index % 3]} #{index}" in body and f"fires on {XSS[(index + 1) % 3]}" in body
    assert any(s in body for s in ("<", "onerror", "javascript"))  # corpus pieces of the payloads
    for d in p.page.locator("details").all():
        d.locator("summary").click()
    _no_live_markup(p)
    # search page: the query and the matching labels and explanations
    p.open(f"{server}/search?q={urllib.request.quote('__pwned')}")
    assert p.stats()["results"] > 0
    table = p.page.locator("table.results").text_content()
    assert all(x in table for x in XSS)
    assert p.page.locator(".search-big input").input_value() == "__pwned"
    p.page.locator("table.results a").first.click()
    p.page.wait_for_url(re.compile(r"/feature/"))
    p.page.evaluate("window.tcViewer.ready")
    _no_live_markup(p)
    # the index and run pages (prompt of the graph, run names)
    for url in (f"{server}/", f"{server}/run/run"):
        p.open(url)
        _no_live_markup(p)


def export(server: str, path: str, tmp_path: Path) -> tuple[str, dict]:
    """Download an export, write it to a file; returns its ``file://`` URL and boot object."""
    with urllib.request.urlopen(f"{server}{path}", timeout=60) as r:
        html = r.read().decode("utf-8")
    boot = json.loads(BOOT.search(html).group(1))
    assert boot["api"] is None
    file = tmp_path / path.rsplit("/", 1)[1]
    file.write_text(html, encoding="utf-8")
    return file.as_uri(), boot


def offline_page(browser, url: str) -> tuple[Page, list[str]]:
    """A page with the network off and every request but ``url`` itself aborted; returns the
    page and the list of URLs it requests."""
    p = Page(browser, offline=True)
    requests: list[str] = []
    p.page.on("request", lambda req: requests.append(req.url))
    p.context.route("**/*", lambda route: route.continue_() if route.request.url == url else route.abort())
    return p, requests


def test_an_exported_graph_renders_offline_from_a_file(server, files, browser, tmp_path):
    gid = files["graph"]
    url, boot = export(server, f"/export/graph/{gid}.html", tmp_path)
    payload = boot["data"][f"/api/graphs/{gid}"]
    full = {k for k in boot["data"] if k.startswith("/api/features/") and "brief" not in k}
    with_dash = {n["i"] for n in payload["nodes"]
                 if n["kind"] == "feature" and f"/api/features/run/{n['layer']}/{n['feature']}" in full}
    p, requests = offline_page(browser, url)
    try:
        stats = p.open(url)
        assert stats["nodesDrawn"] > 0 and stats["edgesDrawn"] > 0
        assert p.page.locator("a.export-link").count() == 0 and p.page.locator(".export-note").count() == 1
        k = pick_feature(payload, allowed=with_dash)
        p.click_node(k)
        p.page.wait_for_selector("#feature-panel .dashboard .tok.active")
        assert payload["nodes"][k]["label"] in p.page.locator("#feature-panel .feature-label").text_content()
        assert p.page.locator("#feature-panel a").count() == 0  # no links to pages the file does not hold
        # what the file does not hold says so
        p.page.locator("#incoming button.small").first.click()
        p.wait("document.querySelector('#edge-detail .heads').textContent.includes('not in this export')")
        # all edges come from the file when it holds them (base64 edges.bin), else it says so
        if any("/edges.bin" in key for key in boot["data"]):
            p.page.click("button.load-edges")
            p.wait(f"window.tcViewer.stats.edgesLoaded === {payload['n_edges_total']}")
        else:
            p.page.click("button.load-edges")
            p.wait("document.querySelector('button.load-edges').textContent.includes('not in this export')")
        assert p.pwned() is None
        assert set(requests) == {url}, requests
    finally:
        p.close()


def test_exported_feature_and_run_pages_render_offline(server, files, browser, tmp_path):
    layer, index = 0, files["live"][0]
    for path, check in ((f"/export/feature/run/{layer}/{index}.html", "document.querySelectorAll('.tok.active').length > 0"),
                        ("/export/run/run.html", "document.querySelectorAll('svg.bars').length === 4")):
        url, _ = export(server, path, tmp_path)
        p, requests = offline_page(browser, url)
        try:
            p.open(url)
            assert p.page.evaluate(check), path
            assert p.page.locator("form").count() == 0  # no search box, no trace form
            assert p.pwned() is None
            assert set(requests) == {url}, requests
        finally:
            p.close()
