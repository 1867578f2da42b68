"""Blind case studies (``transcoders blind``) on a real tiny setup: a tiny Llama with random
transcoders and a feature store made by ``transcoders features``. The draw is checked against the
store's own records (counts, de-embeddings), the evidence file against every example text the
store holds (none may leak), and a hypothesis's detection score against a balanced accuracy
computed here from the scoring windows."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from conftest import assert_one_line_error, tiny_llama_run

from transcoders.cli import main
from transcoders.features.blind import BlindError, pick, verdict
from transcoders.features.interpret import scoring_set
from transcoders.features.labels import token_key
from transcoders.features.store import FeatureStore

pytestmark = pytest.mark.usefixtures("single_thread")

FEATURE_ARGS = ["--tokens", "400", "--top-k", "5", "--n-samples", "6", "--before", "3", "--after", "2",
                "--random-every", "1", "--model-batch", "4", "--harvest-dtype", "float32", "--device", "cpu", "--quiet"]


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def setup(tmp_path_factory, single_thread):
    mp = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("blind")
    mp.setenv("TRANSCODERS_CACHE", str(root / "cache"))
    model_dir, run = tiny_llama_run(root)
    result = invoke("features", run, *FEATURE_ARGS)
    assert result.exit_code == 0, result.output
    yield {"run": run, "store": FeatureStore(run / "features")}
    mp.undo()


def test_pick_draws_distinct_features_that_fire_often_enough(setup):
    store = setup["store"]
    chosen = pick(store, 6, seed=3, min_count=3)
    assert len(set(chosen)) == 6
    assert all(store.feature(layer, f, examples=()).count >= 3 for layer, f in chosen)
    assert pick(store, 6, seed=3, min_count=3) == chosen and pick(store, 6, seed=4, min_count=3) != chosen
    with pytest.raises(BlindError, match="ask for at most"):
        pick(store, 10**6, seed=0)
    with pytest.raises(BlindError, match="has none of the layers"):
        pick(store, 1, seed=0, layers=[99])


def test_draw_shows_no_activation_text_and_reveal_scores_by_hand(setup, tmp_path):
    run, store = setup["run"], setup["store"]
    out = tmp_path / "blind"
    result = invoke("blind", run, "--out", out, "--n", 3, "--seed", 1, "--min-count", 10)
    assert result.exit_code == 0, result.output
    drawn = json.loads((out / "blind.json").read_text())
    evidence = (out / "evidence.md").read_text()
    for e in drawn["features"]:
        rec = store.feature(e["layer"], e["feature"])
        assert e["deembedding"]["top"] == [t for t, s in rec.deembedding if s > 0][:8]
        assert rec.count >= 10
        for ex in rec.top + rec.samples:  # no window the feature fires on appears in the evidence
            assert "".join(ex.tokens) not in evidence
        assert rec.label is None or rec.label not in json.dumps(drawn)
    template = [json.loads(x) for x in (out / "hypotheses.jsonl").read_text().splitlines()]
    assert [(h["layer"], h["feature"]) for h in template] == [(e["layer"], e["feature"]) for e in drawn["features"]]

    assert_one_line_error(invoke("blind", run, "--out", out, "--reveal"), "no hypothesis", "every")
    again = invoke("blind", run, "--out", out)
    assert_one_line_error(again, "blind.json", "--force")

    # each hypothesis names the token at the peak of the feature's strongest example
    for h in template:
        rec = store.feature(h["layer"], h["feature"])
        ex = rec.top[0]
        h["tokens"] = [ex.tokens[max(range(len(ex.acts)), key=lambda i: ex.acts[i])]]
        h["hypothesis"] = f"fires on {h['tokens'][0]!r}"
    (out / "hypotheses.jsonl").write_text("".join(json.dumps(h) + "\n" for h in template))
    result = invoke("blind", run, "--out", out, "--reveal")
    assert result.exit_code == 0, result.output
    revealed = json.loads((out / "revealed.json").read_text())
    checked = 0
    for h, r in zip(template, revealed["results"]):
        rec = store.feature(h["layer"], h["feature"])
        s = scoring_set(store, rec, seed=drawn["seed"])
        want = token_key(h["tokens"][0])
        hit = lambda ex, want=want: any(token_key(t) == want for t in ex.tokens)
        if not s.activating or not s.non_activating:  # a class is empty: the score is undefined
            assert r["scores"]["detection"] is None and r["verdict"] == "failure"
            continue
        tpr = sum(map(hit, s.activating)) / len(s.activating)
        tnr = sum(not hit(ex) for ex in s.non_activating) / len(s.non_activating)
        assert r["scores"]["detection"] == pytest.approx((tpr + tnr) / 2)
        checked += 1
        assert r["verdict"] == verdict(r["scores"]["detection"])
    assert checked >= 2  # most drawn features have both classes of windows
    t = revealed["tally"]
    assert sum(t.values()) == 3 and f"{t['success']} successes" in result.output
    assert "top examples" in (out / "reveal.md").read_text()
    assert_one_line_error(invoke("blind", run, "--out", out, "--reveal"), "reveal.md", "--force")


def test_verdict_thresholds():
    assert [verdict(x) for x in (0.9, 0.75, 0.7, 0.6, 0.59, None)] == [
        "success", "success", "partial", "partial", "failure", "failure"]
