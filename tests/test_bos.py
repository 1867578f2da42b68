"""The BOS policy per model: which models get a BOS token at the start of every context and
prompt, contexts built that way, the policy recorded by runs and graphs, mismatches refused,
and the clean-loss check that tells when the policy looks wrong."""

from __future__ import annotations

import json
import random

import pytest
import torch
from click.testing import CliRunner
from conftest import FAMILIES, N_LAYERS, assert_one_line_error, build_tiny_model, build_tiny_tokenizer
from test_cli import FAST, _document

from transcoders.cli import main
from transcoders.data.sources import Document
from transcoders.data.tokens import tokenize_documents
from transcoders.models.adapters import adapter_for
from transcoders.models.bos import BosPolicyError, check_model, check_run_policy, default_prepend_bos, resolve_prepend_bos

pytestmark = pytest.mark.usefixtures("single_thread")


def tokenizer(bos: str) -> object:
    """The tiny tokenizer with no BOS token (``"none"``), a BOS token it does not add itself
    (``"token"``, like SmolLM2's chat marker), or one it puts first itself (``"adds"``, like
    Gemma's and Llama 3's)."""
    from tokenizers import processors

    tok = build_tiny_tokenizer()
    if bos != "none":
        tok.add_special_tokens({"bos_token": "<bos>"})
    if bos == "adds":
        tok._tokenizer.post_processor = processors.TemplateProcessing(
            single="<bos> $A", special_tokens=[("<bos>", tok.bos_token_id)])
    return tok


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("bos", ["none", "token", "adds"])
def test_default_policy_per_family_and_tokenizer(family, bos):
    adapter = adapter_for(build_tiny_model(family))
    tok = tokenizer(bos)
    assert (tok("a").input_ids[0] == tok.bos_token_id) == (bos == "adds")  # the fixture is what it says
    expected = bos == "adds" or (bos == "token" and family == "gemma2")  # Gemma: always, if it has the token
    assert default_prepend_bos(adapter, tok) is expected
    assert resolve_prepend_bos(None, adapter, tok) is expected
    assert resolve_prepend_bos(False, adapter, tok) is False
    if bos == "none":
        with pytest.raises(BosPolicyError, match="no BOS token"):
            resolve_prepend_bos(True, adapter, tok)
    else:
        assert resolve_prepend_bos(True, adapter, tok) is True


def test_contexts_with_bos_hold_the_same_text_stream_after_the_bos_column():
    tok = tokenizer("token")
    rng = random.Random(0)
    docs = [Document(f"d{i}", _document(rng, 6)) for i in range(6)]
    plain = tokenize_documents(docs, tok, 16)
    with_bos = tokenize_documents(docs, tok, 16, bos_id=tok.bos_token_id)
    assert with_bos.shape[1] == 16 and (with_bos[:, 0] == tok.bos_token_id).all()
    stream = with_bos[:, 1:].flatten()
    assert torch.equal(stream, plain.flatten()[: stream.numel()])  # nothing skipped, nothing repeated
    assert not (with_bos[:, 1:] == tok.bos_token_id).any()
    capped = tokenize_documents(docs, tok, 16, max_tokens=40, bos_id=tok.bos_token_id)
    assert capped.shape == (2, 16) and torch.equal(capped, with_bos[:2])


def test_check_run_policy():
    assert check_run_policy(True, None, "run") is True
    assert check_run_policy(None, False, "run") is False
    assert check_run_policy(None, None, "run") is None
    with pytest.raises(BosPolicyError, match="trained with a BOS token.*--no-prepend-bos"):
        check_run_policy(True, False, "the run r")
    with pytest.raises(BosPolicyError, match="trained without a BOS token.*--prepend-bos"):
        check_run_policy(False, True, "the run r")


def test_model_check_measures_both_policies_on_the_same_tokens():
    tok = tokenizer("token")
    model = build_tiny_model("llama")
    model.resize_token_embeddings(len(tok))
    check = check_model(model, tok, prepend_bos=False, n_tokens=96, ctx_len=32)
    from transcoders.data.sources import load_documents

    text = tokenize_documents(load_documents(None)[:4], tok, 32, max_tokens=96)
    assert check.n_tokens == text[:, 2:].numel() == 90
    with torch.no_grad():  # independent: HF's own shifted loss on the same predicted tokens
        labels = text.clone()
        labels[:, :2] = -100
        no_bos = float(model(text, labels=labels).loss)
        with_bos = torch.cat([torch.full_like(text[:, :1], tok.bos_token_id), text], 1)
        labels = torch.cat([torch.full_like(text[:, :1], -100), labels], 1)
        bos = float(model(with_bos, labels=labels).loss)
    assert check.ce == pytest.approx(no_bos, rel=1e-5) and check.ce_other == pytest.approx(bos, rel=1e-5)
    flipped = check_model(model, tok, prepend_bos=True, n_tokens=96, ctx_len=32)
    assert flipped.ce == pytest.approx(bos, rel=1e-5) and flipped.ce_other == pytest.approx(no_bos, rel=1e-5)
    # exactly one of the two is warned about when the gap is large (here: forced by the threshold)
    import transcoders.models.bos as bos_module

    gap = abs(no_bos - bos)
    worse = check if no_bos > bos else flipped
    better = flipped if worse is check else check
    original = bos_module.SUSPICIOUS_GAIN
    try:
        bos_module.SUSPICIOUS_GAIN = gap / 2
        warned = check_model(model, tok, prepend_bos=worse.prepend_bos, n_tokens=96, ctx_len=32)
        quiet = check_model(model, tok, prepend_bos=better.prepend_bos, n_tokens=96, ctx_len=32)
    finally:
        bos_module.SUSPICIOUS_GAIN = original
    assert warned.warning and ("--no-prepend-bos" if worse.prepend_bos else "--prepend-bos") in warned.warning
    assert quiet.warning is None or "implausible" in quiet.warning


# ---------------------------------------------------------------- end to end on a tiny Gemma


@pytest.fixture(scope="module")
def gemma_files(tmp_path_factory, single_thread):
    """A tiny Gemma 2 folder whose tokenizer has a BOS token it does not add itself (the
    policy comes from the family), and a training text."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    root = tmp_path_factory.mktemp("bos_gemma")
    tok = tokenizer("token")
    torch.manual_seed(0)
    cfg = Gemma2Config(num_hidden_layers=N_LAYERS, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                       intermediate_size=48, vocab_size=len(tok), max_position_embeddings=64,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    Gemma2ForCausalLM(cfg).save_pretrained(root / "tiny-gemma")
    tok.save_pretrained(root / "tiny-gemma")
    rng = random.Random(0)
    train = root / "train.jsonl"
    train.write_text("\n".join(json.dumps({"text": _document(rng, 8)}) for _ in range(12)) + "\n")
    return {"model": root / "tiny-gemma", "train": train, "bos_id": tok.bos_token_id}


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TRANSCODERS_CACHE", str(tmp_path / "cache"))


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def gemma_run(gemma_files, tmp_path_factory):
    run = tmp_path_factory.mktemp("gemma_run") / "run"
    result = invoke("train", "--model", gemma_files["model"], "--data", gemma_files["train"], "--run-dir", run,
                    "--layers", "all", *FAST, "--eval-tokens", "64")
    assert result.exit_code == 0, result.output
    return run, result


def test_a_gemma_run_trains_with_bos_first_and_records_it(gemma_files, gemma_run, monkeypatch, tmp_path):
    run, result = gemma_run
    assert json.loads((run / "train_config.json").read_text())["prepend_bos"] is True
    assert "model check: clean CE" in result.stdout and "with BOS" in result.stdout
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["prepend_bos"] is True and metrics["model_check"]["prepend_bos"] is True
    assert metrics["eval_tokens"] == 60  # 4 contexts of 16, less their BOS positions
    # the contexts the harvester sees start with BOS: record them
    import transcoders.data.activations as acts

    seen = []
    real = acts.harvest
    monkeypatch.setattr(acts, "harvest", lambda adapter, ids, layers: seen.append(ids.clone()) or real(adapter, ids, layers))
    again = invoke("train", "--model", gemma_files["model"], "--data", gemma_files["train"], "--run-dir", tmp_path / "r",
                   "--layers", "1", *FAST, "--eval-tokens", "0")
    assert again.exit_code == 0, again.output
    assert seen and all((ids[:, 0] == gemma_files["bos_id"]).all() for ids in seen)
    assert not any((ids[:, 1:] == gemma_files["bos_id"]).any() for ids in seen)


def test_evaluating_a_bos_run_without_bos_is_refused(gemma_run):
    run, _ = gemma_run
    assert_one_line_error(invoke("evaluate", run, "--no-prepend-bos", "--quiet"), "trained with a BOS token",
                          "--no-prepend-bos")


def test_trace_follows_the_runs_policy_and_records_it(gemma_files, gemma_run, tmp_path):
    from transcoders.circuits.export import load_graph

    run, _ = gemma_run
    out = tmp_path / "g.json"
    result = invoke("trace", run, "--model", gemma_files["model"], "--prompt", "The quick brown fox", "--out", out,
                    "--max-feature-nodes", "16")
    assert result.exit_code == 0, result.output
    graph = load_graph(out)
    assert graph.tokens[0] == gemma_files["bos_id"] and graph.meta["prepend_bos"] is True
    assert graph.meta["constant_positions"] == [0]
    assert_one_line_error(invoke("trace", run, "--model", gemma_files["model"], "--prompt", "The quick brown fox",
                                 "--out", tmp_path / "h.json", "--no-prepend-bos"), "trained with a BOS token")
