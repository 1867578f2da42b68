/* The transcoders viewer: draws every page of `transcoders serve` (and of its exported files).
 *
 * Plain ES2020, no build step; the only library is the vendored d3 (static/vendor/d3.min.js).
 * The page's shell holds `<script id="tc-boot" type="application/json">` with
 * {page, args, api, data} (see docs/viewer.md). With `api` a string, data comes from the JSON
 * API; with `api === null` (an exported file) it comes from `data[path]`, keyed by the API path
 * the page would have fetched.
 *
 * Safety: every piece of data text reaches the page through textContent, d3's .text() or
 * setAttribute on non-URL attributes. `href`s come only from the route builders below (fixed
 * paths + encodeURIComponent). Nothing here uses innerHTML, insertAdjacentHTML,
 * document.write, eval, new Function, inline event attributes or javascript: URLs.
 */
(() => {
  "use strict";

  const d3 = window.d3;
  const stats = { page: null, error: null };
  let resolveReady;
  const ready = new Promise((resolve) => { resolveReady = resolve; });
  window.tcViewer = { ready, stats };

  // --------------------------------------------------------------------------------- boot data
  function readBoot() {
    const el = document.getElementById("tc-boot");
    if (!el) return { page: "missing", args: {}, api: null, data: {} };
    try {
      const b = JSON.parse(el.textContent || "{}");
      return b && typeof b === "object" ? b : {};
    } catch (_err) {
      return { page: "missing", args: {}, api: null, data: {} };
    }
  }
  const boot = readBoot();
  const API = typeof boot.api === "string" ? boot.api.replace(/\/+$/, "") : null;
  const EXPORT = API === null;
  const ARGS = boot.args && typeof boot.args === "object" ? boot.args : {};

  function normKey(k) {
    try { return decodeURIComponent(k); } catch (_err) { return k; }
  }
  const DATA = new Map();
  if (EXPORT && boot.data && typeof boot.data === "object") {
    for (const [k, v] of Object.entries(boot.data)) DATA.set(normKey(k), v);
  }

  // ------------------------------------------------------------------------------------- API
  class NotInExport extends Error {
    constructor(path) { super("not in this export"); this.path = path; }
  }
  class ApiError extends Error {
    constructor(message, status) { super(message); this.status = status; }
  }

  function fromExport(rel) {
    const key = normKey("/api" + rel);
    if (!DATA.has(key)) throw new NotInExport(rel);
    return DATA.get(key);
  }

  async function readJSONResponse(r) {
    let body = null;
    try { body = await r.json(); } catch (_err) { body = null; }
    if (!r.ok) {
      const msg = body && typeof body.error === "string" ? body.error : `HTTP ${r.status}`;
      throw new ApiError(msg, r.status);
    }
    return body;
  }

  /** GET an API path (relative to the API root, e.g. "/graphs/g1"). */
  async function getJSON(rel) {
    if (EXPORT) return fromExport(rel);
    const r = await fetch(API + rel, { headers: { Accept: "application/json" }, credentials: "same-origin" });
    return readJSONResponse(r);
  }

  function base64ToBuffer(text) {
    const bin = atob(text);
    const out = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
    return out.buffer;
  }

  /** GET a binary API path as an ArrayBuffer (in an export: data[path] holds base64 text). */
  async function getBinary(rel) {
    if (EXPORT) {
      const v = fromExport(rel);
      if (typeof v !== "string") throw new NotInExport(rel);
      return base64ToBuffer(v);
    }
    const r = await fetch(API + rel, { credentials: "same-origin" });
    if (!r.ok) await readJSONResponse(r);
    return r.arrayBuffer();
  }

  async function postJSON(rel, obj) {
    if (EXPORT) throw new NotInExport(rel);
    const r = await fetch(API + rel, {
      method: "POST", credentials: "same-origin",
      headers: { "Content-Type": "application/json", Accept: "application/json" },
      body: JSON.stringify(obj),
    });
    return readJSONResponse(r);
  }

  const cache = new Map();
  function cached(rel) {
    if (!cache.has(rel)) {
      const p = getJSON(rel);
      cache.set(rel, p);
      p.catch(() => cache.delete(rel));
    }
    return cache.get(rel);
  }

  // ---------------------------------------------------------------------------------- routes
  // The only source of hrefs. In an export they return null (other pages are not in the file),
  // and link() then writes plain text.
  const enc = encodeURIComponent;
  const isInt = (x) => Number.isInteger(x);
  const served = (fn) => (...a) => (EXPORT ? null : fn(...a));
  const variantQuery = (variant, extra) => {
    const parts = [];
    if (variant) parts.push(`variant=${enc(String(variant))}`);
    if (extra) parts.push(extra);
    return parts.length ? `?${parts.join("&")}` : "";
  };
  const routes = {
    index: served(() => "/"),
    run: served((run) => `/run/${enc(String(run))}`),
    graph: served((g) => `/graph/${enc(String(g))}`),
    feature: served((run, layer, index, variant) =>
      (isInt(layer) && isInt(index) ? `/feature/${enc(String(run))}/${layer}/${index}${variantQuery(variant)}` : null)),
    search: served((q) => `/search?q=${enc(String(q))}`),
    exportGraph: served((g) => `/export/graph/${enc(String(g))}.html`),
    exportRun: served((run) => `/export/run/${enc(String(run))}.html`),
    exportFeature: served((run, layer, index, variant) =>
      (isInt(layer) && isInt(index) ? `/export/feature/${enc(String(run))}/${layer}/${index}.html${variantQuery(variant)}` : null)),
  };
  const api = {
    index: () => "/index",
    run: (run) => `/runs/${enc(String(run))}`,
    graph: (g) => `/graphs/${enc(String(g))}`,
    edges: (g, offset, limit) => `/graphs/${enc(String(g))}/edges.bin?offset=${offset}&limit=${limit}`,
    heads: (g, src, dst) => `/graphs/${enc(String(g))}/heads?src=${src}&dst=${dst}`,
    feature: (run, layer, index, variant) => `/features/${enc(String(run))}/${layer}/${index}${variantQuery(variant)}`,
    brief: (run, layer, index, variant) => `/features/${enc(String(run))}/${layer}/${index}${variantQuery(variant, "brief=1")}`,
    search: (q, run) => `/search?q=${enc(String(q))}${run ? `&run=${enc(String(run))}` : ""}&limit=50`,
    trace: () => "/trace",
    job: (id) => `/jobs/${enc(String(id))}`,
  };

  // ------------------------------------------------------------------------------ DOM helpers
  const FORBIDDEN_ATTR = /^(on|href$|src$|srcdoc$|action$|formaction$|style$|xlink:href$)/i;

  /** h(tag, {attr: value}, ...children): attributes by setAttribute (never URL or handler
   *  attributes), string children as text nodes. */
  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    if (attrs) {
      for (const [k, v] of Object.entries(attrs)) {
        if (v === null || v === undefined || v === false) continue;
        if (FORBIDDEN_ATTR.test(k)) throw new Error(`attribute ${k} is not set through h()`);
        el.setAttribute(k, v === true ? "" : String(v));
      }
    }
    for (const c of children) append(el, c);
    return el;
  }
  function append(el, c) {
    if (c === null || c === undefined || c === false) return;
    if (Array.isArray(c)) { for (const x of c) append(el, x); return; }
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  /** A link to one of our routes (href from a route builder), or plain text if there is none. */
  function link(href, text, cls) {
    if (typeof href !== "string" || !href.startsWith("/") || href.startsWith("//")) return h("span", { class: cls || null }, text);
    const a = h("a", { class: cls || null }, text);
    a.setAttribute("href", href);
    return a;
  }
  function button(text, onClick, attrs) {
    const b = h("button", Object.assign({ type: "button" }, attrs || {}), text);
    b.addEventListener("click", onClick);
    return b;
  }
  function clear(el) { while (el.firstChild) el.removeChild(el.firstChild); return el; }

  function errorText(err) {
    if (err instanceof NotInExport) return "not in this export";
    return err && err.message ? err.message : String(err);
  }
  function showError(parent, err, prefix) {
    const cls = err instanceof NotInExport ? "missing" : "error";
    parent.append(h("p", { class: cls }, prefix ? `${prefix}: ${errorText(err)}` : errorText(err)));
  }

  const num = (x) => (typeof x === "number" && Number.isFinite(x) ? x : null);
  function fmt(x, digits = 3) {
    const v = num(x);
    if (v === null) return "–";
    if (v !== 0 && (Math.abs(v) >= 1e5 || Math.abs(v) < 10 ** -digits)) return v.toExponential(2);
    return String(+v.toFixed(digits));
  }
  const fmtPct = (x) => (num(x) === null ? "–" : `${(100 * x).toFixed(2)}%`);
  const fmtSigned = (x) => (num(x) === null ? "–" : (x >= 0 ? "+" : "") + fmt(x));
  const fmtInt = (x) => (num(x) === null ? "–" : Math.round(x).toLocaleString("en-US"));

  /** A token as shown: whitespace kept, newlines and tabs made visible. */
  function showTok(t) {
    return String(t ?? "").replace(/\n/g, "↵").replace(/\t/g, "⇥");
  }
  function clip(s, n) {
    s = String(s ?? "");
    return s.length > n ? `${s.slice(0, n - 1)}…` : s;
  }

  const app = document.getElementById("app") || document.body.appendChild(h("div", { id: "app" }));

  /** The page frame: nav bar (home, search, export link) and a main element. */
  function shell(title, exportHref) {
    document.title = `${title} — transcoders`;
    clear(app);
    const nav = h("nav", { class: "topbar" });
    nav.append(link(routes.index(), "transcoders", "brand"));
    nav.append(h("span", { class: "title" }, title));
    if (!EXPORT) {
      const form = h("form", { class: "search-mini", role: "search" });
      const input = h("input", { type: "search", name: "q", placeholder: "search labels", "aria-label": "search labels" });
      form.append(input);
      form.addEventListener("submit", (ev) => {
        ev.preventDefault();
        if (input.value.trim()) window.location.assign(routes.search(input.value.trim()));
      });
      nav.append(form);
    }
    if (exportHref) {
      const a = link(exportHref, "Export", "export-link");
      a.setAttribute("download", "");
      a.setAttribute("title", "download this page as one self-contained HTML file");
      nav.append(a);
    }
    if (EXPORT) nav.append(h("span", { class: "export-note" }, "exported page (offline)"));
    const main = h("main", { class: "page" });
    app.append(nav, main);
    return main;
  }

  function kvTable(rows) {
    const t = h("table", { class: "kv" });
    for (const [k, v] of rows) t.append(h("tr", null, h("th", null, k), h("td", null, v)));
    return t;
  }

  function table(headers, rows, cls) {
    const t = h("table", { class: cls || "data" });
    t.append(h("thead", null, h("tr", null, headers.map((x) => h("th", null, x)))));
    const body = h("tbody");
    for (const r of rows) body.append(h("tr", null, r.map((c) => h("td", null, c))));
    t.append(body);
    return t;
  }

  // ------------------------------------------------------------------------------ small charts
  /** A bar chart of `values` (null = missing) over `labels`, in SVG with d3. */
  function barChart(parent, title, labels, values, opts = {}) {
    const W = opts.width || 300, H = opts.height || 150;
    const m = { top: 22, right: 10, bottom: 30, left: 46 };
    const wrap = h("figure", { class: "chart" });
    parent.append(wrap);
    const svg = d3.select(wrap).append("svg").attr("width", W).attr("height", H).attr("class", "bars");
    svg.append("text").attr("class", "chart-title").attr("x", m.left).attr("y", 14).text(title);
    const x = d3.scaleBand().domain(labels.map(String)).range([m.left, W - m.right]).padding(0.15);
    const vals = values.map(num);
    const present = vals.filter((v) => v !== null);
    const lo = Math.min(0, d3.min(present) ?? 0), hi = Math.max(0, d3.max(present) ?? 1) || 1;
    const y = d3.scaleLinear().domain([lo, hi]).nice().range([H - m.bottom, m.top]);
    const step = Math.max(1, Math.ceil(labels.length / 12));
    svg.append("g").attr("transform", `translate(0,${H - m.bottom})`)
      .call(d3.axisBottom(x).tickValues(labels.map(String).filter((_, i) => i % step === 0)).tickSizeOuter(0));
    svg.append("g").attr("transform", `translate(${m.left},0)`).call(d3.axisLeft(y).ticks(4).tickFormat(opts.format || d3.format("~g")));
    const data = labels.map((l, i) => ({ l: String(l), v: vals[i] })).filter((d) => d.v !== null);
    const g = svg.append("g");
    g.selectAll("rect").data(data).join("rect")
      .attr("class", (d) => (d.v < 0 ? "bar neg" : "bar"))
      .attr("x", (d) => x(d.l)).attr("width", x.bandwidth())
      .attr("y", (d) => y(Math.max(0, d.v))).attr("height", (d) => Math.abs(y(d.v) - y(0)))
      .append("title").text((d) => `${d.l}: ${fmt(d.v, 4)}`);
    return wrap;
  }

  /** The activation histogram (log-spaced bins) of a feature. */
  function histogram(parent, hist, opts = {}) {
    const counts = (hist && hist.counts) || [], edges = (hist && hist.edges) || [];
    if (!counts.length) { parent.append(h("p", { class: "muted" }, "no histogram")); return; }
    const W = opts.width || 460, H = opts.height || 140;
    const m = { top: 10, right: 10, bottom: 28, left: 46 };
    const wrap = h("figure", { class: "chart hist" });
    parent.append(wrap);
    const svg = d3.select(wrap).append("svg").attr("width", W).attr("height", H);
    const n = counts.length;
    const x = d3.scaleLinear().domain([0, n]).range([m.left, W - m.right]);
    const y = d3.scaleSqrt().domain([0, d3.max(counts) || 1]).nice().range([H - m.bottom, m.top]);
    const lab = (i) => (num(edges[i]) === null ? "" : d3.format(".2~g")(edges[i]));
    const step = Math.max(1, Math.ceil(n / 8));
    // ticks at bin edges: tick i is the lower edge of bin i
    svg.append("g").attr("transform", `translate(0,${H - m.bottom})`)
      .call(d3.axisBottom(x).tickValues(d3.range(0, n + 1, step).filter((i) => i < edges.length)).tickFormat(lab).tickSizeOuter(0));
    svg.append("g").attr("transform", `translate(${m.left},0)`).call(d3.axisLeft(y).ticks(4, "~s"));
    const bw = Math.max(1, x(1) - x(0) - 1);
    svg.append("g").selectAll("rect").data(counts.map((c, i) => ({ c, i }))).join("rect")
      .attr("class", "bar").attr("x", (d) => x(d.i) + 0.5).attr("width", bw)
      .attr("y", (d) => y(d.c)).attr("height", (d) => y(0) - y(d.c))
      .append("title").text((d) => `${lab(d.i)} – ${lab(d.i + 1)}: ${fmtInt(d.c)}`);
    wrap.append(h("figcaption", null, "activation (log-spaced bins), count (sqrt scale)"));
  }

  // --------------------------------------------------------------------------------- examples
  /** One example as a line of tokens, each highlighted by its activation. */
  function exampleLine(ex, maxAct) {
    const line = h("div", { class: "example" });
    const toks = Array.isArray(ex && ex.tokens) ? ex.tokens : [];
    const acts = Array.isArray(ex && ex.acts) ? ex.acts : [];
    const peak = num(acts[ex.center]);
    if (peak !== null) line.append(h("span", { class: "ex-act" }, fmt(peak, 2)));
    const body = h("span", { class: "ex-tokens" });
    toks.forEach((t, j) => {
      const a = num(acts[j]) ?? 0;
      const span = h("span", { class: "tok", title: `activation ${fmt(a, 4)}` }, showTok(t));
      if (a > 0 && maxAct > 0) {
        span.classList.add("active");
        span.style.setProperty("--a", Math.min(1, a / maxAct).toFixed(3));
      }
      if (j === ex.center) span.classList.add("center");
      body.append(span);
    });
    line.append(body);
    return line;
  }

  function examplesBlock(list, maxAct, limit) {
    const div = h("div", { class: "examples" });
    const items = (list || []).slice(0, limit || list.length);
    if (!items.length) div.append(h("p", { class: "muted" }, "none"));
    for (const ex of items) div.append(exampleLine(ex, maxAct));
    return div;
  }

  function tokenList(title, rows, valueFmt) {
    const sec = h("section", { class: "tokens-list" }, h("h4", null, title));
    if (!rows || !rows.length) { sec.append(h("p", { class: "muted" }, "none")); return sec; }
    const t = h("table", { class: "data compact" });
    for (const r of rows) {
      const [tok, v] = Array.isArray(r) ? r : [r, null];
      t.append(h("tr", null, h("td", null, h("span", { class: "tok chip" }, showTok(tok))),
        h("td", { class: "num" }, v === null ? "" : (valueFmt || fmtSigned)(v))));
    }
    sec.append(t);
    return sec;
  }

  // ------------------------------------------------------------------------------ feature view
  /** A feature dashboard (the feature page, or compact in the graph's side panel). */
  function renderFeature(parent, f, ctx) {
    const compact = !!ctx.compact;
    const run = f.run ?? ctx.run, layer = num(f.layer) ?? ctx.layer, index = num(f.index) ?? ctx.index;
    const variant = f.variant ?? ctx.variant ?? "";
    const featLink = (L, i, text) => link(routes.feature(run, L, i, variant), text);
    const box = h("div", { class: compact ? "dashboard compact" : "dashboard" });
    parent.append(box);
    box.append(h("div", { class: "feature-label" }, f.label ? String(f.label) : "(no label)"));
    box.append(kvTable([
      ["fires on", `${fmtPct(f.frequency)} of tokens (${fmtInt(f.count)} of ${fmtInt(f.n_tokens)})`],
      ["mean / max", `${fmt(f.mean)} / ${fmt(f.max)}`],
    ]));
    const maxAct = num(f.max) || d3.max((f.top || []).flatMap((e) => e.acts || []).map(num)) || 1;
    if (compact) {
      box.append(h("h4", null, "top activations"));
      box.append(examplesBlock(f.top || [], maxAct, 5));
      const row = h("div", { class: "cols" });
      row.append(tokenList("promotes", (f.logit_top || []).slice(0, 6)));
      row.append(tokenList("suppresses", (f.logit_bottom || []).slice(0, 6)));
      box.append(row);
      const fl = routes.feature(run, layer, index, variant);
      if (fl) box.append(h("p", null, link(fl, "open the feature page →", "feature-page-link")));
      return box;
    }
    const top = h("section", null, h("h3", null, "activation histogram"));
    histogram(top, f.hist);
    box.append(top);
    box.append(h("section", null, h("h3", null, "top activations"), examplesBlock(f.top || [], maxAct)));
    const groups = Array.isArray(f.quantile_groups) ? f.quantile_groups : [];
    if (groups.length) {
      const sec = h("section", { class: "quantiles" }, h("h3", null, "quantile groups (sampled, highest first)"));
      const lens = groups.map((gr) => (Array.isArray(gr) ? gr.length : 0));
      const openAt = lens.map((n, i) => (n ? i : -1)).reduce((a, b) => Math.max(a, b), -1);
      for (let gi = groups.length - 1; gi >= 0; gi--) {
        if (!Array.isArray(groups[gi])) continue;
        const det = h("details", { open: gi === openAt });
        det.append(h("summary", null, `group ${gi + 1} of ${groups.length} (${groups[gi].length} examples)`));
        det.append(examplesBlock(groups[gi], maxAct, 8));
        sec.append(det);
      }
      box.append(sec);
    }
    const cols = h("div", { class: "cols" });
    cols.append(tokenList("logits promoted", f.logit_top));
    cols.append(tokenList("logits suppressed", f.logit_bottom));
    cols.append(tokenList("de-embedding (tokens that drive it directly)", f.deembedding));
    box.append(cols);
    const refs = h("div", { class: "cols" });
    const featRows = (title, rows, make, headers) => {
      const sec = h("section", null, h("h4", null, title));
      if (!rows || !rows.length) sec.append(h("p", { class: "muted" }, "none"));
      else sec.append(table(headers, rows.map(make), "data compact"));
      refs.append(sec);
    };
    featRows("pullback (previous layer)", f.pullback,
      ([i, w]) => [featLink(layer - 1, i, `L${layer - 1} f${i}`), fmtSigned(w)], ["feature", "weight"]);
    featRows("attention heads (OV)", f.ov_heads, ([l, hd, s]) => [`L${l}.H${hd}`, fmt(s)], ["head", "score"]);
    featRows("decoder neighbours", f.neighbours, ([i, c]) => [featLink(layer, i, `L${layer} f${i}`), fmt(c)], ["feature", "cosine"]);
    featRows("co-occurring", f.cooccurring,
      ([i, j, c]) => [featLink(layer, i, `L${layer} f${i}`), fmt(j), fmtInt(c)], ["feature", "Jaccard", "count"]);
    box.append(refs);
    const ex = h("section", { class: "explanations" }, h("h3", null, "explanations"));
    const exps = Array.isArray(f.explanations) ? f.explanations : [];
    if (!exps.length) ex.append(h("p", { class: "muted" }, "none yet (run `transcoders explain`)"));
    for (const e of exps) {
      const scores = Object.entries(e.scores || {}).filter(([, v]) => num(v) !== null)
        .map(([k, v]) => `${k} ${fmt(v)}`).join(", ");
      ex.append(h("div", { class: "explanation" }, h("p", { class: "exp-text" }, String(e.text ?? "")),
        h("p", { class: "muted" }, `${e.model ? `by ${e.model}` : "rule label"}${scores ? ` · ${scores}` : ""}`)));
    }
    box.append(ex);
    return box;
  }

  async function pageFeature(args) {
    const run = String(args.run ?? ""), layer = parseInt(args.layer, 10), index = parseInt(args.index, 10);
    const variant = args.variant ? String(args.variant) : "";
    const title = `${run} · L${layer}${variant ? `/${variant}` : ""} f${index}`;
    const main = shell(title, routes.exportFeature(run, layer, index, variant));
    stats.page = "feature";
    const head = h("header", { class: "page-head" }, h("h1", null, `Layer ${layer}${variant ? ` (${variant})` : ""} · feature ${index}`),
      h("p", null, "run ", link(routes.run(run), run)));
    main.append(head);
    let f;
    try { f = await getJSON(api.feature(run, layer, index, variant)); } catch (err) { showError(main, err); return; }
    renderFeature(main, f, { run, layer, index, variant });
    stats.examples = main.querySelectorAll(".example").length;
    stats.activeTokens = main.querySelectorAll(".tok.active").length;
  }

  // ---------------------------------------------------------------------------------- index
  async function pageIndex() {
    const main = shell("index", null);
    stats.page = "index";
    const form = h("form", { class: "search-big", role: "search" });
    const input = h("input", { type: "search", placeholder: "search feature labels and explanations", "aria-label": "search" });
    form.append(input, h("button", { type: "submit" }, "Search"));
    form.addEventListener("submit", (ev) => {
      ev.preventDefault();
      if (input.value.trim()) window.location.assign(routes.search(input.value.trim()));
    });
    main.append(form);
    let idx;
    try { idx = await getJSON(api.index()); } catch (err) { showError(main, err); return; }
    main.append(h("h2", null, "Runs"));
    const runs = idx.runs || [];
    if (!runs.length) main.append(h("p", { class: "muted" }, "no runs (pass run folders to `transcoders serve`)"));
    else {
      main.append(table(["run", "model", "layers", "features", "graphs", "folder"], runs.map((r) => [
        link(routes.run(r.id), String(r.id)), String(r.model ?? ""), (r.layers || []).join(", "),
        r.has_features ? "yes" : "no", fmtInt(r.n_graphs), String(r.path ?? ""),
      ])));
    }
    main.append(h("h2", null, "Graphs"));
    const graphs = idx.graphs || [];
    if (!graphs.length) main.append(h("p", { class: "muted" }, "no graphs yet (trace one from a run's page)"));
    else {
      main.append(table(["graph", "prompt", "run", "nodes", "edges"], graphs.map((g) => [
        link(routes.graph(g.id), String(g.name ?? g.id)), h("span", { class: "prompt" }, clip(g.prompt, 120)),
        g.run ? link(routes.run(g.run), String(g.run)) : "–", fmtInt(g.n_nodes), fmtInt(g.n_edges),
      ])));
    }
    stats.runs = runs.length;
    stats.graphs = graphs.length;
  }

  // ---------------------------------------------------------------------------------- search
  async function pageSearch(args) {
    const q = String(args.q ?? "");
    const main = shell(q ? `search: ${clip(q, 40)}` : "search", null);
    stats.page = "search";
    const form = h("form", { class: "search-big", role: "search" });
    const input = h("input", { type: "search", placeholder: "search feature labels and explanations", "aria-label": "search" });
    input.value = q;
    form.append(input, h("button", { type: "submit" }, "Search"));
    form.addEventListener("submit", (ev) => {
      ev.preventDefault();
      if (input.value.trim()) window.location.assign(routes.search(input.value.trim()));
    });
    main.append(form);
    if (!q) return;
    let res;
    try { res = await getJSON(api.search(q, args.run)); } catch (err) { showError(main, err); return; }
    const results = res.results || [];
    main.append(h("p", { class: "muted" }, `${results.length} result${results.length === 1 ? "" : "s"} for `, h("q", null, q)));
    if (results.length) {
      main.append(table(["feature", "label", "explanation", "score"], results.map((r) => [
        link(routes.feature(r.run, r.layer, r.index, r.variant), `${r.run} L${r.layer}${r.variant ? `/${r.variant}` : ""} f${r.index}`),
        String(r.label ?? ""), String(r.explanation ?? ""), fmt(r.score),
      ]), "data results"));
    }
    stats.results = results.length;
  }

  // ------------------------------------------------------------------------------------- run
  async function pageRun(args) {
    const run = String(args.run ?? "");
    const main = shell(`run ${run}`, routes.exportRun(run));
    stats.page = "run";
    let r;
    try { r = await getJSON(api.run(run)); } catch (err) { showError(main, err); return; }
    main.append(h("header", { class: "page-head" }, h("h1", null, `Run ${r.id ?? run}`),
      h("p", { class: "muted" }, `${r.kind ?? ""} on ${r.model ?? "?"} · ${r.path ?? ""}`)));
    const layers = r.layers || [];
    const charts = h("div", { class: "charts" });
    main.append(h("h2", null, "Per layer"), charts);
    const keys = layers.map((l) => String(l.key));
    barChart(charts, "L0 (active features / token)", keys, layers.map((l) => l.l0));
    barChart(charts, "FVU (lower is better)", keys, layers.map((l) => l.fvu));
    barChart(charts, "loss recovered", keys, layers.map((l) => l.ce_loss_recovered), { format: d3.format(".0%") });
    barChart(charts, "dead fraction (eval tokens)", keys, layers.map((l) => l.dead_fraction), { format: d3.format(".0%") });
    main.append(table(["layer", "L0", "FVU", "loss recovered", "KL", "dead (training)", "dead (eval)", ""], layers.map((l) => [
      String(l.key), fmt(l.l0, 2), fmt(l.fvu, 4), fmtPct(l.ce_loss_recovered), fmt(l.kl, 4),
      l.dead_in_training === null || l.dead_in_training === undefined ? "–" : fmtPct(l.dead_in_training), fmtPct(l.dead_fraction),
      "",
    ])));
    if (r.spliced_together && typeof r.spliced_together === "object") {
      main.append(h("h2", null, "All layers spliced in at once"));
      main.append(kvTable(Object.entries(r.spliced_together).map(([k, v]) => [k, typeof v === "number" ? fmt(v, 4) : String(v)])));
    }
    main.append(h("h2", null, "Graphs"));
    const graphIds = r.graphs || [];
    const glist = h("ul", { class: "graph-list" });
    let names = new Map();
    if (graphIds.length) {
      try {
        const idx = await getJSON(api.index());
        names = new Map((idx.graphs || []).map((g) => [g.id, g]));
      } catch (_err) { /* ids alone will do */ }
    }
    for (const id of graphIds) {
      const g = names.get(id);
      glist.append(h("li", null, link(routes.graph(id), String(g && g.name ? g.name : id)),
        g && g.prompt ? h("span", { class: "prompt muted" }, ` ${clip(g.prompt, 100)}`) : null));
    }
    if (!graphIds.length) glist.append(h("li", { class: "muted" }, "none yet"));
    main.append(glist);
    if (!EXPORT) main.append(traceForm(run, glist));
    stats.layers = layers.length;
  }

  function traceForm(run, glist) {
    const sec = h("section", { class: "trace" }, h("h2", null, "Trace a prompt"));
    const form = h("form", { class: "trace-form" });
    const prompt = h("textarea", { name: "prompt", rows: 3, required: true, placeholder: "The capital of France is" });
    const targets = h("textarea", { name: "targets", rows: 2, placeholder: "optional, one per line: logit:' Paris', diff:' Paris',' London', feature:3.12@-1, logit:#5" });
    const maxNodes = h("input", { name: "max_feature_nodes", type: "number", min: 1, step: 1, placeholder: "default" });
    const submit = h("button", { type: "submit" }, "Trace");
    form.append(h("label", null, "prompt", prompt), h("label", null, "targets", targets),
      h("label", null, "max feature nodes", maxNodes), submit);
    const status = h("div", { class: "job", "aria-live": "polite" });
    sec.append(form, status);
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const body = { run, prompt: prompt.value };
      const t = targets.value.split("\n").map((s) => s.trim()).filter(Boolean);
      if (t.length) body.targets = t;
      const mx = parseInt(maxNodes.value, 10);
      if (Number.isInteger(mx) && mx > 0) body.max_feature_nodes = mx;
      submit.disabled = true;
      clear(status);
      const bar = h("progress", { max: 1, value: 0 });
      const msg = h("span", { class: "job-message" }, "queued");
      status.append(bar, msg);
      try {
        const { job } = await postJSON(api.trace(), body);
        const state = await pollJob(job, bar, msg);
        if (state.state === "done" && state.graph) {
          const href = routes.graph(state.graph);
          status.append(h("p", null, "done: ", link(href, String(state.graph), "new-graph")));
          glist.append(h("li", null, link(href, String(state.graph))));
          window.setTimeout(() => window.location.assign(href), 250);
        } else {
          status.append(h("p", { class: "error" }, `trace failed: ${state.error || state.message || state.state}`));
        }
      } catch (err) {
        showError(status, err, "trace failed");
      } finally {
        submit.disabled = false;
      }
    });
    return sec;
  }

  async function pollJob(job, bar, msg) {
    for (;;) {
      const s = await getJSON(api.job(job));
      bar.value = num(s.progress) ?? 0;
      msg.textContent = `${s.state}${s.message ? `: ${s.message}` : ""} (${fmt(s.elapsed_s, 1)} s)`;
      if (s.state === "done" || s.state === "error") return s;
      await new Promise((r) => window.setTimeout(r, 300));
    }
  }

  // ------------------------------------------------------------------------------------ graph
  const KIND_ORDER = { target: 0, feature: 1, embedding: 1, error: 2, bias: 3 };
  const MAX_DRAWN_EDGES = 100000;
  const POS_COLOUR = "37, 99, 235", NEG_COLOUR = "220, 38, 38";
  // Edge styles by |weight| relative to the top 1% of edges: strength shows as opacity, and only
  // the strongest get thick lines (a software-rasterized canvas draws 1-px lines ~10x faster).
  const N_BINS = 6;
  const BIN_WIDTH = [0.9, 0.9, 1, 1.6, 2.3, 3];
  const BIN_ALPHA = [0.16, 0.26, 0.38, 0.52, 0.68, 0.85];
  const PATH_CHUNK = 1024;

  class GraphView {
    constructor(main, g, gid) {
      this.g = g;
      this.gid = gid;
      this.nodes = Array.isArray(g.nodes) ? g.nodes : [];
      this.N = this.nodes.length;
      this.threshold = 0.8;
      this.showBias = false;
      this.subOnly = false;
      this.pinned = new Set();
      this.supernodes = [];
      this.selected = null;
      this.hovered = null;
      this.path = null;
      this.edgeSel = null;
      this.briefs = new Map();
      this.main = main;
      this.setEdges(g.edges && g.edges.src ? g.edges : { src: [], dst: [], weight: [] });
    }

    // ---- edges
    setEdges(e) {
      const n = Math.min(e.src.length, e.dst.length, e.weight.length);
      this.src = e.src instanceof Int32Array ? e.src.subarray(0, n) : Int32Array.from(e.src.slice(0, n));
      this.dst = e.dst instanceof Int32Array ? e.dst.subarray(0, n) : Int32Array.from(e.dst.slice(0, n));
      this.w = e.weight instanceof Float32Array ? e.weight.subarray(0, n) : Float32Array.from(e.weight.slice(0, n), (x) => num(x) ?? 0);
      this.nE = n;
      const absw = new Float32Array(n);
      for (let i = 0; i < n; i++) absw[i] = Math.abs(this.w[i]);
      const order = new Uint32Array(n);
      for (let i = 0; i < n; i++) order[i] = i;
      order.sort((a, b) => absw[b] - absw[a]);
      this.order = order;
      this.absw = absw;
      this.wRef = n ? absw[order[Math.min(n - 1, Math.floor(n * 0.01))]] || absw[order[0]] || 1 : 1;
      // CSR adjacency by destination (incoming) and by source (outgoing)
      const N = this.N;
      const build = (key) => {
        const start = new Int32Array(N + 1);
        for (let i = 0; i < n; i++) { const k = key[i]; if (k >= 0 && k < N) start[k + 1]++; }
        for (let k = 0; k < N; k++) start[k + 1] += start[k];
        const fill = start.slice(0, N);
        const idx = new Int32Array(start[N]);
        for (let i = 0; i < n; i++) { const k = key[i]; if (k >= 0 && k < N) idx[fill[k]++] = i; }
        return { start, idx };
      };
      this.inAdj = build(this.dst);
      this.outAdj = build(this.src);
    }

    edgesOf(k, dir) {
      const adj = dir === "in" ? this.inAdj : this.outAdj;
      return Array.from(adj.idx.subarray(adj.start[k], adj.start[k + 1]));
    }

    // ---- layout
    importance(n) {
      if (n.kind === "target") return 1;
      const inf = num(n.influence);
      if (inf !== null && this.maxInf > 0) return Math.max(0, inf) / this.maxInf;
      return 1 - (num(n.cum) ?? 1);
    }

    layout() {
      const g = this.g, nodes = this.nodes, N = this.N;
      const L = num(g.n_layers) ?? d3.max(nodes, (n) => n.layer) ?? 0;
      this.L = L;
      this.tokens = Array.isArray(g.tokens) ? g.tokens : [];
      const P = Math.max(this.tokens.length, (d3.max(nodes, (n) => n.pos) ?? -1) + 1, 1);
      this.P = P;
      this.maxInf = d3.max(nodes, (n) => (n.kind === "target" ? null : num(n.influence))) || 0;
      const cells = new Map();
      for (let k = 0; k < N; k++) {
        const n = nodes[k];
        const key = (Math.max(-1, Math.min(L, n.layer)) + 1) * P + Math.max(0, n.pos);
        if (!cells.has(key)) cells.set(key, []);
        cells.get(key).push(k);
      }
      const imp = new Float32Array(N);
      for (let k = 0; k < N; k++) imp[k] = this.importance(nodes[k]);
      this.imp = imp;
      const m = { top: 24, right: 24, bottom: 84, left: 64 };
      const avail = Math.max(640, (window.innerWidth || 1400) - 380 - 70) - m.left - m.right;
      const cellW = Math.max(30, Math.min(150, Math.floor(avail / P)));
      const SP = 10;
      const cols = Math.max(1, Math.floor((cellW - 6) / SP));
      const maxK = d3.max(Array.from(cells.values(), (v) => v.length)) || 1;
      const rowH = Math.max(30, Math.min(110, Math.ceil(maxK / cols) * SP + 16));
      const nRows = L + 2;
      this.m = m; this.cellW = cellW; this.rowH = rowH;
      this.W = m.left + P * cellW + m.right;
      this.H = m.top + nRows * rowH + m.bottom;
      this.x = new Float32Array(N); this.y = new Float32Array(N); this.r = new Float32Array(N);
      for (const [key, list] of cells) {
        const row = Math.floor(key / P), pos = key % P;
        list.sort((a, b) => (KIND_ORDER[nodes[a].kind] ?? 4) - (KIND_ORDER[nodes[b].kind] ?? 4) || imp[b] - imp[a]);
        const perRow = Math.min(cols, list.length);
        const sub = Math.ceil(list.length / cols);
        const cx0 = m.left + pos * cellW, cy = m.top + (nRows - 1 - row) * rowH + rowH / 2;
        const spacing = Math.min(SP, (rowH - 12) / Math.max(1, sub));
        list.forEach((k, j) => {
          const c = j % cols, s = Math.floor(j / cols);
          const inRow = s === sub - 1 && list.length % cols ? list.length % cols : perRow;
          this.x[k] = cx0 + cellW / 2 + (c - (inRow - 1) / 2) * SP;
          this.y[k] = cy + (s - (sub - 1) / 2) * spacing;
        });
      }
      for (let k = 0; k < N; k++) {
        const n = nodes[k];
        this.r[k] = n.kind === "target" ? 6 : n.kind === "bias" ? 2.5 : 2.5 + 5 * Math.sqrt(Math.max(0, Math.min(1, imp[k])));
      }
      this.rowY = (layer) => m.top + (nRows - 1 - (layer + 1)) * rowH + rowH / 2;
    }

    // ---- DOM
    render() {
      const main = this.main, g = this.g;
      this.layout();
      const head = h("header", { class: "page-head" });
      head.append(h("h1", null, String(g.name ?? this.gid)));
      head.append(h("p", { class: "prompt" }, String(g.prompt ?? "")));
      if (g.run !== null && g.run !== undefined) head.append(h("p", { class: "muted" }, "run ", link(routes.run(g.run), String(g.run))));
      main.append(head);

      const controls = h("div", { class: "controls" });
      this.slider = h("input", { type: "range", min: 0.05, max: 1, step: 0.01, id: "threshold", "aria-label": "node threshold" });
      this.slider.value = String(this.threshold);
      this.sliderText = h("span", { class: "threshold-value" }, this.threshold.toFixed(2));
      controls.append(h("label", { class: "slider" }, "cumulative influence ≤ ", this.slider, this.sliderText));
      this.slider.addEventListener("input", () => {
        this.threshold = parseFloat(this.slider.value);
        this.sliderText.textContent = this.threshold.toFixed(2);
        this.schedule();
      });
      const biasBox = h("input", { type: "checkbox", id: "show-bias" });
      biasBox.addEventListener("change", () => { this.showBias = biasBox.checked; this.schedule(); });
      controls.append(h("label", null, biasBox, " bias nodes"));
      const subBox = h("input", { type: "checkbox", id: "sub-only" });
      subBox.addEventListener("change", () => { this.subOnly = subBox.checked; this.schedule(); });
      this.subBox = subBox;
      controls.append(h("label", null, subBox, " pinned only"));
      this.loadBtn = button("Load all edges", () => this.loadAllEdges(), { class: "load-edges" });
      controls.append(this.loadBtn);
      this.statsText = h("span", { class: "stats" });
      controls.append(this.statsText);
      main.append(controls);

      const layoutDiv = h("div", { class: "graph-layout" });
      const wrap = h("div", { class: "graph-wrap" });
      const inner = h("div", { class: "graph-inner" });
      inner.style.width = `${this.W}px`;
      inner.style.height = `${this.H}px`;
      const dpr = Math.min(2, window.devicePixelRatio || 1);
      const mkCanvas = (cls) => {
        const c = h("canvas", { class: cls, width: Math.round(this.W * dpr), height: Math.round(this.H * dpr) });
        c.style.width = `${this.W}px`;
        c.style.height = `${this.H}px`;
        const ctx = c.getContext("2d");
        ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
        return [c, ctx];
      };
      [this.canvas, this.ctx] = mkCanvas("edges");
      [this.overlay, this.octx] = mkCanvas("edges-overlay");
      inner.append(this.canvas, this.overlay);
      this.card = h("div", { class: "hovercard", hidden: true });
      wrap.append(inner);
      layoutDiv.append(wrap);
      this.side = h("aside", { class: "side" });
      layoutDiv.append(this.side);
      main.append(layoutDiv);

      const svg = d3.select(inner).append("svg").attr("class", "graph").attr("width", this.W).attr("height", this.H);
      this.svg = svg;
      inner.append(this.card);
      this.drawAxes(svg);
      this.gSuper = svg.append("g").attr("class", "supernodes");
      const gNodes = svg.append("g").attr("class", "nodes");
      const idx = d3.range(this.N);
      const circles = gNodes.selectAll("circle").data(idx).join("circle")
        .attr("class", (k) => `node n-${this.nodes[k].kind}`)
        .attr("data-i", (k) => k)
        .attr("cx", (k) => this.x[k]).attr("cy", (k) => this.y[k]).attr("r", (k) => this.r[k]);
      this.circleEls = circles.nodes();
      this.shown = new Uint8Array(this.N).fill(1);
      this.hoverRing = svg.append("circle").attr("class", "ring hover-ring").attr("r", 0).attr("display", "none");
      this.selRing = svg.append("circle").attr("class", "ring select-ring").attr("r", 0).attr("display", "none");

      // one listener each for the whole graph; hit-testing through a quadtree
      const svgEl = svg.node();
      let pending = null;
      svgEl.addEventListener("mousemove", (ev) => {
        const wasPending = pending !== null;
        pending = ev;
        if (!wasPending) {
          requestAnimationFrame(() => {
            const e = pending;
            pending = null;
            if (e) this.onHover(e);
          });
        }
      });
      svgEl.addEventListener("mouseleave", () => { pending = null; this.setHover(null); });
      svgEl.addEventListener("click", (ev) => {
        const k = this.pick(ev);
        if (k === null) return;
        if (ev.shiftKey) this.togglePin(k); else this.select(k);
      });

      this.buildSide();
      this.applyFilter();
      this.updateLoadButton();
      // a long prompt scrolls sideways: start at its end, where the targets are
      if (wrap.scrollWidth > wrap.clientWidth) wrap.scrollLeft = wrap.scrollWidth - wrap.clientWidth;
    }

    drawAxes(svg) {
      const m = this.m, P = this.P, L = this.L;
      const ax = svg.append("g").attr("class", "axes");
      const rows = d3.range(-1, L + 1);
      ax.selectAll("line.row").data(rows).join("line").attr("class", "row")
        .attr("x1", m.left).attr("x2", this.W - m.right)
        .attr("y1", (l) => this.rowY(l) + this.rowH / 2).attr("y2", (l) => this.rowY(l) + this.rowH / 2);
      ax.selectAll("text.layer").data(rows).join("text").attr("class", "layer")
        .attr("x", m.left - 8).attr("y", (l) => this.rowY(l)).attr("dy", "0.35em")
        .text((l) => (l < 0 ? "emb" : l >= L ? "out" : `L${l}`));
      const cols = d3.range(P);
      ax.selectAll("line.col").data(cols).join("line").attr("class", "col")
        .attr("x1", (p) => m.left + p * this.cellW).attr("x2", (p) => m.left + p * this.cellW)
        .attr("y1", m.top).attr("y2", this.H - m.bottom);
      const yTok = this.H - m.bottom + 12;
      const texts = ax.selectAll("text.token").data(cols).join("text").attr("class", "token")
        .attr("transform", (p) => `translate(${m.left + (p + 0.5) * this.cellW},${yTok}) rotate(-35)`)
        .attr("text-anchor", "end")
        .text((p) => clip(showTok(this.tokens[p] ?? ""), 14));
      texts.append("title").text((p) => `position ${p}: ${showTok(this.tokens[p] ?? "")}`);
    }

    // ---- filtering and drawing
    schedule() {
      if (this.scheduled) return;
      this.scheduled = true;
      requestAnimationFrame(() => { this.scheduled = false; this.applyFilter(); });
    }

    isShown(k) {
      const n = this.nodes[k];
      if (n.kind === "bias" && !this.showBias) return false;
      if (this.subOnly) return this.pinned.has(k);
      if (n.kind === "target") return true;
      const c = num(n.cum);
      return c === null ? false : c <= this.threshold + 1e-9;
    }

    applyFilter() {
      const t0 = performance.now();
      let count = 0;
      const ids = [];
      for (let k = 0; k < this.N; k++) {
        const s = this.isShown(k) ? 1 : 0;
        if (s !== this.shown[k]) {
          this.shown[k] = s;
          if (s) this.circleEls[k].removeAttribute("display"); else this.circleEls[k].setAttribute("display", "none");
        }
        if (s) { count++; ids.push(k); }
      }
      this.quadtree = d3.quadtree(ids, (k) => this.x[k], (k) => this.y[k]);
      this.maxR = d3.max(ids, (k) => this.r[k]) || 6;
      stats.nodesDrawn = count;
      this.drawEdges();
      this.drawOverlay();
      if (this.hovered !== null && !this.shown[this.hovered]) this.setHover(null);
      stats.drawMs = +(performance.now() - t0).toFixed(2);
      (stats.drawHistory = stats.drawHistory || []).push(stats.drawMs);
      if (stats.drawHistory.length > 200) stats.drawHistory.shift();
      this.updateStats();
    }

    drawEdges() {
      const ctx = this.ctx, shown = this.shown, src = this.src, dst = this.dst, w = this.w, order = this.order;
      ctx.clearRect(0, 0, this.W, this.H);
      const bins = [];
      for (let b = 0; b < 2 * N_BINS; b++) bins.push([]);
      let drawn = 0;
      const ref = this.wRef || 1;
      for (let j = 0; j < this.nE && drawn < MAX_DRAWN_EDGES; j++) {
        const e = order[j];
        if (!shown[src[e]] || !shown[dst[e]]) continue;
        const b = Math.min(N_BINS - 1, Math.floor((this.absw[e] / ref) * N_BINS));
        bins[(w[e] >= 0 ? 0 : N_BINS) + b].push(e);
        drawn++;
      }
      const x = this.x, y = this.y;
      for (let b = 0; b < N_BINS; b++) {
        for (const sign of [0, 1]) {
          const list = bins[sign * N_BINS + b];
          if (!list.length) continue;
          ctx.lineWidth = BIN_WIDTH[b];
          ctx.strokeStyle = `rgba(${sign ? NEG_COLOUR : POS_COLOUR}, ${BIN_ALPHA[b]})`;
          // short paths: one path of thousands of overlapping thick segments is slow to rasterize
          for (let i = 0; i < list.length; i += PATH_CHUNK) {
            ctx.beginPath();
            const end = Math.min(list.length, i + PATH_CHUNK);
            for (let j = i; j < end; j++) { const e = list[j]; ctx.moveTo(x[src[e]], y[src[e]]); ctx.lineTo(x[dst[e]], y[dst[e]]); }
            ctx.stroke();
          }
        }
      }
      stats.edgesDrawn = drawn;
      stats.edgesLoaded = this.nE;
    }

    /** Highlighted edges: the selected or hovered node's, the chosen path's, the chosen edge. */
    drawOverlay() {
      const ctx = this.octx, x = this.x, y = this.y;
      ctx.clearRect(0, 0, this.W, this.H);
      const focus = this.selected !== null || this.path !== null;
      this.canvas.classList.toggle("dim", focus);
      const strokeEdges = (list, alphaScale) => {
        const ref = this.wRef || 1;
        for (const e of list) {
          const s = Math.min(1, Math.sqrt(this.absw[e] / ref));
          ctx.lineWidth = 0.8 + 3.2 * s;
          ctx.strokeStyle = `rgba(${this.w[e] >= 0 ? POS_COLOUR : NEG_COLOUR}, ${(alphaScale * (0.35 + 0.65 * s)).toFixed(3)})`;
          ctx.beginPath();
          ctx.moveTo(x[this.src[e]], y[this.src[e]]);
          ctx.lineTo(x[this.dst[e]], y[this.dst[e]]);
          ctx.stroke();
        }
      };
      const nodeEdges = (k) => {
        const list = this.edgesOf(k, "in").concat(this.edgesOf(k, "out"));
        return list.filter((e) => this.shown[this.src[e]] && this.shown[this.dst[e]]);
      };
      if (this.selected !== null) strokeEdges(nodeEdges(this.selected), 1);
      if (this.hovered !== null && this.hovered !== this.selected) strokeEdges(nodeEdges(this.hovered), 0.7);
      if (this.path) {
        ctx.lineWidth = 3.5;
        ctx.strokeStyle = "rgba(234, 179, 8, 0.95)";
        ctx.beginPath();
        const p = this.path.nodes;
        for (let i = 0; i + 1 < p.length; i++) {
          if (p[i] < 0 || p[i] >= this.N || p[i + 1] < 0 || p[i + 1] >= this.N) continue;
          ctx.moveTo(x[p[i]], y[p[i]]);
          ctx.lineTo(x[p[i + 1]], y[p[i + 1]]);
        }
        ctx.stroke();
      }
      if (this.edgeSel !== null) {
        const e = this.edgeSel;
        ctx.lineWidth = 5;
        ctx.strokeStyle = "rgba(17, 24, 39, 0.9)";
        ctx.beginPath();
        ctx.moveTo(x[this.src[e]], y[this.src[e]]);
        ctx.lineTo(x[this.dst[e]], y[this.dst[e]]);
        ctx.stroke();
      }
      // supernode outlines
      this.drawSupernodes(ctx);
    }

    drawSupernodes(ctx) {
      const boxes = this.supernodes.map((sn) => {
        const ks = Array.from(sn.members);
        if (!ks.length) return null;
        const pad = 9;
        return {
          name: sn.name, x0: d3.min(ks, (k) => this.x[k]) - pad, x1: d3.max(ks, (k) => this.x[k]) + pad,
          y0: d3.min(ks, (k) => this.y[k]) - pad, y1: d3.max(ks, (k) => this.y[k]) + pad,
        };
      }).filter(Boolean);
      ctx.setLineDash([4, 3]);
      ctx.lineWidth = 1.5;
      ctx.strokeStyle = "rgba(124, 58, 237, 0.9)";
      for (const b of boxes) ctx.strokeRect(b.x0, b.y0, b.x1 - b.x0, b.y1 - b.y0);
      ctx.setLineDash([]);
      this.gSuper.selectAll("text").data(boxes).join("text").attr("class", "supernode-label")
        .attr("x", (b) => b.x0).attr("y", (b) => b.y0 - 3).text((b) => b.name);
    }

    updateStats() {
      this.statsText.textContent = `${fmtInt(stats.nodesDrawn)} of ${fmtInt(this.N)} nodes · ` +
        `${fmtInt(stats.edgesDrawn)} edges drawn of ${fmtInt(this.nE)} loaded (${fmtInt(this.g.n_edges_total ?? this.nE)} in the file)`;
    }

    // ---- hover
    pick(ev) {
      const [px, py] = d3.pointer(ev, this.svg.node());
      const k = this.quadtree.find(px, py, this.maxR + 4);
      return k === undefined ? null : k;
    }

    onHover(ev) {
      this.setHover(this.pick(ev));
    }

    setHover(k) {
      if (k === this.hovered) return;
      this.hovered = k;
      if (k === null) {
        this.hoverRing.attr("display", "none");
        this.card.hidden = true;
      } else {
        this.hoverRing.attr("display", null).attr("cx", this.x[k]).attr("cy", this.y[k]).attr("r", this.r[k] + 3);
        this.showCard(k);
      }
      this.drawOverlay();
      stats.hovered = k;
    }

    showCard(k) {
      const n = this.nodes[k], card = clear(this.card);
      card.hidden = false;
      card.append(h("div", { class: "card-title" }, String(n.name ?? `node ${k}`)));
      if (n.label) card.append(h("div", { class: "card-label" }, String(n.label)));
      card.append(h("div", { class: "muted" }, `activation ${fmt(n.activation)} · influence ${fmt(n.influence)} · cum ${fmt(n.cum)}`));
      const left = this.x[k] + 14, top = this.y[k] + 10;
      card.style.left = `${Math.min(left, this.W - 260)}px`;
      card.style.top = `${top}px`;
      if (n.kind === "feature" && this.g.run !== null && this.g.run !== undefined) {
        const slot = h("div", { class: "card-brief muted" }, "…");
        card.append(slot);
        this.brief(n).then((b) => {
          if (this.hovered !== k) return;
          clear(slot).classList.remove("muted");
          if (b.label && !n.label) slot.append(h("div", { class: "card-label" }, String(b.label)));
          slot.append(h("div", { class: "muted" }, `fires on ${fmtPct(b.frequency)} · max ${fmt(b.max)}`));
          const chips = (title, list) => {
            if (!list || !list.length) return;
            slot.append(h("div", null, h("span", { class: "muted" }, `${title} `), list.map((t) => h("span", { class: "tok chip" }, showTok(t)))));
          };
          chips("top tokens", b.top_tokens);
          chips("promotes", b.logit_top);
        }).catch((err) => {
          if (this.hovered !== k) return;
          clear(slot).append(errorText(err));
        });
      }
    }

    brief(n) {
      const rel = api.brief(this.g.run, n.layer, n.feature, "");
      return cached(rel);
    }

    // ---- selection and side panel
    buildSide() {
      const side = this.side;
      this.selBox = h("section", { class: "selection", id: "selection" }, h("h3", null, "Selection"),
        h("p", { class: "muted" }, "Click a node (shift-click pins it)."));
      this.pathBox = h("section", { class: "paths", id: "paths" });
      this.pinBox = h("section", { class: "subgraph", id: "subgraph" });
      side.append(this.selBox, this.pathBox, this.pinBox);
      this.renderPaths();
      this.renderPins();
      const info = h("section", { class: "graph-info" });
      const targets = this.g.targets || [];
      if (targets.length) {
        info.append(h("h3", null, "Targets"));
        info.append(table(["target", "weight"], targets.map((t) => [
          this.nodeButton(t.node, String(t.label ?? "")), fmt(t.weight)]), "data compact"));
      }
      const sc = this.g.scores;
      if (sc && typeof sc === "object") {
        for (const [which, vals] of Object.entries(sc)) {
          if (!vals || typeof vals !== "object") continue;
          info.append(h("h3", null, `Scores (${which})`));
          info.append(kvTable(Object.entries(vals).map(([k, v]) => [k, typeof v === "number" ? fmt(v, 4) : String(v)])));
        }
      }
      side.append(info);
    }

    nodeName(k) {
      const n = this.nodes[k];
      return n ? String(n.name ?? `node ${k}`) : `node ${k}`;
    }

    nodeButton(k, text) {
      if (!(k >= 0 && k < this.N)) return h("span", null, text || `node ${k}`);
      return button(text || this.nodeName(k), () => this.select(k), { class: "linkish node-ref", "data-node": k });
    }

    select(k) {
      this.selected = k;
      this.edgeSel = null;
      if (k === null) this.selRing.attr("display", "none");
      else this.selRing.attr("display", null).attr("cx", this.x[k]).attr("cy", this.y[k]).attr("r", this.r[k] + 4);
      this.drawOverlay();
      this.renderSelection();
      stats.selected = k;
    }

    edgeRows(k, dir) {
      const list = this.edgesOf(k, dir).sort((a, b) => this.absw[b] - this.absw[a]).slice(0, 10);
      const ul = h("ul", { class: `edges ${dir}`, id: dir === "in" ? "incoming" : "outgoing" });
      if (!list.length) ul.append(h("li", { class: "muted" }, "none among the loaded edges"));
      for (const e of list) {
        const other = dir === "in" ? this.src[e] : this.dst[e];
        const li = h("li", null, this.nodeButton(other),
          h("span", { class: this.w[e] >= 0 ? "w pos" : "w neg" }, fmtSigned(this.w[e])),
          button("heads", () => this.selectEdge(e), { class: "small", title: "per-head split of this edge" }));
        ul.append(li);
      }
      return ul;
    }

    renderSelection() {
      const box = clear(this.selBox);
      box.append(h("h3", null, "Selection"));
      const k = this.selected;
      if (k === null) { box.append(h("p", { class: "muted" }, "Click a node (shift-click pins it).")); return; }
      const n = this.nodes[k];
      box.append(h("div", { class: "sel-name" }, this.nodeName(k)));
      if (n.label) box.append(h("div", { class: "card-label" }, String(n.label)));
      box.append(kvTable([
        ["kind", String(n.kind)], ["layer · position", `${n.layer} · ${n.pos}`],
        ["activation", fmt(n.activation)], ["value", fmt(n.value)], ["influence", fmt(n.influence)], ["cumulative", fmt(n.cum)],
      ]));
      box.append(button(this.pinned.has(k) ? "Unpin" : "Pin", () => { this.togglePin(k); }, { class: "pin" }));
      const nIn = this.inAdj.start[k + 1] - this.inAdj.start[k], nOut = this.outAdj.start[k + 1] - this.outAdj.start[k];
      box.append(h("h4", null, `Incoming edges (${fmtInt(nIn)})`), this.edgeRows(k, "in"));
      box.append(h("h4", null, `Outgoing edges (${fmtInt(nOut)})`), this.edgeRows(k, "out"));
      this.edgeBox = h("div", { class: "edge-detail", id: "edge-detail" });
      box.append(this.edgeBox);
      if (n.kind === "feature" && this.g.run !== null && this.g.run !== undefined && n.feature >= 0) {
        const dash = h("div", { class: "feature-panel", id: "feature-panel" });
        dash.append(h("h4", null, `Feature L${n.layer} f${n.feature}`));
        const slot = h("div", { class: "muted" }, "loading…");
        dash.append(slot);
        box.append(dash);
        const fl = routes.feature(this.g.run, n.layer, n.feature, "");
        cached(api.feature(this.g.run, n.layer, n.feature, "")).then((f) => {
          if (this.selected !== k) return;
          slot.remove();
          renderFeature(dash, f, { compact: true, run: this.g.run, layer: n.layer, index: n.feature, variant: "" });
        }).catch((err) => {
          if (this.selected !== k) return;
          clear(slot).append(errorText(err));
          if (fl) dash.append(h("p", null, link(fl, "open the feature page →", "feature-page-link")));
        });
      }
    }

    selectEdge(e) {
      this.edgeSel = e;
      this.drawOverlay();
      const box = clear(this.edgeBox);
      const s = this.src[e], d = this.dst[e];
      box.append(h("h4", null, "Edge"), h("div", null, this.nodeButton(s), " → ", this.nodeButton(d), " ",
        h("span", { class: this.w[e] >= 0 ? "w pos" : "w neg" }, fmtSigned(this.w[e]))));
      const slot = h("div", { class: "muted heads" }, "per-head split: computing…");
      box.append(slot);
      getJSON(api.heads(this.gid, s, d)).then((r) => {
        if (this.edgeSel !== e) return;
        clear(slot).classList.remove("muted");
        if (!r.available) { slot.append(h("p", { class: "muted" }, `per-head split not available${r.reason ? `: ${r.reason}` : ""}`)); return; }
        const comps = r.components || [];
        slot.append(table(["layer", "head", "key pos", "weight", "", "why the head attends there (QK)"], comps.map((c) => [
          String(c.layer ?? "–"), String(c.head ?? "–"), c.pos === null || c.pos === undefined ? "–" : String(c.pos),
          h("span", { class: c.weight >= 0 ? "w pos" : "w neg" }, fmtSigned(c.weight)), String(c.text ?? ""),
          c.qk ? h("span", { class: "qk" }, String(c.qk.because ?? "")) : "",
        ]), "data compact"));
      }).catch((err) => {
        if (this.edgeSel !== e) return;
        clear(slot).append(`per-head split: ${errorText(err)}`);
      });
    }

    // ---- paths
    renderPaths() {
      const box = clear(this.pathBox);
      box.append(h("h3", null, "Top paths"));
      const paths = this.g.paths || [];
      if (!paths.length) { box.append(h("p", { class: "muted" }, "none")); return; }
      const ol = h("ol", { class: "path-list" });
      paths.forEach((p, i) => {
        const b = button("", () => this.togglePath(i), { class: "linkish path", "data-path": i });
        b.append(h("span", { class: "path-text" }, String(p.text ?? (p.nodes || []).map((k) => this.nodeName(k)).join(" ← "))),
          h("span", { class: p.weight >= 0 ? "w pos" : "w neg" }, ` ${fmtSigned(p.weight)}`));
        ol.append(h("li", null, b));
      });
      box.append(ol);
      this.pathButtons = Array.from(ol.querySelectorAll("button.path"));
    }

    togglePath(i) {
      const p = (this.g.paths || [])[i];
      const same = this.path && this.path.i === i;
      for (const k of (this.path ? this.path.nodes : [])) this.circleEls[k] && this.circleEls[k].classList.remove("on-path");
      this.path = same || !p ? null : { i, nodes: (p.nodes || []).filter((k) => k >= 0 && k < this.N) };
      if (this.path) for (const k of this.path.nodes) this.circleEls[k].classList.add("on-path");
      this.pathButtons.forEach((b, j) => b.classList.toggle("active", !!this.path && j === i));
      stats.pathNodes = this.path ? this.path.nodes.length : 0;
      this.drawOverlay();
    }

    // ---- pins and supernodes
    togglePin(k) {
      if (this.pinned.has(k)) {
        this.pinned.delete(k);
        for (const sn of this.supernodes) sn.members.delete(k);
        this.supernodes = this.supernodes.filter((sn) => sn.members.size);
      } else this.pinned.add(k);
      this.circleEls[k].classList.toggle("pinned", this.pinned.has(k));
      stats.pinned = this.pinned.size;
      this.renderPins();
      if (this.selected === k) this.renderSelection();
      if (this.subOnly) this.schedule(); else this.drawOverlay();
    }

    groupOf(k) {
      return this.supernodes.find((sn) => sn.members.has(k)) || null;
    }

    renderPins() {
      const box = clear(this.pinBox);
      box.append(h("h3", null, `Subgraph (${this.pinned.size} pinned)`));
      if (!this.pinned.size) { box.append(h("p", { class: "muted" }, "Pin nodes with shift-click or the Pin button.")); return; }
      const ul = h("ul", { class: "pins" });
      const checks = [];
      for (const k of this.pinned) {
        const cb = h("input", { type: "checkbox", "aria-label": "select for a supernode" });
        checks.push([k, cb]);
        const sn = this.groupOf(k);
        ul.append(h("li", null, cb, " ", this.nodeButton(k), sn ? h("span", { class: "muted" }, ` [${sn.name}]`) : null,
          button("unpin", () => this.togglePin(k), { class: "small" })));
      }
      box.append(ul);
      const name = h("input", { type: "text", placeholder: "supernode name", "aria-label": "supernode name", maxlength: 80 });
      box.append(h("div", { class: "group-form" }, name, button("Group", () => {
        let members = checks.filter(([, cb]) => cb.checked).map(([k]) => k);
        if (!members.length) members = Array.from(this.pinned).filter((k) => !this.groupOf(k));
        if (!members.length) return;
        for (const sn of this.supernodes) for (const k of members) sn.members.delete(k);
        this.supernodes = this.supernodes.filter((sn) => sn.members.size);
        this.supernodes.push({ name: name.value.trim() || `group ${this.supernodes.length + 1}`, members: new Set(members) });
        this.renderPins();
        this.drawOverlay();
      }, { class: "group" })));
      if (this.supernodes.length) {
        box.append(h("h4", null, "Supernodes"));
        const sl = h("ul", { class: "supernode-list" });
        this.supernodes.forEach((sn, i) => {
          sl.append(h("li", null, h("strong", null, sn.name), ` (${sn.members.size}) `,
            button("ungroup", () => { this.supernodes.splice(i, 1); this.renderPins(); this.drawOverlay(); }, { class: "small" })));
        });
        box.append(sl);
      }
      // weights between groups (supernodes, and pinned nodes on their own)
      const groupOf = new Map();
      const groups = [];
      for (const sn of this.supernodes) { groups.push(sn.name); for (const k of sn.members) groupOf.set(k, groups.length - 1); }
      for (const k of this.pinned) if (!groupOf.has(k)) { groups.push(this.nodeName(k)); groupOf.set(k, groups.length - 1); }
      const sums = new Map();
      for (const k of this.pinned) {
        for (const e of this.edgesOf(k, "out")) {
          const d = this.dst[e];
          if (!groupOf.has(d)) continue;
          const a = groupOf.get(k), b = groupOf.get(d);
          if (a === b) continue;
          const key = `${a}:${b}`;
          sums.set(key, (sums.get(key) || 0) + this.w[e]);
        }
      }
      if (sums.size) {
        const rows = Array.from(sums.entries()).sort((p, q) => Math.abs(q[1]) - Math.abs(p[1])).slice(0, 20)
          .map(([key, v]) => { const [a, b] = key.split(":").map(Number); return [groups[a], groups[b], h("span", { class: v >= 0 ? "w pos" : "w neg" }, fmtSigned(v))]; });
        box.append(h("h4", null, "Edges between pinned groups"), table(["from", "to", "weight"], rows, "data compact"));
      }
    }

    // ---- all edges
    updateLoadButton() {
      const total = num(this.g.n_edges_total) ?? this.nE;
      this.loadBtn.textContent = this.nE >= total ? `all ${fmtInt(total)} edges loaded` : `Load all edges (${fmtInt(total)})`;
      this.loadBtn.disabled = this.nE >= total;
    }

    async loadAllEdges() {
      this.loadBtn.disabled = true;
      this.loadBtn.textContent = "loading edges…";
      try {
        const parts = [];
        let offset = 0, total = Infinity, n = 0;
        const LIMIT = 2000000;
        while (offset < total) {
          const buf = await getBinary(api.edges(this.gid, offset, LIMIT));
          const dv = new DataView(buf);
          if (buf.byteLength < 12) throw new Error("edges.bin: short response");
          total = dv.getUint32(0, true);
          const off = dv.getUint32(4, true), cnt = dv.getUint32(8, true);
          if (off !== offset || buf.byteLength < 12 + 12 * cnt) throw new Error("edges.bin: malformed page");
          const src = new Int32Array(cnt), dst = new Int32Array(cnt), w = new Float32Array(cnt);
          for (let i = 0; i < cnt; i++) {
            src[i] = dv.getInt32(12 + 4 * i, true);
            dst[i] = dv.getInt32(12 + 4 * (cnt + i), true);
            w[i] = dv.getFloat32(12 + 4 * (2 * cnt + i), true);
          }
          parts.push([src, dst, w]);
          n += cnt;
          offset += cnt;
          if (cnt === 0) break;
        }
        const src = new Int32Array(n), dst = new Int32Array(n), w = new Float32Array(n);
        let at = 0;
        for (const [s, d, ww] of parts) { src.set(s, at); dst.set(d, at); w.set(ww, at); at += s.length; }
        this.g.n_edges_total = total === Infinity ? n : total;
        this.edgeSel = null;
        this.setEdges({ src, dst, weight: w });
        this.applyFilter();
        if (this.selected !== null) this.renderSelection();
        this.renderPins();
        this.updateLoadButton();
      } catch (err) {
        this.loadBtn.textContent = `Load all edges: ${errorText(err)}`;
        this.loadBtn.disabled = err instanceof NotInExport;
      }
    }

    /** Client (viewport) coordinates of node k's centre, for tests and benchmarks. */
    nodeClientXY(k) {
      const rect = this.svg.node().getBoundingClientRect();
      return { x: rect.left + this.x[k], y: rect.top + this.y[k], shown: !!this.shown[k] };
    }
  }

  async function pageGraph(args) {
    const gid = String(args.graph ?? "");
    const main = shell(`graph ${gid}`, routes.exportGraph(gid));
    stats.page = "graph";
    let g;
    try { g = await getJSON(api.graph(gid)); } catch (err) { showError(main, err); return; }
    document.title = `${g.name ?? gid} — transcoders`;
    const view = new GraphView(main, g, gid);
    view.render();
    stats.nodes = view.N;
    window.tcViewer.graph = view;
  }

  // ------------------------------------------------------------------------------------ start
  const pages = { index: pageIndex, run: pageRun, graph: pageGraph, feature: pageFeature, search: pageSearch };
  (async () => {
    try {
      if (typeof d3 === "undefined") throw new Error("d3 did not load");
      const page = pages[boot.page];
      if (!page) { shell("unknown page", null).append(h("p", { class: "error" }, `unknown page ${String(boot.page)}`)); return; }
      await page(ARGS);
    } catch (err) {
      stats.error = errorText(err);
      showError(app, err);
    } finally {
      resolveReady(stats);
    }
  })();
})();
