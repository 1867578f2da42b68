"""The compact graph file (``transcoders.graph-compact/1``, safetensors): an exact round trip of
the graph ``trace`` wrote as JSON (every node column, every edge as a set), read back by the same
``load_graph``; ``paths`` and ``verify`` print the same numbers from either file; the viewer's
registry lists and summarises it; damaged files and other schemas give one clear error."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from test_cli_circuits import PROMPT, files, invoke  # noqa: F401  (the tiny Llama + random transcoders fixture)

from transcoders.circuits.compact import COMPACT_SCHEMA, compact_summary, is_compact
from transcoders.circuits.export import GraphFileError, load_graph, save_graph

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def traced(files, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("compact")
    result = invoke("trace", files["run"], "--model", files["model"], "--prompt", PROMPT, "--out", out / "g.json",
                    "--dtype", "float64", "--max-feature-nodes", 0)
    assert result.exit_code == 0, result.output
    result = invoke("trace", files["run"], "--model", files["model"], "--prompt", PROMPT, "--out",
                    out / "traced.safetensors", "--dtype", "float64", "--max-feature-nodes", 0)
    assert result.exit_code == 0, result.output
    save_graph(load_graph(out / "g.json"), out / "g.safetensors")  # the same graph, compact
    return out


def _edge_set(g) -> set:
    return {(int(s), int(d), float(w)) for s, d, w in zip(g.edge_src, g.edge_dst, g.edge_weight)}


def test_round_trip_is_exact_and_edges_come_back_grouped_by_row(traced):
    a, b = load_graph(traced / "g.json"), load_graph(traced / "g.safetensors")
    assert is_compact(traced / "g.safetensors") and not is_compact(traced / "g.json")
    for c in ("kind", "layer", "pos", "feature", "activation", "value", "const", "dropped", "influence", "target_nodes"):
        x, y = getattr(a, c), getattr(b, c)
        assert x.dtype == y.dtype and torch.equal(x.nan_to_num(-12345.0), y.nan_to_num(-12345.0)), c
    assert a.n_edges == b.n_edges > 0 and _edge_set(a) == _edge_set(b)
    assert bool((b.edge_dst.diff() >= 0).all())  # CSR: grouped by the receiving row, in node order
    assert a.tokens == b.tokens and a.token_strs == b.token_strs and a.targets == b.targets and a.meta == b.meta
    _, residual = b.row_balance()
    assert float(residual.abs().max()) < 1e-9  # still exact: each row is the sum of its edges
    s = compact_summary(traced / "g.safetensors")
    assert s["schema"] == COMPACT_SCHEMA and (s["n_nodes"], s["n_edges"]) == (b.n_nodes, b.n_edges)
    assert (traced / "g.safetensors").stat().st_size * 3 < (traced / "g.json").stat().st_size
    direct = load_graph(traced / "traced.safetensors")  # `trace --out X.safetensors` writes one too
    assert _edge_set(direct) == _edge_set(a) and direct.meta["prompt"] == a.meta["prompt"]


def test_paths_and_verify_read_either_file(files, traced):  # noqa: F811
    outs = [invoke("paths", traced / name, "-n", 5).output for name in ("g.json", "g.safetensors")]
    assert "nats" in outs[0] and outs[0].replace("g.json", "") == outs[1].replace("g.safetensors", "")
    reports = []
    for name in ("g.json", "g.safetensors"):
        r = invoke("verify", traced / name, "--run-dir", files["run"], "--model", files["model"], "--mean-tokens", 0,
                   "--top-edges", 10, "--out", traced / f"v-{name}.out")
        assert r.exit_code == 0, r.output
        reports.append(json.loads((traced / f"v-{name}.out").read_text()))
    assert reports[0]["summary"]["faithfulness"] == pytest.approx(reports[1]["summary"]["faithfulness"], abs=1e-9)
    assert reports[1]["summary"]["edge_max_abs_error"] < 1e-9


def test_viewer_lists_and_summarises_compact_files(traced):
    from transcoders.viewer.registry import Registry

    reg = Registry([], [traced])
    names = sorted(e.path.name for e in reg.graph_entries())
    assert names == ["g.json", "g.safetensors", "traced.safetensors"]
    ids = {e.path.name: e.id for e in reg.graph_entries()}
    a, b = reg.summary(ids["g.json"]), reg.summary(ids["g.safetensors"])
    assert (a["prompt"], a["n_nodes"], a["n_edges"]) == (b["prompt"], b["n_nodes"], b["n_edges"])
    assert reg.load_graph(ids["g.safetensors"]).n_edges == a["n_edges"]


def test_damaged_and_foreign_files_are_refused_with_a_fix(traced, tmp_path):
    data = (traced / "g.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(GraphFileError, match="re-export"):
        load_graph(tmp_path / "cut.safetensors")
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"), metadata={"schema": "something/else"})
    with pytest.raises(GraphFileError, match="schema 'something/else'"):
        load_graph(tmp_path / "other.safetensors")
    g = load_graph(traced / "g.safetensors")
    g.edge_src = g.edge_src.clone()
    g.edge_src[0] = g.n_nodes + 5  # an edge from nowhere
    save_graph(g, tmp_path / "bad.safetensors")
    with pytest.raises(GraphFileError, match="outside"):
        load_graph(tmp_path / "bad.safetensors")
    with pytest.raises(GraphFileError, match="no graph file"):
        load_graph(tmp_path / "missing.safetensors")
