"""The feature commands end to end on a tiny model: `features` fills the store, `feature` prints
its dashboard, `explain` writes scored explanations through a real OpenAI-compatible server on
loopback (resuming without a request), `export-features` writes circuit-tracer files; and under
torchrun the pass splits the text over 2 processes and merges to what one process records."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import assert_one_line_error
from test_features import tiny_run  # noqa: F401  (fixture)
from test_llm import build_chat_model

from transcoders.cli import main
from transcoders.features.scoring import balanced_accuracy
from transcoders.features.store import ACTS, FeatureStore

ARGS = ["--tokens", "200", "--top-k", "5", "--n-samples", "6", "--before", "3", "--after", "2", "--random-every", "1",
        "--model-batch", "4", "--harvest-dtype", "float32", "--device", "cpu", "--quiet"]


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def store_run(tiny_run, tmp_path_factory):  # noqa: F811
    run, model_dir = tiny_run
    out = tmp_path_factory.mktemp("cli") / "store"
    result = invoke("features", run, "--out", out, *ARGS)
    assert result.exit_code == 0, result.output
    assert "layer 2: " in result.output
    return run, model_dir, out


def test_feature_dashboard_shows_the_stores_record(store_run):
    run, _, out = store_run
    store = FeatureStore(out)
    live = int((store.tensor(store.keys[1], ACTS, "count") > 0).nonzero()[0])
    rec = store.feature(1, live)
    result = invoke("feature", run, f"1.{live}", "--store", out)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == f"L1 f{live}: {rec.label}"
    assert f"({rec.count:,})" in lines[1]
    top = next(i for i, ln in enumerate(lines) if ln.startswith("top activations"))
    assert float(lines[top + 1].split()[0]) == pytest.approx(rec.max, abs=5e-4)
    assert "[[" in lines[top + 1]  # the centre token is marked
    assert_one_line_error(invoke("feature", run, "7.0", "--store", out), "no layer 7")
    assert_one_line_error(invoke("feature", run, "1.999", "--store", out), "out of range")


def test_explain_through_a_real_local_server_scores_and_resumes(store_run):
    from transcoders.features.interpret import read_explanations
    from transcoders.features.server import create_app, running_server

    run, _, out = store_run
    lm = build_chat_model(context=2048)  # the run's tokenizer; a random 2-layer Llama as the explainer
    app = create_app(lm)
    store = FeatureStore(out)
    key = store.keys[2]
    live = (store.tensor(key, ACTS, "count") > 0).nonzero().flatten()[:3].tolist()
    with running_server(app) as url:
        args = ["explain", run, "--store", out, "--layer", "2", "--features", ",".join(map(str, live)),
                "--base-url", url, "--model", lm.name]
        result = invoke(*args)
        assert result.exit_code == 0, result.output
        n_requests = app.state.request_count
        assert n_requests > 0
        again = invoke(*args)
        assert again.exit_code == 0 and "0 new records" in again.output
        assert app.state.request_count == n_requests  # nothing redone, nothing asked again
    records = read_explanations(FeatureStore(out), key)
    kinds = {(r["index"], r["explainer"], r["judge"]) for r in records}
    for f in live:
        assert {(f, "token_label", "rule"), (f, "token_label", lm.name), (f, lm.name, lm.name)} <= kinds
    for r in records:
        for name in ("detection", "fuzzing"):
            v = r["scores"][name]
            assert v is None or 0.0 <= v <= 1.0
    # the rule judge's detection score, recomputed here from the examples themselves
    from transcoders.features.interpret import scoring_set, stored_label
    from transcoders.features.labels import token_key

    fresh = FeatureStore(out)
    for r in records:
        if r["judge"] != "rule":
            continue
        label = stored_label(fresh, key, r["index"])
        s = scoring_set(fresh, fresh.feature(2, r["index"]))
        words = {token_key(t) for t in label.tokens}
        hit = lambda e, w=words: 1.0 if any(token_key(t) in w for t in e.tokens) else 0.0
        preds = [hit(e) for e in s.activating] + [hit(e) for e in s.non_activating]
        truth = [1] * len(s.activating) + [0] * len(s.non_activating)
        want = balanced_accuracy(preds, truth)
        assert r["scores"]["detection"] == pytest.approx(want) if want == want else r["scores"]["detection"] is None


def test_export_features_writes_circuit_tracer_files_and_refuses_to_replace(store_run, tmp_path):
    run, _, out = store_run
    dest = tmp_path / "ct"
    result = invoke("export-features", run, dest, "--store", out, "--layers", "0", "--scan", "tiny")
    assert result.exit_code == 0, result.output
    files = sorted((dest / "tiny").glob("*.json"))
    n_live = int((FeatureStore(out).tensor(FeatureStore(out).keys[0], ACTS, "count") > 0).sum())
    assert len(files) == n_live
    first = json.loads(files[0].read_text())
    assert {"transcoder_id", "index", "examples_quantiles", "top_logits", "quantile_values"} <= set(first)
    before = files[0].read_bytes()
    assert_one_line_error(invoke("export-features", run, dest, "--store", out, "--layers", "0", "--scan", "tiny"),
                          "--force")
    assert files[0].read_bytes() == before


TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent))


def _failure(stderr: str) -> str:
    """The lines of a failed torchrun's stderr that say why (tracebacks, aborts), not its summary."""
    keep = [line for line in stderr.splitlines() if not line.startswith(("Loading", "Writing")) and line.strip()]
    return "\n".join(keep[:80]) + "\n...\n" + "\n".join(keep[-20:])


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun not installed next to this python")
def test_torchrun_two_processes_equal_one(tiny_run, tmp_path):  # noqa: F811
    run, _ = tiny_run
    one = tmp_path / "one"
    assert invoke("features", run, "--out", one, *ARGS).exit_code == 0
    two = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CI": "1"}
    cmd = [TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "transcoders.cli", "--threads", "1", "features",
           str(run), "--out", str(two), *ARGS]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, _failure(proc.stderr)
    a, b = FeatureStore(one), FeatureStore(two)
    assert a.keys == b.keys
    for key in a.keys:
        assert a.info(key)["n_tokens"] == b.info(key)["n_tokens"]
        from safetensors.torch import load_file

        ta = load_file(str(one / a.info(key)["folder"] / ACTS))
        tb = load_file(str(two / b.info(key)["folder"] / ACTS))
        assert set(ta) == set(tb)
        for name in ta:
            if ta[name].dtype.is_floating_point and name in ("sum", "quantiles", "cooc_top_jaccard"):
                assert torch.allclose(ta[name], tb[name], rtol=1e-6, equal_nan=True), name
            else:
                assert torch.equal(ta[name], tb[name]), name


@pytest.mark.slow
def test_smollm2_explains_and_judges_through_the_local_server(store_run, single_thread):
    """The default model behind our OpenAI-compatible server explains a feature and judges the
    explanation: real text comes back and every score is a number in range (or undefined)."""
    from transcoders.features.interpret import interpret
    from transcoders.features.llm import LLMClient
    from transcoders.features.server import running_server
    from transcoders.models.loading import load_model

    _, _, out = store_run
    store = FeatureStore(out)
    key = store.keys[0]
    live = int((store.tensor(key, ACTS, "count") > 0).nonzero()[0])
    lm = load_model()
    with running_server(lm) as url:
        client = LLMClient(url, lm.name)
        records = interpret(store, key, [live], client=client, explainer_name=lm.name, rule_scores=False,
                            n_activating=3, n_non_activating=3)
    mine = [r for r in records if r["explainer"] == lm.name]
    assert len(mine) == 1 and mine[0]["text"].strip()
    for r in records:
        assert r["judge"] == lm.name
        for name in ("detection", "detection_auroc", "fuzzing", "fuzzing_auroc"):
            assert r["scores"][name] is None or 0.0 <= r["scores"][name] <= 1.0
