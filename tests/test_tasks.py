"""Set-comparison targets (``group:+A,B;-C``), the probability-difference metric, task files,
the task generators (greater-than, IOI, capitals, arithmetic) and ``transcoders task make |
trace``.

The central property: a graph explaining a group target is exact (value = incoming edges +
const + dropped; removing a source moves the target by its edge) and is the same linear
combination of the graphs of the centred ``logit:`` targets of its tokens, edge by edge.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import FAMILIES, assert_injections_match_edges, assert_one_line_error, build_tiny_model
from test_circuits_attribution import make_coders
from test_cli_circuits import PROMPT, files  # noqa: F401  (the tiny Llama + random transcoders fixture)

from transcoders.circuits import LocalReplacement, attribute
from transcoders.circuits.export import graph_to_json, load_graph, save_graph, validate_graph_json
from transcoders.circuits.graph import ERROR, FEATURE
from transcoders.circuits.targets import (
    TargetError,
    group_target,
    logit_target,
    parse_target,
    prob_diff,
    target_prob_diff,
)
from transcoders.circuits.task_gen import CAPITALS, GENERATORS, GT_CENTURIES, IOI_NAMES, greater_than
from transcoders.circuits.tasks import TaskFileError, TaskItem, item_targets, load_task, save_task, task_metrics
from transcoders.cli import main
from transcoders.models import adapter_for

V = 100  # tiny vocabulary


# ------------------------------------------------------------------ group targets: exact graphs


def _incoming(graph, node: int) -> torch.Tensor:
    """``[n_nodes]`` float64: the weight of the edge from each node into ``node`` (0 if none)."""
    w = torch.zeros(graph.n_nodes, dtype=torch.float64)
    m = graph.edge_dst == node
    return w.index_add_(0, graph.edge_src[m], graph.edge_weight[m].double())


@pytest.fixture(scope="module", params=FAMILIES)
def group_setup(request, single_thread):
    model = build_tiny_model(request.param, dtype=torch.float64)
    adapter = adapter_for(model)
    coders = make_coders(adapter.n_layers, "skip_transcoder", "relu")
    rep = LocalReplacement(adapter, coders, torch.arange(3, 13), dtype=torch.float64)
    return rep


SPECS = ["group:+#4,#7,#9;-#2,#3", "group:+#11,#5", "group:-#8,#1,#60@6"]


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("budget", [None, 6])
def test_group_graph_is_exact_and_the_combination_of_logit_graphs(group_setup, spec, budget):
    rep = group_setup
    g = parse_target(spec, vocab_size=V, n_layers=3)
    # independent value: the definition, on the replacement model's logits (which reproduce the
    # model's, checked below)
    lg = rep.logits.double()[g.pos]
    plus = [t for t, c in zip(g.tokens, g.coefs) if c > 0]
    minus = [t for t, c in zip(g.tokens, g.coefs) if c < 0]
    expect = (lg[plus].mean() if plus else 0) - (lg[minus].mean() if minus else 0)
    if not (plus and minus):  # one set: centred like logit:
        expect = expect - (1 if plus else -1) * lg.mean()
    assert float(g.value(rep.logits)) == pytest.approx(float(expect), abs=1e-12)
    model_value = g.value(rep.model_logits.double()) if rep.softcap is None else None
    if model_value is not None:
        assert float(model_value) == pytest.approx(float(expect), abs=1e-6)

    parts = [logit_target(t, g.pos, centered=True) for t in g.tokens]
    graph = attribute(rep, [g, *parts], max_feature_nodes=budget, batch_size=8)
    rows, residual = graph.row_balance()
    assert residual.abs().max() < 1e-10  # value = incoming + const + dropped, for every row
    tnodes = graph.target_nodes.tolist()
    coefs = torch.tensor(g.coefs, dtype=torch.float64)
    assert float(graph.value[tnodes[0]]) == pytest.approx(float(expect), abs=1e-9)
    for col in ("value", "const", "dropped"):
        combo = coefs @ getattr(graph, col)[tnodes[1:]].double()
        assert float(getattr(graph, col)[tnodes[0]]) == pytest.approx(float(combo), abs=1e-10), col
    edges = torch.stack([_incoming(graph, n) for n in tnodes])
    torch.testing.assert_close(edges[0], coefs @ edges[1:], rtol=0, atol=1e-10)
    assert edges[0].abs().max() > 1e-3  # not vacuous
    if budget is not None:
        assert abs(float(graph.dropped[tnodes[0]])) > 0  # features left out still balance the row
    # removing a source's write from the frozen model moves the group target by its edge
    feats = (graph.kind == FEATURE).nonzero().flatten().tolist()[:4]
    errs = (graph.kind == ERROR).nonzero().flatten().tolist()[-3:]
    assert_injections_match_edges(rep, graph, feats + errs)


def test_group_targets_round_trip_through_graph_files_and_validate(group_setup, tmp_path):
    rep = group_setup
    targets = [parse_target(s, vocab_size=V, n_layers=3) for s in SPECS]
    graph = attribute(rep, targets, max_feature_nodes=8, batch_size=8)
    validate_graph_json(graph_to_json(graph))
    back = load_graph(save_graph(graph, tmp_path / "g.json"))
    for a, b in zip(graph.targets, back.targets):
        assert (b.kind, b.pos, b.tokens, b.coefs, b.centered, b.label) == (a.kind, a.pos, a.tokens, a.coefs, a.centered,
                                                                           a.label)
        assert float(b.value(rep.logits)) == float(a.value(rep.logits))
    torch.testing.assert_close(back.edge_weight, graph.edge_weight, rtol=0, atol=0)


def test_old_graph_files_without_group_fields_still_load(group_setup, tmp_path):
    rep = group_setup
    graph = attribute(rep, [logit_target(5, centered=True)], max_feature_nodes=4, batch_size=8)
    obj = graph_to_json(graph)
    for t in obj["transcoders"]["targets"]:
        assert "tokens" not in t and "coefs" not in t  # what files of older kinds look like
    path = tmp_path / "old.json"
    path.write_text(json.dumps(obj))
    back = load_graph(path)
    assert back.targets[0].tokens is None
    assert float(back.targets[0].value(rep.logits)) == float(graph.targets[0].value(rep.logits))


def test_group_labels_and_both_sets_cancel_the_vocabulary_mean(tiny_tokenizer):
    g = parse_target("group:+#4,#5;-#6", vocab_size=V, n_layers=3)
    assert (g.kind, g.centered, g.coefs) == ("logit_group", False, [0.5, 0.5, -1.0])
    assert g.label == "group(+#4,#5;-#6)"
    only_minus = parse_target("group:-#6,#7", vocab_size=V, n_layers=3)
    assert only_minus.centered and only_minus.coefs == [-0.5, -0.5]
    logits = torch.randn(3, V, dtype=torch.float64)
    shifted = logits + 7.0  # adding a constant to every logit changes no group value with both sets
    assert float(g.value(shifted)) == pytest.approx(float(g.value(logits)), abs=1e-12)
    assert float(only_minus.value(shifted)) == pytest.approx(float(only_minus.value(logits)), abs=1e-12)
    words = parse_target("group:+ the", tokenizer=tiny_tokenizer, vocab_size=len(tiny_tokenizer), n_layers=3)
    assert words.tokens == tiny_tokenizer.encode(" the", add_special_tokens=False)
    assert words.label == "group(+' the')"


@pytest.mark.parametrize("spec, needles", [
    ("group:+ Senatezzq", ["' Senatezzq'", "tokens", "exactly one", "#ID"]),   # several tokens
    ("group:+;-#3", ["+ set is empty", "group:+A,B"]),
    ("group:", ["must start with + or -", "group:+A,B,C;-D,E"]),
    ("group:+#4,,#5", ["empty token", "#ID"]),
    ("group:+#4;-#999", ["999", "outside the vocabulary"]),
    ("group:#4,#5", ["must start with + or -"]),
    ("group:+#4;+#5", ["two + sets"]),
    ("group:+#4,#5;-#4", ["twice", "one set"]),
])
def test_group_parse_errors_are_one_line_and_name_the_fix(tiny_tokenizer, spec, needles):
    with pytest.raises(TargetError) as info:
        parse_target(spec, tokenizer=tiny_tokenizer, vocab_size=len(tiny_tokenizer), n_layers=3)
    msg = str(info.value)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg, msg


def test_multi_token_message_shows_how_the_text_tokenizes(tiny_tokenizer):
    ids = tiny_tokenizer.encode(" Senatezzq", add_special_tokens=False)
    with pytest.raises(TargetError, match=re.escape(str(ids))):
        parse_target("group:+ Senatezzq;-#3", tokenizer=tiny_tokenizer, vocab_size=len(tiny_tokenizer), n_layers=3)


# ------------------------------------------------------------------ probability difference


def test_prob_diff_matches_a_hand_softmax():
    torch.manual_seed(0)
    logits = torch.randn(2, 12) * 3
    for row in range(2):
        z = [math.exp(x) for x in logits[row].tolist()]
        p = [x / sum(z) for x in z]
        expect = p[3] + p[5] + p[7] - (p[0] + p[1])
        assert float(prob_diff(logits[row], [3, 5, 7], [0, 1])) == pytest.approx(expect, abs=1e-12)
        assert float(prob_diff(logits[row], [3])) == pytest.approx(p[3], abs=1e-12)
    both = prob_diff(logits, [3, 5, 7], [0, 1])
    assert both.shape == (2,)
    g = group_target([3, 5, 7], [0, 1], pos=1)
    assert target_prob_diff(g, logits) == pytest.approx(float(both[1]), abs=1e-12)
    d = parse_target("diff:#2,#9", vocab_size=12, n_layers=1)
    p = logits[-1].double().softmax(-1)
    assert target_prob_diff(d, logits) == pytest.approx(float(p[2] - p[9]), abs=1e-12)
    assert target_prob_diff(logit_target(2), logits) is None


# ------------------------------------------------------------------ task files


def _items():
    return [TaskItem(prompt="The war lasted from 1732 to 17", target="group:+4,5,6,7,8,9;-0,1,2,3",
                     counterfactual="The war lasted from 1701 to 17", meta={"start": 1732}),
            TaskItem(prompt="When Mary and John went out, John gave a drink to", target="diff: Mary, John",
                     answer=" Mary")]


def test_task_files_round_trip_and_refuse_to_overwrite(tmp_path):
    path = tmp_path / "t.jsonl"
    save_task(_items(), path)
    assert load_task(path) == _items()
    assert len(path.read_text().splitlines()) == 2
    with pytest.raises(ValueError, match="already exists.*--force"):
        save_task(_items()[:1], path)
    save_task(_items()[:1], path, force=True)
    assert load_task(path) == _items()[:1]


@pytest.mark.parametrize("lines, needles", [
    (['{"prompt": "a", "target": "logit:#1"}', "", "{not json"], ["line 3", "not JSON"]),
    (['{"prompt": "a", "target": "logit:#1"}', '{"prompt": "b"}'], ["line 2", "missing field 'target'"]),
    (['{"prompt": "a", "target": "logit:#1", "counterfactal": "b"}'], ["line 1", "unknown field 'counterfactal'"]),
    (['["a", "b"]'], ["line 1", "not an object"]),
    (['{"prompt": "", "target": "logit:#1"}'], ["line 1", "prompt"]),
    (["", "  "], ["holds no task items"]),
])
def test_malformed_task_files_name_the_line(tmp_path, lines, needles):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(TaskFileError) as info:
        load_task(path)
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg
    for needle in needles:
        assert needle in msg, msg


def test_missing_task_file_names_the_fix(tmp_path):
    with pytest.raises(TaskFileError, match="task make"):
        load_task(tmp_path / "nope.jsonl")


def test_item_targets_names_the_bad_item(tiny_tokenizer):
    items = [TaskItem(prompt="a", target="logit:#1"), TaskItem(prompt="b", target="group:+ Senatezzq")]
    with pytest.raises(TaskFileError, match="task item 1"):
        item_targets(items, tokenizer=tiny_tokenizer, vocab_size=len(tiny_tokenizer))


def test_task_metrics_match_a_direct_computation(tiny_tokenizer):
    the = tiny_tokenizer.encode(" the", add_special_tokens=False)[0]
    items = [TaskItem(prompt="x", target="group:+#4,#5;-#6", meta={"template": 0}),
             TaskItem(prompt="y", target=f"diff:#{the},#9", answer=" the", meta={"template": 1}),
             TaskItem(prompt="z", target=f"diff:#{the},#9", answer=" the", meta={"template": 1})]
    targets = item_targets(items, tokenizer=tiny_tokenizer, vocab_size=len(tiny_tokenizer))
    torch.manual_seed(1)
    logits = torch.randn(3, len(tiny_tokenizer))
    logits[1, the] = 50.0  # top-1 on item 1, not on item 2
    cf = torch.randn(3, len(tiny_tokenizer))
    m = task_metrics(items, targets, logits, tokenizer=tiny_tokenizer, counterfactual_logits=cf)
    p = logits.double().softmax(-1)
    values = [(logits[0, 4] + logits[0, 5]) / 2 - logits[0, 6], logits[1, the] - logits[1, 9], logits[2, the] - logits[2, 9]]
    pds = [p[0, 4] + p[0, 5] - p[0, 6], p[1, the] - p[1, 9], p[2, the] - p[2, 9]]
    assert m["mean_value"] == pytest.approx(float(sum(values) / 3), abs=1e-5)
    assert m["mean_pd"] == pytest.approx(float(sum(pds) / 3), abs=1e-6)
    assert m["pd_positive"] == pytest.approx(sum(float(x) > 0 for x in pds) / 3)
    assert m["top1_accuracy"] == pytest.approx((1 + int(int(logits[2].argmax()) == the)) / 2)
    assert m["mean_answer_prob"] == pytest.approx(float(p[1, the] + p[2, the]) / 2, abs=1e-6)
    assert m["by_template"]["0"]["n"] == 1 and m["by_template"]["1"]["top1_accuracy"] == m["top1_accuracy"]
    cf_values = [(cf[0, 4] + cf[0, 5]) / 2 - cf[0, 6], cf[1, the] - cf[1, 9], cf[2, the] - cf[2, 9]]
    assert m["counterfactual_value"] == pytest.approx(float(sum(cf_values) / 3), abs=1e-5)


# ------------------------------------------------------------------ generators


@pytest.mark.parametrize("kind", list(GENERATORS))
def test_generators_are_deterministic_per_seed_and_distinct(kind):
    a, b, c = GENERATORS[kind](200, 0), GENERATORS[kind](200, 0), GENERATORS[kind](200, 1)
    assert a == b and a != c
    assert len({(it.prompt, it.target) for it in a}) == 200
    assert all(it.counterfactual and it.counterfactual != it.prompt for it in a)


def test_greater_than_targets_follow_the_start_year():
    items = greater_than(1000, 3)
    assert len({it.prompt for it in items}) == 1000
    for it in items:
        start, cc, d = it.meta["start"], it.meta["century"], it.meta["tens"]
        assert cc in GT_CENTURIES and start // 100 == cc and (start // 10) % 10 == d and 1 <= d <= 8
        assert str(start) in it.prompt and it.prompt.endswith(f" {cc}")
        assert it.counterfactual == it.prompt.replace(str(start), f"{cc}01")
        plus, minus = it.target.removeprefix("group:+").split(";-")
        assert plus.split(",") == [str(k) for k in range(d + 1, 10)]
        assert minus.split(",") == [str(k) for k in range(d + 1)]
    assert {it.meta["tens"] for it in items} == set(range(1, 9))
    assert len({it.meta["template"] for it in items}) > 1 and len({it.meta["noun"] for it in items}) > 5


def test_ioi_and_capitals_and_arithmetic_answers_agree_with_their_targets():
    for it in GENERATORS["ioi"](200, 0):
        m = it.meta
        assert it.target == f"diff: {m['io']}, {m['s']}" and it.answer == f" {m['io']}"
        assert len({m["io"], m["s"], m["c"]}) == 3
        assert it.prompt.count(m["s"]) == 2 and it.prompt.count(m["io"]) == 1
        assert it.counterfactual.count(m["c"]) == 1 and it.counterfactual.count(m["s"]) == 1
    for it in GENERATORS["capitals"](200, 0):
        assert it.answer == f" {it.meta['capital']}" and it.meta["other"] != it.meta["country"]
        assert it.target == f"diff: {it.meta['capital']}, {CAPITALS[it.meta['other']]}"
    for it in GENERATORS["arithmetic"](200, 0):
        a, b, s = it.meta["a"], it.meta["b"], it.meta["sum"]
        assert s == a + b <= 9 and it.answer == str(s) and it.meta["counterfactual_sum"] != s
        assert it.target == f"group:+{s};-" + ",".join(str(d) for d in range(10) if d != s)


def test_generators_refuse_impossible_sizes():
    with pytest.raises(ValueError, match="at most 275"):
        GENERATORS["arithmetic"](276, 0)
    with pytest.raises(ValueError, match="at least 1"):
        greater_than(0, 0)


# ------------------------------------------------------------------ the SmolLM2 tokenizer


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from transcoders.models.loading import load_model

    return load_model().tokenizer


def _enc(tok, text):
    return tok(text, add_special_tokens=False).input_ids


@pytest.mark.slow
def test_every_greater_than_item_tokenizes_as_its_target_expects(smollm2_tokenizer):
    tok = smollm2_tokenizer
    digit = {d: _enc(tok, str(d)) for d in range(10)}
    assert all(len(ids) == 1 for ids in digit.values())
    items = greater_than(200, 0)
    targets = item_targets(items, tokenizer=tok, vocab_size=len(tok))
    for it, t in zip(items, targets):
        ids = _enc(tok, it.prompt)
        cc = it.meta["century"]
        assert ids[-2:] == digit[cc // 10] + digit[cc % 10]  # the century, digit by digit, ends the prompt
        for d in range(10):  # the tens digit comes next, as its own token
            assert _enc(tok, it.prompt + str(d)) == ids + digit[d]
        assert sorted(t.tokens) == sorted(digit[d][0] for d in range(10))
        assert _enc(tok, it.counterfactual)[-2:] == ids[-2:]


@pytest.mark.slow
def test_names_capitals_and_sums_are_single_tokens_after_their_prompts(smollm2_tokenizer):
    tok = smollm2_tokenizer
    for name in IOI_NAMES:
        assert len(_enc(tok, " " + name)) == 1, name
    for capital in CAPITALS.values():
        assert len(_enc(tok, " " + capital)) == 1, capital
    for kind in ("ioi", "capitals", "arithmetic"):
        items = GENERATORS[kind](200, 0)
        item_targets(items, tokenizer=tok, vocab_size=len(tok))
        for it in items:
            ids = _enc(tok, it.prompt)
            assert _enc(tok, it.prompt + it.answer) == ids + _enc(tok, it.answer), (kind, it.prompt)


# ------------------------------------------------------------------ CLI on the tiny Llama


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TRANSCODERS_CACHE", str(tmp_path / "cache"))


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_task_make_writes_the_generator_output_and_refuses_to_overwrite(tmp_path):
    out = tmp_path / "gt.jsonl"
    result = invoke("task", "make", "greater-than", "--n", 210, "--seed", 4, "--out", out)
    assert result.exit_code == 0, result.output
    assert load_task(out) == greater_than(210, 4)
    assert_one_line_error(invoke("task", "make", "ioi", "--out", out), "already exists", "--force")
    assert invoke("task", "make", "ioi", "--n", 5, "--out", out, "--force").exit_code == 0
    assert len(load_task(out)) == 5
    assert_one_line_error(invoke("task", "make", "arithmetic", "--n", 999, "--out", tmp_path / "a.jsonl"), "at most 275")


def _hf_logits(fx: dict, prompt: str) -> torch.Tensor:
    """``[T, vocab]`` float64 logits of the saved tiny Llama itself (not through the library)."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(fx["model"])
    model = LlamaForCausalLM.from_pretrained(fx["model"]).eval()
    with torch.no_grad():
        return model(tok(prompt, return_tensors="pt").input_ids).logits[0].double()


def test_trace_prints_a_group_targets_value_and_pd(files, tmp_path):  # noqa: F811
    result = invoke("trace", files["run"], "--model", files["model"], "--prompt", PROMPT, "--out", tmp_path / "g.json",
                    "--target", "group:+#5,#7;-#9")
    assert result.exit_code == 0, result.output
    line = next(x for x in result.output.splitlines() if x.startswith("targets (most probable first): "))
    value, pd = re.search(r"= (-?\d+\.\d+) \(p=1\.000, PD=([+-]\d+\.\d+)\)", line).groups()
    lg = _hf_logits(files, PROMPT)[-1]
    p = lg.softmax(-1)
    assert float(value) == pytest.approx(float((lg[5] + lg[7]) / 2 - lg[9]), abs=2e-3)
    assert float(pd) == pytest.approx(float(p[5] + p[7] - p[9]), abs=2e-3)
    assert "mean logit of the + set - mean logit of the - set" in result.output
    graph = load_graph(tmp_path / "g.json")
    assert graph.targets[0].kind == "logit_group"
    validate_graph_json(json.loads((tmp_path / "g.json").read_text()))
    assert_one_line_error(
        invoke("trace", files["run"], "--model", files["model"], "--prompt", PROMPT, "--out", tmp_path / "h.json",
               "--target", "group:+ Senatezzq"), "' Senatezzq'", "exactly one")


def test_task_trace_writes_one_exact_graph_per_prompt(files, tmp_path):  # noqa: F811
    prompts = [PROMPT, "the state of the union is", "Fellow citizens of the Senate"]
    items = [TaskItem(prompt=prompts[0], target="group:+#5,#7;-#9", counterfactual=prompts[1]),
             TaskItem(prompt=prompts[1], target="diff:#3,#4", answer=" the"),
             TaskItem(prompt=prompts[2], target="group:+#11@2")]
    task = save_task(items, tmp_path / "toy.jsonl")
    out = tmp_path / "graphs"
    result = invoke("task", "trace", files["run"], task, "--model", files["model"], "--out-dir", out, "--limit", 2,
                    "--max-feature-nodes", 0, "--dtype", "float64")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["toy-0.json", "toy-1.json"]
    printed = dict(re.findall(r"^(\d+): .* = ([+-]\d+\.\d+)", result.output, flags=re.M))
    pds = dict(re.findall(r"^(\d+): .*PD=([+-]\d+\.\d+)", result.output, flags=re.M))
    for i, item in enumerate(items[:2]):
        graph = load_graph(out / f"toy-{i}.json")
        validate_graph_json(json.loads((out / f"toy-{i}.json").read_text()))
        assert graph.meta["task"] == {"name": "toy", "index": i, "target": item.target,
                                      "counterfactual": item.counterfactual, "answer": item.answer, "meta": {}}
        t, node = graph.targets[0], int(graph.target_nodes[0])
        lg = _hf_logits(files, item.prompt)
        assert float(graph.value[node]) == pytest.approx(float(t.value(lg)), abs=1e-4)  # the model's own logits
        rows, residual = graph.row_balance()
        assert residual.abs().max() < 1e-8
        assert float(printed[str(i)]) == pytest.approx(float(t.value(lg)), abs=2e-3)
        plus, minus = t.token_sets()
        p = lg[-1].softmax(-1)
        assert float(pds[str(i)]) == pytest.approx(float(p[plus].sum() - p[minus].sum()), abs=2e-3)
    assert "mean target value" in result.output
    again = invoke("task", "trace", files["run"], task, "--model", files["model"], "--out-dir", out)
    assert_one_line_error(again, "toy-0.json", "never replaces")
    assert sorted(p.name for p in out.iterdir()) == ["toy-0.json", "toy-1.json"]


def test_task_verify_checks_every_traced_graph(files, tmp_path):  # noqa: F811
    prompts = [PROMPT, "the state of the union is"]
    task = save_task([TaskItem(prompt=p, target="group:+#5,#7;-#9") for p in prompts], tmp_path / "toy.jsonl")
    out = tmp_path / "graphs"
    missing = invoke("task", "verify", files["run"], task, "--model", files["model"], "--graphs", out)
    assert_one_line_error(missing, "toy-0.json", "task trace")
    traced = invoke("task", "trace", files["run"], task, "--model", files["model"], "--out-dir", out,
                    "--max-feature-nodes", 0, "--dtype", "float64", "--limit", 1)
    assert traced.exit_code == 0, traced.output
    save_task([TaskItem(prompt=prompts[1], target="group:+#5,#7;-#9")], tmp_path / "second.jsonl")
    traced = invoke("task", "trace", files["run"], tmp_path / "second.jsonl", "--model", files["model"], "--out-dir",
                    tmp_path / "compact", "--max-feature-nodes", 0, "--dtype", "float64", "--format", "compact")
    assert traced.exit_code == 0, traced.output
    (tmp_path / "compact" / "second-0.safetensors").rename(out / "toy-1.safetensors")  # verify reads either format
    result = invoke("task", "verify", files["run"], task, "--model", files["model"], "--graphs", out, "--mean-tokens", 0,
                    "--out", tmp_path / "v.json")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "v.json").read_text())
    assert [Path(g["graph"]).name for g in report["graphs"]] == ["toy-0.json", "toy-1.safetensors"]
    for i, g in enumerate(report["graphs"]):
        # the exact graph: removing a source's write moves its target by the edge, in float64
        assert g["summary"]["edge_max_abs_error"] < 1e-8
        single = invoke("verify", Path(g["graph"]), "--run-dir", files["run"], "--model", files["model"],
                        "--mean-tokens", 0, "--out", tmp_path / f"single-{i}.json")
        assert single.exit_code == 0, single.output
        alone = json.loads((tmp_path / f"single-{i}.json").read_text())
        assert g["summary"]["faithfulness"] == pytest.approx(
            {k: v for k, v in alone["summary"]["faithfulness"].items()}, abs=1e-9)
    assert "mean F" in result.output
    assert_one_line_error(invoke("task", "verify", files["run"], task, "--model", files["model"], "--graphs", out,
                                 "--out", tmp_path / "v.json"), "v.json", "--force")
    assert "Faithfulness of circuits" in invoke("task", "benchmark", "--help").output  # the benchmark, in the group


def test_task_trace_checks_every_target_before_tracing(files, tmp_path):  # noqa: F811
    task = save_task([TaskItem(prompt=PROMPT, target="logit:#5"), TaskItem(prompt=PROMPT, target="group:+ Senatezzq")],
                     tmp_path / "bad.jsonl")
    out = tmp_path / "graphs"
    result = invoke("task", "trace", files["run"], task, "--model", files["model"], "--out-dir", out)
    assert_one_line_error(result, "task item 1", "exactly one")
    assert not any(out.glob("*.json"))
    bad = tmp_path / "broken.jsonl"
    bad.write_text('{"prompt": "a", "target": "logit:#1"}\n{"prompt": \n')
    assert_one_line_error(invoke("task", "trace", files["run"], bad, "--model", files["model"]), "line 2", "not JSON")
