"""``transcoders trace --qk`` and ``transcoders qk`` on the tiny Llama of the circuit CLI tests:
the QK section in the graph file (JSON and compact), head loadings, scores that match the model's
own attention, and one-line errors."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import assert_one_line_error
from test_cli_circuits import PROMPT, files, invoke  # noqa: F401 (the fixture)

from transcoders.circuits.export import load_graph, save_graph
from transcoders.circuits.qk import QK_SCHEMA

pytestmark = pytest.mark.usefixtures("single_thread")
SCORE = re.compile(r"head (\d+)\.(\d+), query pos(\d+) .*-> key pos(\d+) .*: score (\S+) .*attention weight (\S+)$", re.M)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TRANSCODERS_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def qk_graph(files, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("qk") / "g.json"
    result = invoke("trace", files["run"], "--model", files["model"], "--prompt", PROMPT, "--out", out,
                    "--dtype", "float64", "--qk", "--qk-heads", "4")
    assert result.exit_code == 0, result.output
    return out, result.output


def model_scores(files) -> dict[int, torch.Tensor]:  # noqa: F811
    """``{layer: [H, T, T]}`` pre-softmax scores as the Hugging Face model computes them (float64)."""
    from transformers import AutoTokenizer, LlamaForCausalLM
    from transformers.models.llama import modeling_llama

    model = LlamaForCausalLM.from_pretrained(files["model"], torch_dtype=torch.float64, attn_implementation="eager")
    ids = AutoTokenizer.from_pretrained(files["model"])(PROMPT, return_tensors="pt").input_ids
    original, scores = modeling_llama.eager_attention_forward, {}

    def recording(module, query, key, value, attention_mask, scaling, *args, **kwargs):
        keys = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
        scores[module.layer_idx] = (query @ keys.transpose(2, 3))[0] * scaling
        return original(module, query, key, value, attention_mask, scaling, *args, **kwargs)

    modeling_llama.eager_attention_forward = recording
    try:
        with torch.no_grad():
            model(ids)
    finally:
        modeling_llama.eager_attention_forward = original
    return scores


def test_trace_qk_stores_the_heads_carrying_the_strongest_edges(files, qk_graph):  # noqa: F811
    path, output = qk_graph
    graph = load_graph(path)
    section = graph.meta["qk"]
    assert section["schema"] == QK_SCHEMA and 1 <= len(section["heads"]) <= 4
    assert "QK attribution" in output and re.search(r"x the graph\)", output)
    scores = model_scores(files)
    for h in section["heads"]:
        # The stored score is the model's own (Hugging Face computes RMSNorm in float32).
        assert h["score"] == pytest.approx(float(scores[h["layer"]][h["head"], h["q"], h["k"]]), rel=1e-5, abs=1e-9)
        assert h["k"] < h["q"]
        assert h["query"] and h["key"] and h["pairs"]
    carried = [h["carried"] for h in section["heads"]]
    assert carried == sorted(carried, reverse=True)
    # Every stored head is a head part of one of the split edges, and the loadings name graph nodes.
    from transcoders.circuits.head_loadings import find_node

    parts = {(p["layer"], p["head"], p["q"], p["k"]) for ld in section["loadings"] for p in ld["parts"] if p["kind"] == "head"}
    assert {(h["layer"], h["head"], h["q"], h["k"]) for h in section["heads"]} <= parts
    for ld in section["loadings"]:
        src, dst = find_node(graph, ld["src"]), find_node(graph, ld["dst"])
        assert src is not None and dst is not None
        hit = (graph.edge_src == src) & (graph.edge_dst == dst)
        assert float(graph.edge_weight[hit][0]) == ld["weight"]


def test_qk_prints_stored_and_recomputed_breakdowns(files, qk_graph, tmp_path):  # noqa: F811
    path, _ = qk_graph
    listing = invoke("qk", path)
    assert listing.exit_code == 0, listing.output
    assert "reaches pos" in listing.output and "through head" in listing.output
    h = load_graph(path).meta["qk"]["heads"][0]
    stored = invoke("qk", path, "--head", f"{h['layer']}.{h['head']}", "--q", h["q"], "--k", h["k"])
    assert stored.exit_code == 0, stored.output
    # A pair that was not stored is computed from the model and transcoders; compact files too.
    compact = tmp_path / "g.safetensors"
    save_graph(load_graph(path), compact)
    scores = model_scores(files)
    for spec in (("--head", "2.3", "--q", 8, "--k", 2), ("--head", "1.0", "--q", 5, "--k", 5)):
        result = invoke("qk", compact, *spec, "--run-dir", files["run"], "--model", files["model"])
        assert result.exit_code == 0, result.output
        layer, head, q, k, score, _ = SCORE.search(result.output).groups()
        assert (int(layer), int(head), int(q), int(k)) == (int(spec[1][0]), int(spec[1][2]), spec[3], spec[5])
        assert float(score) == pytest.approx(float(scores[int(layer)][int(head), int(q), int(k)]), rel=1e-3)
    # --check removes the strongest sources on both sides: frozen, the score moves as the terms predict.
    result = invoke("qk", compact, "--head", "2.3", "--q", 8, "--k", 2, "--check", "--run-dir", files["run"],
                    "--model", files["model"])
    assert result.exit_code == 0, result.output
    checks = re.findall(r"score (\S+) -> (\S+) frozen \(terms predict (\S+)\); attention (\S+) -> (\S+) frozen, (\S+) free",
                        result.output)
    assert len(checks) == 2
    for _before, frozen, predicted, *weights in checks:
        assert float(frozen) == pytest.approx(float(predicted), rel=1e-3, abs=1e-6)
        assert all(0.0 <= float(x) <= 1.0 for x in weights)
    # Without --k: the key the head attends to most.
    result = invoke("qk", compact, "--head", "2.3", "--q", 8, "--run-dir", files["run"], "--model", files["model"])
    assert result.exit_code == 0, result.output
    weights = torch.softmax(scores[2][3, 8, :9], -1)
    assert int(SCORE.search(result.output).group(4)) == int(weights.argmax())


@pytest.mark.parametrize(("args", "needle"), [
    (("--head", "x"), "LAYER.HEAD"),
    (("--head", "1.0", "--q", 2, "--k", 5), "after query position"),
    (("--head", "1.9", "--q", 5, "--k", 2), "heads 0..3"),
])
def test_qk_bad_input_is_one_line_error(files, qk_graph, args, needle):  # noqa: F811
    path, _ = qk_graph
    assert_one_line_error(invoke("qk", path, *args, "--run-dir", files["run"], "--model", files["model"]), needle)


def test_qk_without_a_stored_section_or_of_another_schema_is_one_line_error(qk_graph, tmp_path):
    path, _ = qk_graph
    graph = load_graph(path)
    del graph.meta["qk"]
    save_graph(graph, tmp_path / "plain.json")
    assert_one_line_error(invoke("qk", tmp_path / "plain.json"), "trace it with --qk")
    graph.meta["qk"] = {"schema": "transcoders.qk/0"}
    save_graph(graph, tmp_path / "old.json")
    assert_one_line_error(invoke("qk", tmp_path / "old.json"), "transcoders.qk/1")
