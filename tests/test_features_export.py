"""Exporting the feature store as circuit-tracer's per-feature JSON: every file matches the
format, its values agree with the store's raw tensors, files sit where a graph's frontend
looks for them, and existing files are not replaced without force."""

from __future__ import annotations

import json
import math

import jsonschema
import pytest
import torch
from test_features import _settings, tiny_run  # noqa: F401  (tiny_run is a fixture)

from transcoders.circuits.export import graph_to_json
from transcoders.circuits.graph import EMBEDDING, FEATURE, TARGET, Graph
from transcoders.circuits.targets import Target
from transcoders.coders.run_folder import CoderKey
from transcoders.features.collect import collect_features
from transcoders.features.export import (
    CircuitTracerFeature,
    circuit_tracer_feature,
    circuit_tracer_feature_schema,
    default_scan,
    default_transcoder_id,
    export_circuit_tracer,
    linear_histogram,
)
from transcoders.features.store import ACTS, FeatureStoreError
from transcoders.files import OutputExistsError

SCAN = "tiny-llama"


@pytest.fixture(scope="module")
def store(request, tmp_path_factory):
    run, _ = request.getfixturevalue("tiny_run")
    out = tmp_path_factory.mktemp("ct") / "store"
    return collect_features(run, _settings(tokens=200), out=out, progress=False, log=_quiet)


def _quiet(_msg: str) -> None:
    pass


@pytest.fixture(scope="module")
def exported(store, tmp_path_factory):
    out = tmp_path_factory.mktemp("ct_out")
    return out, export_circuit_tracer(store, out, scan=SCAN, transcoder_id="tiny/run")


def _cantor(a: int, b: int) -> int:  # written out independently of the code under test
    return sum(range(a + b + 1)) + b


def test_every_file_matches_the_format_and_the_store(store, exported):
    out, paths = exported
    schema = circuit_tracer_feature_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    assert set(paths) == set((out / SCAN).glob("*.json"))
    assert schema["additionalProperties"] is False and set(schema["required"]) == {
        "transcoder_id", "index", "examples_quantiles", "top_logits", "bottom_logits", "act_min", "act_max",
        "quantile_values", "histogram", "activation_frequency"}
    by_id = {}
    for key in store.keys:
        count = store.tensor(key, ACTS, "count")
        n_tokens = store.manifest["coders"][str(key)]["n_tokens"]
        for i in range(store.d_sae(key)):
            by_id[_cantor(key.layer, i)] = (key, i, int(count[i]), int(count[i]) / n_tokens)
    live = {fid for fid, (_, _, c, _) in by_id.items() if c > 0}
    assert {int(p.stem) for p in paths} == live  # dead features are skipped
    checked = 0
    for p in paths:
        obj = json.loads(p.read_text())
        validator.validate(obj)
        CircuitTracerFeature.model_validate(obj)
        key, i, count, freq = by_id[int(p.stem)]
        rec = store.feature(key.layer, i)
        assert obj["index"] == int(p.stem) and obj["transcoder_id"] == "tiny/run"
        assert obj["activation_frequency"] == pytest.approx(freq, rel=1e-12)
        assert obj["act_min"] == 0.0 and obj["act_max"] == pytest.approx(rec.max)
        groups = obj["examples_quantiles"]
        assert groups[0]["quantile_name"] == "Top activations"
        first = groups[0]["examples"][0]
        assert max(first["tokens_acts_list"]) == pytest.approx(rec.max, rel=1e-6)
        assert first["tokens_acts_list"][first["train_token_ind"]] == pytest.approx(rec.max, rel=1e-6)
        for g in groups:
            for ex in g["examples"]:
                assert len(ex["tokens"]) == len(ex["tokens_acts_list"])
                assert 0 <= ex["train_token_ind"] < len(ex["tokens"])
        # quantile groups: highest first, each example's centre activation inside its group's range
        centre = [[ex["tokens_acts_list"][ex["train_token_ind"]] for ex in g["examples"]]
                  for g in groups if g["quantile_name"].startswith("Quantile")]
        assert centre and all(a >= b for a, b in zip([min(c) for c in centre], [max(c) for c in centre[1:]]))
        assert all(c == sorted(c, reverse=True) for c in centre)
        # the random group: windows where the feature is silent
        if groups[-1]["quantile_name"].startswith("Random"):
            assert all(max(ex["tokens_acts_list"]) == 0.0 for ex in groups[-1]["examples"])
        # logits: the tokens only, in the store's order
        assert obj["top_logits"] == [t for t, _ in rec.logit_top]
        assert obj["bottom_logits"] == [t for t, _ in rec.logit_bottom]
        # histogram: as many activations as fired, on [0, act_max]
        assert sum(obj["histogram"]) == pytest.approx(count, rel=1e-9)
        # quantile_values: percentiles 1..100 of every activation (the sample is all of them here)
        assert count <= 2400
        vals = torch.tensor(sorted(e.acts[e.center] for e in rec.samples), dtype=torch.float64)
        assert len(vals) == count
        qv = obj["quantile_values"]
        assert len(qv) == 100 and qv == sorted(qv)
        assert qv[-1] == pytest.approx(rec.max, rel=1e-6)
        for pct in (1, 25, 50, 99):
            assert qv[pct - 1] == pytest.approx(float(torch.quantile(vals, pct / 100)), rel=1e-9)
        for k in range(1, len(rec.quantiles)):  # the store's own quantiles at the group boundaries
            assert qv[100 * k // (len(rec.quantiles) - 1) - 1] == pytest.approx(rec.quantiles[k], rel=1e-5)
        checked += 1
    assert checked > 20


def test_histogram_conversion_keeps_the_log_bins_mass():
    edges = torch.logspace(-4, 4, 65, dtype=torch.float64).tolist()
    counts = [0] * 64
    counts[30], counts[35], counts[38] = 7, 5, 3  # bins [e30, e31), [e35, e36), [e38, e39)
    act_max = (edges[38] + edges[39]) / 2
    h = linear_histogram(counts, edges, act_max, n_bins=20)
    assert len(h) == 20 and sum(h) == pytest.approx(15)
    width = act_max / 20
    for j, e in ((31, edges[31]), (36, edges[36]), (38, edges[38])):
        below = sum(counts[:j])  # activations below log edge e
        k = int(e // width)
        assert sum(h[:k]) <= below + 1e-9 <= sum(h[:k + 1]) + 2e-9
    assert h[-1] > 0  # the max lies in the last bin
    # within one log bin the spread is uniform in log(activation)
    lo, hi = edges[38], act_max
    k0 = math.ceil(lo / width)
    for k in range(k0, 19):
        a, b = k * width, (k + 1) * width
        assert h[k] == pytest.approx(3 * math.log(b / a) / math.log(hi / lo), rel=1e-9)
    assert linear_histogram([0] * 64, edges, 0.0, n_bins=5) == [0.0] * 5


def test_files_are_where_a_graphs_frontend_looks(store, exported):
    out, _ = exported
    live = [(k.layer, i) for k in store.keys
            for i in (store.tensor(k, ACTS, "count") > 0).nonzero().flatten().tolist()[:2]]
    kinds = [EMBEDDING] + [FEATURE] * len(live) + [TARGET]
    n = len(kinds)
    graph = Graph(
        tokens=[1], token_strs=["a"], n_layers=len(store.keys),
        kind=torch.tensor(kinds), layer=torch.tensor([-1] + [la for la, _ in live] + [len(store.keys)]),
        pos=torch.zeros(n, dtype=torch.long), feature=torch.tensor([-1] + [i for _, i in live] + [-1]),
        activation=torch.ones(n, dtype=torch.float64), value=torch.ones(n, dtype=torch.float64),
        const=torch.zeros(n, dtype=torch.float64), dropped=torch.zeros(n, dtype=torch.float64),
        edge_src=torch.arange(n - 1), edge_dst=torch.arange(1, n), edge_weight=torch.ones(n - 1, dtype=torch.float64),
        targets=[Target("logit", 0, token=1, label="a", weight=1.0)], target_nodes=torch.tensor([n - 1]),
        meta={"model": store.manifest["model"]})
    obj = graph_to_json(graph, scan=SCAN)
    scan = obj["metadata"]["scan"]
    feature_nodes = [nd for nd in obj["nodes"] if nd["feature_type"] == "cross layer transcoder"]
    assert len(feature_nodes) == len(live)
    for nd in feature_nodes:
        f = json.loads((out / scan / f"{nd['feature']}.json").read_text())  # init-feature-examples.js's path
        layer, idx = int(nd["layer"]), int(nd["node_id"].split("_")[1])
        assert f["index"] == nd["feature"] == _cantor(layer, idx)
        assert f["act_max"] == pytest.approx(store.feature(layer, idx).max)
    # without a scan, graph and export agree when the model's name is a plain name
    assert default_scan(store) == store.manifest["model"].rstrip("/").rsplit("/", 1)[-1]
    assert default_transcoder_id(store) == f"{default_scan(store)}/store"


def test_refuses_to_replace_without_force_and_exports_listed_dead_features(store, tmp_path):
    out = tmp_path / "out"
    key = store.keys[0]
    count = store.tensor(key, ACTS, "count")
    live = (count > 0).nonzero().flatten().tolist()
    dead = (count == 0).nonzero().flatten().tolist()
    first = export_circuit_tracer(store, out, layers=[key.layer], features=live[:2], scan=SCAN)
    assert [int(p.stem) for p in first] == [_cantor(key.layer, i) for i in live[:2]]
    before = {p: p.read_bytes() for p in first}
    for p in first:
        p.write_text('{"mark": 1}')
    # one new file and two existing ones: nothing is written at all
    with pytest.raises(OutputExistsError):
        export_circuit_tracer(store, out, layers=[key.layer], features=live[:3], scan=SCAN)
    assert all(p.read_text() == '{"mark": 1}' for p in first)
    assert not (out / SCAN / f"{_cantor(key.layer, live[2])}.json").exists()
    again = export_circuit_tracer(store, out, layers=[key.layer], features=live[:2], scan=SCAN, force=True)
    assert {p: p.read_bytes() for p in again} == before
    # a dead feature listed explicitly is exported; (layer, index) pairs pick layers
    if dead:
        (p,) = export_circuit_tracer(store, out, features=[(key.layer, dead[0])], scan=SCAN)
        obj = json.loads(p.read_text())
        jsonschema.validate(obj, circuit_tracer_feature_schema())
        assert obj["activation_frequency"] == 0.0 and sum(obj["histogram"]) == 0.0 and obj["quantile_values"] == []
        assert all(g["quantile_name"].startswith("Random") for g in obj["examples_quantiles"])
    with pytest.raises(FeatureStoreError):
        export_circuit_tracer(store, out, layers=[99], scan=SCAN)
    with pytest.raises(FeatureStoreError):
        export_circuit_tracer(store, out, features=[store.d_sae(key)], layers=[key.layer], scan=SCAN)
    for bad in ("/abs", "../up", "./data/features/x"):
        with pytest.raises(ValueError):
            export_circuit_tracer(store, out, scan=bad)


def test_one_feature_options(store):
    key = CoderKey(store.keys[0].layer)
    i = int((store.tensor(key, ACTS, "count") > 0).nonzero()[0])
    obj = circuit_tracer_feature(store, key.layer, i, transcoder_id="x", n_per_group=1, n_top=2, n_random=0)
    groups = obj["examples_quantiles"]
    assert len(groups[0]["examples"]) == min(2, len(store.feature(key.layer, i).top))
    assert all(len(g["examples"]) == 1 for g in groups[1:])
    assert not any(g["quantile_name"].startswith("Random") for g in groups)
    seen = set()
    for g in groups:  # an example shown again in a later group is marked as repeated
        for ex in g["examples"]:
            ident = (tuple(ex["tokens"]), tuple(ex["tokens_acts_list"]), ex["train_token_ind"])
            if ex["is_repeated_datapoint"]:
                assert ident in seen
            seen.add(ident)
