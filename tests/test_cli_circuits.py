"""End-to-end tests of the circuit commands of the ``transcoders`` CLI (``trace``, ``paths``,
``intervene``, ``verify``) on a tiny Llama saved to disk with the tiny tokenizer and a run folder
holding a random top-k transcoder for every layer: graphs that load and validate, targets that
match the model, exact frozen-model effects, and one-line errors for bad input."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from click.testing import CliRunner
from conftest import N_LAYERS, assert_one_line_error, build_tiny_tokenizer, save_random_transcoders

from transcoders.circuits.export import load_graph, validate_graph_json
from transcoders.circuits.graph import FEATURE, TARGET
from transcoders.cli import main

pytestmark = pytest.mark.usefixtures("single_thread")

D = 32
PROMPT = "The quick brown fox jumps over the lazy dog"
EDGE_LINE = re.compile(r"max \|measured - predicted\| = (\S+) ")


# ---------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def files(tmp_path_factory, single_thread):
    """A tiny Llama folder (3 layers, d_model 32, context 64) and a run folder with a top-k
    transcoder (d_sae 64, k 4, small random biases) for each of its layers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("cli_circuits")
    tok = build_tiny_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(num_hidden_layers=N_LAYERS, hidden_size=D, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=48, vocab_size=len(tok), max_position_embeddings=64,
                      eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)
    model_dir = root / "tiny-llama"
    hf = LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)

    run = save_random_transcoders(root / "run", str(model_dir))

    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = hf(ids).logits[0, -1].double()
        generated = hf.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=tok.eos_token_id)[0, ids.shape[1]:]
    return {"model": model_dir, "run": run, "root": root, "n_tokens": ids.shape[1], "logits": logits,
            "generated": tok.decode(generated)}


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TRANSCODERS_CACHE", str(tmp_path / "cache"))


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def trace(files, out, *extra):
    result = invoke("trace", files["run"], "--model", files["model"], "--prompt", PROMPT, "--out", out, *extra)
    assert result.exit_code == 0, result.output
    return result


def intervene(files, *extra):
    return invoke("intervene", files["run"], "--model", files["model"], "--prompt", PROMPT, *extra)


def printed_targets(stdout: str) -> list[tuple[int, float]]:
    """``(pos, value)`` of each target on the ``targets`` line of ``trace``."""
    line = next(line for line in stdout.splitlines() if line.startswith("targets (most probable first): "))
    return [(int(p), float(v)) for p, v in re.findall(r"@(\d+) = (-?\d+\.\d+) \(p=", line)]


def printed_chains(stdout: str, section: str = "paths (") -> list[tuple[list[str], float]]:
    """``(node labels target first, weight)`` of every path line (``a <- b <- c  (+w nats)``) in
    the section whose heading starts with ``section``."""
    out, inside = [], False
    for line in stdout.splitlines():
        if not line.startswith(" "):
            inside = line.startswith(section)
            continue
        if not inside or not line.startswith("  ") or line.startswith("   ") or "<-" not in line:
            continue  # not a path (e.g. trace's indented per-head notes under a path)
        chain, sep, weight = line.strip().rpartition("  (")
        assert sep and weight.endswith(" nats)"), line
        out.append((chain.split(" <- "), float(weight.split()[0])))
    return out


def centred(logits: torch.Tensor, token) -> torch.Tensor:
    return logits[token] - logits.mean()


def intervention_rows(stdout: str) -> list[tuple[str, float, float, float]]:
    """``(target, before, after, change)`` rows of the table ``intervene`` prints."""
    lines = stdout.splitlines()
    assert lines[0].split() == ["target", "before", "after", "change"], stdout
    rows = []
    for line in lines[1:]:
        if line.startswith("generated"):
            break
        label, b, a, c = line.rsplit(maxsplit=3)
        rows.append((label, float(b), float(a), float(c)))
    return rows


@pytest.fixture(scope="module")
def default_graph(files):
    """``trace`` with default targets and settings (float32)."""
    out = files["root"] / "default.json"
    result = trace(files, out)
    return out, result


@pytest.fixture(scope="module")
def exact_graph(files):
    """``trace`` in float64 with one explicit target, the logit of token #5."""
    out = files["root"] / "exact.json"
    result = trace(files, out, "--dtype", "float64", "--target", "logit:#5")
    return out, result


# ---------------------------------------------------------------- trace


def test_trace_writes_a_valid_graph_whose_targets_are_the_top_logits(files, default_graph):
    out, result = default_graph
    assert f"wrote {out}" in result.stdout
    obj = json.loads(out.read_text())
    validate_graph_json(obj)
    graph = load_graph(out)
    T = files["n_tokens"]
    assert len(graph.tokens) == T and result.stdout.startswith(f"prompt: {T} tokens;")
    assert graph.meta["prompt"] == PROMPT and graph.meta["run_dir"] == str(files["run"])

    # top_logit_targets' rule, recomputed from the Hugging Face model's own logits
    probs = files["logits"].softmax(-1)
    p, ids = probs.sort(descending=True)
    n = min(10, int((p.cumsum(0) < 0.95).sum()) + 1)
    assert [t.token for t in graph.targets] == ids[:n].tolist()
    assert all(t.kind == "logit" and t.pos == T - 1 for t in graph.targets)
    assert [t.weight for t in graph.targets] == pytest.approx(p[:n].tolist(), rel=1e-5)
    shown = printed_targets(result.stdout)
    assert [pos for pos, _ in shown] == [T - 1] * n
    assert [v for _, v in shown] == pytest.approx(centred(files["logits"], ids[:n]).tolist(), abs=2e-3)

    # every row is complete: value = sum(incoming) + const + dropped
    rows = (~graph.value.isnan()).nonzero().flatten()
    assert (graph.kind[graph.target_nodes] == TARGET).all() and rows.numel() > n
    _, residual = graph.row_balance()
    scale = graph.value[rows].abs().max()
    assert (residual.abs() / scale).max() < 1e-4
    # with the default budget every active feature is a node, so nothing is dropped
    assert int((graph.kind == FEATURE).sum()) == graph.meta["n_active_features"]
    assert graph.dropped[rows].abs().max() == 0

    assert "paths (exact top 5" in result.stdout
    chains = printed_chains(result.stdout)
    assert 1 <= len(chains) <= 5 and all(labels[0].startswith("logit(") for labels, _ in chains)


def test_trace_explicit_target_makes_exactly_that_target(files, exact_graph):
    out, result = exact_graph
    graph = load_graph(out)
    assert len(graph.targets) == 1 and len(graph.target_nodes) == 1
    t = graph.targets[0]
    assert (t.kind, t.token, t.pos) == ("logit", 5, files["n_tokens"] - 1)
    assert graph.meta["dtype"] == "float64"
    [(pos, value)] = printed_targets(result.stdout)
    assert pos == files["n_tokens"] - 1
    assert value == pytest.approx(float(centred(files["logits"], 5)), abs=2e-3)
    node = int(graph.target_nodes[0])
    _, w = graph.incoming(node)
    total = float(w.double().sum() + graph.const[node] + graph.dropped[node])
    assert total == pytest.approx(float(graph.value[node]), abs=1e-9)


def test_trace_feature_budget_gives_exactly_that_many_feature_nodes(files, tmp_path):
    out = tmp_path / "g.json"
    result = trace(files, out, "--max-feature-nodes", "10", "--target", "logit:#7@3")
    graph = load_graph(out)
    assert int((graph.kind == FEATURE).sum()) == 10 and graph.meta["feature_rows"] == 10
    assert graph.meta["n_active_features"] > 10
    assert "; 10 feature rows" in result.stdout.splitlines()[0]
    assert [(t.token, t.pos) for t in graph.targets] == [(7, 3)]
    rows = (~graph.value.isnan()).nonzero().flatten()
    assert rows.numel() == 11
    _, residual = graph.row_balance()
    assert residual.abs().max() < 1e-4 * graph.value[rows].abs().max()
    assert graph.dropped[rows].abs().max() > 0  # the left-out features show up as dropped


# ---------------------------------------------------------------- paths


def test_paths_prints_n_chains_strongest_first(default_graph):
    out, _ = default_graph
    result = invoke("paths", out, "-n", "4")
    assert result.exit_code == 0, result.output
    chains = printed_chains(result.stdout)
    assert len(chains) == 4
    weights = [abs(w) for _, w in chains]
    assert weights == sorted(weights, reverse=True) and weights[0] > 0
    for labels, _ in chains:
        assert len(labels) >= 2 and labels[0].startswith("logit(")


def test_paths_greedy(default_graph):
    out, _ = default_graph
    result = invoke("paths", out, "-n", "3", "--greedy", "--beam", "3", "--depth", "3")
    assert result.exit_code == 0, result.output
    chains = printed_chains(result.stdout)
    assert 1 <= len(chains) <= 3
    weights = [abs(w) for _, w in chains]
    assert weights == sorted(weights, reverse=True)
    assert all(2 <= len(labels) <= 4 and labels[0].startswith("logit(") for labels, _ in chains)


def test_paths_sources_filter_starts_paths_there(default_graph):
    out, _ = default_graph
    result = invoke("paths", out, "-n", "5", "--sources", "embedding")
    assert result.exit_code == 0, result.output
    chains = printed_chains(result.stdout)
    assert len(chains) == 5
    assert all(labels[-1].startswith("emb ") and len(labels) >= 2 for labels, _ in chains)


def test_paths_layer_filter_keeps_only_that_layer_inside(default_graph):
    out, _ = default_graph
    result = invoke("paths", out, "-n", "10", "--layers", "1")
    assert result.exit_code == 0, result.output
    chains = printed_chains(result.stdout)
    assert len(chains) == 10
    inner = [label for labels, _ in chains for label in labels[1:-1]]
    assert inner, "expected some paths through layer-1 features"
    assert all(label.startswith("L1 f") for label in inner), inner
    # exact search: the filtered top paths are the unfiltered ones that pass the filter, in order
    unfiltered = printed_chains(invoke("paths", out, "-n", "1500").stdout)
    assert any(label.startswith("L0 f") for labels, _ in unfiltered for label in labels[1:-1])
    passing = [c for c in unfiltered if all(label.startswith("L1 f") for label in c[0][1:-1])]
    assert len(passing) >= 10 and passing[:10] == chains


# ---------------------------------------------------------------- intervene


@pytest.mark.parametrize("mode", ["free", "frozen", "linear"])
def test_intervene_scale_one_changes_nothing(files, mode):
    result = intervene(files, "--target", "logit:#5", "--target", "logit:#9@2", "--edit", "1.3=scale:1",
                       "--edit", "0.10@1,2=scale:1", "--mode", mode)
    assert result.exit_code == 0, result.output
    rows = intervention_rows(result.stdout)
    assert len(rows) == 2
    assert rows[0][0].endswith(f"@{files['n_tokens'] - 1}") and rows[1][0].endswith("@2")
    for _, before, after, change in rows:
        assert before == after and change == 0.0
    assert rows[0][1] == pytest.approx(float(centred(files["logits"], 5)), abs=2e-3)


def test_intervene_frozen_ablation_changes_the_target_by_minus_its_edge(files, exact_graph):
    out, _ = exact_graph
    graph = load_graph(out)
    last = files["n_tokens"] - 1
    node = int(graph.target_nodes[0])
    src, w = graph.incoming(node)
    feat = (graph.kind[src] == FEATURE) & (graph.pos[src] == last)
    assert feat.any()
    i = int(w.abs().where(feat, torch.zeros_like(w)).argmax())
    f, weight = int(src[i]), float(w[i])
    assert abs(weight) > 1e-3
    layer, feature = int(graph.layer[f]), int(graph.feature[f])
    result = intervene(files, "--target", "logit:#5", "--edit", f"{layer}.{feature}@{last}=ablate", "--mode", "frozen")
    assert result.exit_code == 0, result.output
    [(_, before, after, change)] = intervention_rows(result.stdout)
    assert before == pytest.approx(float(graph.value[node]), abs=6e-5)
    assert change == pytest.approx(-weight, abs=6e-5)

    # with every position ablated, the frozen change is minus the sum of that feature's edges
    here = (graph.kind[src] == FEATURE) & (graph.layer[src] == layer) & (graph.feature[src] == feature)
    result = intervene(files, "--target", "logit:#5", "--edit", f"{layer}.{feature}=ablate", "--mode", "frozen")
    assert result.exit_code == 0, result.output
    [(_, _, _, change_all)] = intervention_rows(result.stdout)
    assert change_all == pytest.approx(-float(w[here].sum()), abs=6e-5)


def test_intervene_generate_prints_both_generations(files):
    result = intervene(files, "--edit", "2.1=scale:1", "--generate", "3")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    base = [line for line in lines if line.startswith("generated (no edit): ")]
    edited = [line for line in lines if line.startswith("generated (edited):  ")]
    assert len(base) == 1 and len(edited) == 1
    # the unedited continuation is the model's own greedy one; scale:1 leaves it unchanged
    assert files["generated"]
    assert base[0].endswith(repr(files["generated"]))
    assert edited[0].endswith(repr(files["generated"]))
    assert len(intervention_rows(result.stdout)) >= 1  # default targets: the top logits


def _saved_model_and_layer2(files):
    """The saved tiny Llama and tokenizer, loaded with transformers alone, and layer 2's
    transcoder, with the MLP input of every prompt position of layer 2."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from transcoders.coders.io import load_coder

    model = LlamaForCausalLM.from_pretrained(files["model"]).eval()
    tok = AutoTokenizer.from_pretrained(files["model"])
    coder = load_coder(files["run"] / "layers.2.mlp")
    ids = tok(PROMPT, return_tensors="pt").input_ids
    seen = {}
    handle = model.model.layers[2].mlp.register_forward_pre_hook(lambda _m, args: seen.__setitem__("x", args[0][0]))
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    handle.remove()
    return model, tok, coder, ids, seen["x"], logits


def _greedy_clamped(model, coder, ids, feature: int, value: float, n_new: int, first: int | None) -> list[int]:
    """Greedy decoding, rerunning the whole sequence each step, with ``(value - a) W_dec[feature]``
    added to layer 2's MLP output at positions ``>= first`` (``a``: the feature's activation on
    that pass's MLP input; ``first=None``: no edit)."""
    def hook(module, args, out):
        a = coder.encode(args[0])[..., feature]
        where = (torch.arange(a.shape[-1]) >= first).to(a.dtype)
        return out + ((value - a) * where)[..., None] * coder.W_dec[feature]

    seq, new = ids, []
    handle = model.model.layers[2].mlp.register_forward_hook(hook if first is not None else lambda *_args: None)
    try:
        for _ in range(n_new):
            with torch.no_grad():
                nxt = int(model(input_ids=seq).logits[0, -1].argmax())
            new.append(nxt)
            seq = torch.cat([seq, torch.tensor([[nxt]])], dim=1)
    finally:
        handle.remove()
    return new


def test_intervene_free_clamp_moves_the_logit_as_the_hooked_model_does(files):
    """Free mode, a last-layer clamp at the last position: the logit there moves exactly as the
    real model's does when ``(v - a) W_dec[f]`` is added to layer 2's MLP output at that position
    (nothing but the final norm lies between that MLP and the logits); other positions do not move."""
    model, tok, coder, ids, x, clean = _saved_model_and_layer2(files)
    T, v = files["n_tokens"], 0.35  # small enough that the final norm does not saturate
    acts = coder.encode(x).detach()
    f = int(acts[-1].argmax())
    delta = torch.zeros(T, D)
    delta[-1] = (v - acts[-1, f]) * coder.W_dec[f].detach()
    handle = model.model.layers[2].mlp.register_forward_hook(lambda _m, _args, out: out + delta)
    with torch.no_grad():
        hooked = model(input_ids=ids).logits[0].double()
    handle.remove()
    expected = float(centred(hooked[-1], 5) - centred(clean[-1], 5))  # logit:#5 is the centred logit
    assert abs(expected) > 0.02

    result = intervene(files, "--target", "logit:#5", "--target", "logit:#9@3", "--edit", f"2.{f}@-1=clamp:{v}",
                       "--mode", "free")
    assert result.exit_code == 0, result.output
    (_, before, after, change), (_, _, _, change_other) = intervention_rows(result.stdout)
    assert before == pytest.approx(float(centred(clean[-1], 5)), abs=2e-4)
    assert change == pytest.approx(expected, abs=2e-4)
    assert change_other == 0.0


def test_intervene_clamp_generate_matches_a_hooked_greedy_generation(files):
    """``--generate`` continues the prompt greedily without and with the edit; the edit applies to
    generated positions only. Both continuations equal greedy decoding of the saved model run
    here with transformers and our own hook, and the clamp changes the continuation."""
    model, tok, coder, ids, _, _ = _saved_model_and_layer2(files)
    n, f, v = 4, 1, 50.0
    result = intervene(files, "--edit", f"2.{f}=clamp:{v:g}", "--generate", str(n), "--target", "logit:#5")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    [base] = [line for line in lines if line.startswith("generated (no edit): ")]
    [edited] = [line for line in lines if line.startswith("generated (edited):  ")]
    plain = _greedy_clamped(model, coder, ids, f, v, n, first=None)
    clamped = _greedy_clamped(model, coder, ids, f, v, n, first=ids.shape[1])
    assert tok.decode(plain[:3]) == files["generated"]  # the fixture's generate() agrees with our loop
    assert base == "generated (no edit): " + repr(tok.decode(plain))
    assert edited == "generated (edited):  " + repr(tok.decode(clamped))
    assert clamped != plain and clamped[0] == plain[0]  # the first new token comes from the unedited prompt


# ---------------------------------------------------------------- verify


def test_verify_edges_are_exact_and_reports_faithfulness(files, exact_graph, tmp_path):
    out, _ = exact_graph
    report_path = tmp_path / "report.json"
    result = invoke("verify", out, "--out", report_path)
    assert result.exit_code == 0, result.output
    err = float(EDGE_LINE.search(result.stdout).group(1))
    assert err < 1e-6
    report = json.loads(report_path.read_text())
    assert report["summary"]["edge_max_abs_error"] < 1e-6
    assert len(report["edges"]) == 20
    faith_line = next(line for line in result.stdout.splitlines() if line.startswith("faithfulness"))
    ks = [int(k) for k in re.findall(r"k=(\d+): -?\d+\.\d+", faith_line)]
    assert ks and ks == [f["k"] for f in report["faithfulness"]]
    assert ks == sorted(ks) and ks[0] == 1
    assert f"wrote {report_path}" in result.stdout


def test_verify_with_explicit_run_dir_and_sizes(files, exact_graph):
    out, _ = exact_graph
    result = invoke("verify", out, "--run-dir", files["run"], "--model", files["model"], "--sizes", "1,3",
                    "--top-edges", "5", "--top-nodes", "2")
    assert result.exit_code == 0, result.output
    assert float(EDGE_LINE.search(result.stdout).group(1)) < 1e-6
    assert ", 5 strongest)" in result.stdout and "(2 most influential" in result.stdout
    assert re.search(r"k=1: -?\d+\.\d+, k=3: -?\d+\.\d+$", result.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- errors


def test_trace_missing_run_folder_is_one_line_error(files, tmp_path):
    missing = tmp_path / "nowhere"
    result = invoke("trace", missing, "--model", files["model"], "--prompt", PROMPT, "--out", tmp_path / "g.json")
    assert_one_line_error(result, str(missing), "does not exist")
    assert not (tmp_path / "g.json").exists()


def test_trace_max_memory_below_what_the_process_holds_is_one_line_error(files, tmp_path):
    result = invoke("trace", files["run"], "--model", files["model"], "--prompt", PROMPT, "--out", tmp_path / "g.json",
                    "--max-memory", "0.001")
    assert_one_line_error(result, "max_memory 0.00 GiB", "raise --max-memory")
    assert not (tmp_path / "g.json").exists()
    result = trace(files, tmp_path / "g.json", "--max-memory", "1000", "--max-feature-nodes", "20")
    assert "stopped at" not in result.output
    graph = load_graph(tmp_path / "g.json")
    assert graph.meta["feature_rows"] == 20 and graph.meta["memory_limited"] is False


def test_trace_run_folder_missing_a_layer_is_one_line_error(files, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(files["run"], copy)
    shutil.rmtree(copy / "layers.1.mlp")
    result = invoke("trace", copy, "--model", files["model"], "--prompt", PROMPT, "--out", tmp_path / "g.json")
    assert_one_line_error(result, "no transcoder for layers [1]")
    result = intervene(files | {"run": copy}, "--edit", "0.1=ablate")
    assert_one_line_error(result, "no transcoder for layers [1]")


@pytest.mark.parametrize("spec, needle", [
    ("logit:zqxv jumps", "a logit target needs exactly one"),
    ("feature:x", "feature:LAYER.FEATURE"),
    ("feature:7.1", "layer 7 is out of range"),
    ("logit:#100000", "outside the vocabulary"),
    ("logit:#5@x", "bad position"),
    ("nonsense:1", "unknown target kind"),
])
def test_trace_malformed_target_is_one_line_error(files, tmp_path, spec, needle):
    result = invoke("trace", files["run"], "--model", files["model"], "--prompt", PROMPT, "--target", spec,
                    "--out", tmp_path / "g.json")
    assert_one_line_error(result, needle)


def test_trace_target_position_outside_prompt_is_one_line_error(files, tmp_path):
    result = invoke("trace", files["run"], "--model", files["model"], "--prompt", PROMPT, "--target", "logit:#5@99",
                    "--out", tmp_path / "g.json")
    assert_one_line_error(result, "target position 99", f"{files['n_tokens']}-token prompt")


def test_trace_prompt_longer_than_context_is_one_line_error(files, tmp_path):
    long_prompt = " ".join(f"zq{i}x" for i in range(80))
    result = invoke("trace", files["run"], "--model", files["model"], "--prompt", long_prompt, "--out", tmp_path / "g.json")
    assert_one_line_error(result, "the model's context is 64")
    result = invoke("intervene", files["run"], "--model", files["model"], "--prompt", long_prompt, "--edit", "0.1=ablate")
    assert_one_line_error(result, "the model's context is 64")


@pytest.mark.parametrize("spec, needle", [
    ("0.1", "needs '='"),
    ("0.1=explode", "mode must be ablate"),
    ("0.1=clamp:abc", "is not a number"),
    ("0.1=clamp", "clamp needs a number"),
    ("x.1=ablate", "edit 'x.1=ablate': write LAYER.FEATURE"),
    ("9.1=ablate", "layer 9 is out of range"),
    ("0.64=ablate", "feature 64 is out of range"),
    ("0.1@99=ablate", "a position is outside the {n_tokens}-token prompt"),
])
def test_intervene_malformed_edit_is_one_line_error(files, spec, needle):
    assert_one_line_error(intervene(files, "--edit", spec), needle.format(n_tokens=files["n_tokens"]))


@pytest.mark.parametrize("command", ["paths", "verify"])
def test_missing_or_corrupt_graph_file_is_one_line_error(files, tmp_path, command):
    missing = tmp_path / "missing.json"
    assert_one_line_error(invoke(command, missing), "no graph file at", str(missing))
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text('{"schema": "transcoders.graph/1", "transcoders": {')
    assert_one_line_error(invoke(command, corrupt), "is not valid JSON", str(corrupt))
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"nodes": [], "links": []}))
    assert_one_line_error(invoke(command, other), "no 'schema' field")


def test_paths_unknown_kind_is_one_line_error(default_graph):
    out, _ = default_graph
    assert_one_line_error(invoke("paths", out, "--kinds", "feature,neuron"), "unknown node kinds")


def test_empty_prompt_is_one_line_error(files, tmp_path):
    result = invoke("trace", files["run"], "--model", files["model"], "--prompt", "", "--out", tmp_path / "g.json")
    assert_one_line_error(result, "the prompt is empty")


@pytest.mark.parametrize("mode", ["free", "frozen"])
def test_intervene_target_position_outside_prompt_is_one_line_error(files, mode):
    result = intervene(files, "--edit", "0.1=ablate", "--target", "logit:#5@99", "--mode", mode)
    assert_one_line_error(result, "target position 99", f"{files['n_tokens']}-token prompt")


def test_verify_graph_without_run_dir_is_one_line_error(exact_graph, tmp_path):
    out, _ = exact_graph
    obj = json.loads(out.read_text())
    del obj["transcoders"]["meta"]["run_dir"]
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps(obj))
    assert_one_line_error(invoke("verify", bare), "pass --run-dir")


def test_feature_prints_deembedding_logit_effects_and_pullback_from_weights(files):
    from transcoders.circuits import weights as W
    from transcoders.coders.io import load_coder
    from transcoders.models.loading import load_model

    result = invoke("feature", files["run"], "2.7", "--model", files["model"], "-k", "3", "--head", "1.2")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    titles = [ln for ln in lines if not ln.startswith("  ")]
    assert len(titles) == 4 and "de-embedding" in titles[0] and "head 1.2" in titles[1]
    assert "logits" in titles[2] and "layer-1 features" in titles[3]
    # The printed pullback equals the library's (same top feature and score).
    loaded = load_model(str(files["model"]))
    coders = {layer: load_coder(files["run"] / f"layers.{layer}.mlp") for layer in (1, 2)}
    top = W.pullback(coders, 2, 7, 1, loaded.adapter, k=3)
    first = lines[lines.index(titles[3]) + 1].split()
    assert first[0] == "+" and first[1] == f"L1/{int(top.top_ids[0])}"
    assert float(first[2]) == pytest.approx(float(top.top_scores[0]), abs=1e-4)
    # Bad specs are one-line errors.
    assert_one_line_error(invoke("feature", files["run"], "2x7", "--model", files["model"]),
                          "feature '2x7' must read LAYER.FEATURE")
    assert_one_line_error(invoke("feature", files["run"], "2.7", "--model", files["model"], "--head", "9"),
                          "--head '9' must read ATTN_LAYER.HEAD")


def test_trace_pruned_out_is_a_smaller_valid_graph_that_verify_accepts(files, tmp_path):
    from transcoders.circuits.export import load_graph

    trace(files, tmp_path / "g.json", "--pruned-out", tmp_path / "small.json", "--node-threshold", "0.5")
    full, small = load_graph(tmp_path / "g.json"), load_graph(tmp_path / "small.json")
    assert small.n_nodes < full.n_nodes and small.n_edges < full.n_edges
    assert small.meta["pruned"]["node_threshold"] == 0.5 and small.meta["run_dir"] == full.meta["run_dir"]
    rows, residual = small.row_balance()
    torch.testing.assert_close(small.value[rows] - residual, small.value[rows], rtol=1e-5, atol=1e-5)
    result = invoke("verify", tmp_path / "small.json", "--top-nodes", "2", "--sizes", "1,2", "--mean-tokens", "0")
    assert result.exit_code == 0, result.output
