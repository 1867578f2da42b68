"""Tests for the ``transcoders`` command line (click's CliRunner) on a tiny Llama saved to disk
with the tiny tokenizer: successful train / evaluate runs and one-line errors for bad input."""

from __future__ import annotations

import json
import random

import pytest
import torch
from click.testing import CliRunner
from conftest import N_LAYERS, assert_one_line_error, build_tiny_tokenizer, write_texts

from transcoders.cli import main

pytestmark = pytest.mark.usefixtures("single_thread")

WORDS = ("the state of union is strong citizens senate house representatives nation people congress "
         "law year work peace war trade people country government public new great must have will our "
         "quick brown fox jumps over lazy dog america world freedom budget tax jobs").split()
LAYER_KEYS = {"l0", "fvu", "mse", "dead_fraction", "dead_in_training", "ce_clean", "ce_spliced", "ce_zero_ablation",
              "ce_mean_ablation", "ce_loss_recovered", "kl"}
FAST = ["--total-tokens", "640", "--batch-size", "64", "--ctx-len", "16", "--d-sae", "64", "-k", "4",
        "--precision", "fp32", "--harvest-dtype", "float32", "--quiet"]


def _document(rng: random.Random, sentences: int) -> str:
    out = []
    for _ in range(sentences):
        words = [rng.choice(WORDS) for _ in range(rng.randint(5, 12))]
        out.append(" ".join(words).capitalize() + ".")
    return " ".join(out)


def _save_llama(folder, tokenizer, hidden: int = 32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(num_hidden_layers=N_LAYERS, hidden_size=hidden, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=48, vocab_size=len(tokenizer), max_position_embeddings=64,
                      eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _save_gpt2(folder, tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=N_LAYERS, n_embd=32, n_head=4, vocab_size=len(tokenizer), n_positions=64,
                     bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    GPT2LMHeadModel(cfg).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny Llama folder (d_model 32), another of d_model 48, a .jsonl of 12 documents for
    training and another for evaluation."""
    root = tmp_path_factory.mktemp("cli")
    tok = build_tiny_tokenizer()
    train, other = write_texts(root)
    return {
        "model": _save_llama(root / "tiny-llama", tok),
        "wide_model": _save_llama(root / "tiny-llama-48", tok, hidden=48),
        "gpt2": _save_gpt2(root / "tiny-gpt2", tok),  # learned positions: at most 64 tokens
        "train": train,
        "other": other,
    }


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TRANSCODERS_CACHE", str(tmp_path / "cache"))


def invoke(*args) -> object:
    return CliRunner().invoke(main, [str(a) for a in args])


def train_args(files, run_dir, *extra):
    return ["train", "--model", files["model"], "--data", files["train"], "--run-dir", run_dir, *FAST, *extra]


@pytest.fixture(scope="module")
def trained_run(files, tmp_path_factory, single_thread):
    run = tmp_path_factory.mktemp("run") / "run"
    result = invoke(*train_args(files, run, "--layers", "1", "--eval-tokens", "256"))
    return run, result


def assert_metrics_shape(data: dict, layers: set[str]) -> None:
    assert set(data["layers"]) == layers
    for m in data["layers"].values():
        assert set(m) >= LAYER_KEYS
        assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in m.values())
    assert isinstance(data["eval_tokens"], int) and data["eval_tokens"] > 0


# ---------------------------------------------------------------- success


def test_train_cli_trains_evaluates_and_writes_report(trained_run):
    run, result = trained_run
    assert result.exit_code == 0, result.output
    assert "report:" in result.stdout and "layer 1:" in result.stdout
    data = json.loads((run / "metrics.json").read_text())
    assert_metrics_shape(data, {"1"})
    assert 16 <= data["eval_tokens"] <= 256 and data["eval_tokens"] % 16 == 0
    assert (run / "summary.md").is_file() and (run / "feature_density.png").is_file()
    assert (run / "layers.1.mlp" / "coder.safetensors").is_file()
    assert json.loads((run / "layers.1.mlp" / "cfg.json").read_text())["layer"] == 1
    assert json.loads((run / "timing.json").read_text())["train_tokens"] == 640


@pytest.fixture
def run_copy(trained_run, tmp_path):
    """A private copy of the trained run folder, for tests that write into it (``evaluate``
    rewrites ``metrics.json``): the shared run stays as training left it, in any test order."""
    import shutil

    run, result = trained_run
    assert result.exit_code == 0, result.output
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return copy


def test_evaluate_cli_on_other_text(run_copy, files):
    run = run_copy
    out = invoke("evaluate", run, "--data", files["other"], "--eval-tokens", "128", "--quiet")
    assert out.exit_code == 0, out.output
    printed, _, report = out.stdout.rpartition("report:")
    assert report.strip().endswith("summary.md")
    data = json.loads(printed)
    assert_metrics_shape(data, {"1"})
    assert data["eval_tokens"] == 120  # 8 contexts of 16; the first position of each is the attention sink
    saved = json.loads((run / "eval" / "other" / "metrics.json").read_text())  # beside the run's own results
    assert saved["eval_tokens"] == 120 and "other.jsonl" in saved["eval_data"]
    assert "other.jsonl" not in json.loads((run / "metrics.json").read_text())["eval_data"]


def test_evaluate_cli_defaults_to_held_out_split(run_copy):
    run = run_copy
    out = invoke("evaluate", run, "--eval-tokens", "64", "--quiet")
    assert out.exit_code == 0, out.output
    assert json.loads((run / "metrics.json").read_text())["eval_tokens"] == 60  # 4 contexts of 16, less their sinks


def test_train_cli_layers_all_trains_every_layer(files, tmp_path):
    run = tmp_path / "run"
    result = invoke(*train_args(files, run, "--layers", "all", "--eval-tokens", "64", "--total-tokens", "128"))
    assert result.exit_code == 0, result.output
    for layer in range(N_LAYERS):
        assert (run / f"layers.{layer}.mlp" / "coder.safetensors").is_file()
    assert set(json.loads((run / "metrics.json").read_text())["layers"]) == {str(i) for i in range(N_LAYERS)}


def test_train_cli_resume_of_finished_run_keeps_its_coder(trained_run, files, tmp_path):
    import shutil

    run, result = trained_run
    assert result.exit_code == 0, result.output
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    before = (copy / "layers.1.mlp" / "coder.safetensors").read_bytes()
    out = invoke("train", "--resume", copy, "--eval-tokens", "64", "--quiet")
    assert out.exit_code == 0, out.output
    assert (copy / "layers.1.mlp" / "coder.safetensors").read_bytes() == before


def test_train_cli_quiet_writes_nothing_to_stderr(trained_run):
    run, result = trained_run
    assert result.exit_code == 0, result.output
    assert result.stderr == ""


def test_train_cli_eval_tokens_zero_skips_evaluation(files, tmp_path):
    run = tmp_path / "run"
    result = invoke(*train_args(files, run, "--layers", "0", "--eval-tokens", "0", "--total-tokens", "128"))
    assert result.exit_code == 0, result.output
    assert (run / "layers.0.mlp" / "coder.safetensors").is_file()
    assert not (run / "metrics.json").exists()


# ---------------------------------------------------------------- errors


def test_train_cli_nonexistent_model_path_is_one_line_error(files, tmp_path):
    missing = tmp_path / "no-such-model"
    result = invoke("train", "--model", missing, "--data", files["train"], "--layers", "1", "--run-dir", tmp_path / "run", *FAST)
    assert_one_line_error(result, f"model path '{missing}' does not exist")


def test_train_cli_layer_out_of_range_is_one_line_error(files, tmp_path):
    result = invoke(*train_args(files, tmp_path / "run", "--layers", "99"))
    assert_one_line_error(result, "layer 99 is out of range", "3 layers")


def test_train_cli_bad_layers_value_is_usage_error(files, tmp_path):
    result = invoke(*train_args(files, tmp_path / "run", "--layers", "six"))
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "six" in result.stderr


def test_train_cli_missing_data_file_is_one_line_error(files, tmp_path):
    missing = tmp_path / "missing.txt"
    result = invoke("train", "--model", files["model"], "--data", missing, "--layers", "1", "--run-dir", tmp_path / "run", *FAST)
    assert_one_line_error(result, str(missing), "does not exist")


def test_train_cli_empty_text_file_is_one_line_error(files, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n")
    result = invoke("train", "--model", files["model"], "--data", empty, "--layers", "1", "--run-dir", tmp_path / "run", *FAST)
    assert_one_line_error(result, f"data source '{empty}' yielded no non-empty text")


def test_evaluate_cli_folder_without_coders_is_one_line_error(tmp_path):
    (tmp_path / "run").mkdir()
    assert_one_line_error(invoke("evaluate", tmp_path / "run", "--quiet"), f"no coders in {tmp_path / 'run'}")
    nowhere = tmp_path / "nowhere"
    assert_one_line_error(invoke("evaluate", nowhere, "--quiet"), f"run folder {nowhere} does not exist")


def test_evaluate_cli_coder_of_other_width_names_d_model(trained_run, files, tmp_path):
    import shutil

    run, result = trained_run
    assert result.exit_code == 0, result.output
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    cfg_path = copy / "layers.1.mlp" / "cfg.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["model_name"] = str(files["wide_model"])
    cfg_path.write_text(json.dumps(cfg))
    assert_one_line_error(invoke("evaluate", copy, "--eval-tokens", "64", "--quiet"), "d_in=32", "d_model=48")


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_evaluate_cli_corrupt_coder_names_the_file(trained_run, tmp_path, damage):
    import shutil

    run, result = trained_run
    assert result.exit_code == 0, result.output
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    weights = copy / "layers.1.mlp" / "coder.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00garbage" * 20)
    assert_one_line_error(invoke("evaluate", copy, "--eval-tokens", "64", "--quiet"), f"{weights} is truncated or corrupt")


def test_train_cli_resume_without_run_config_is_one_line_error(tmp_path):
    (tmp_path / "empty").mkdir()
    result = invoke("train", "--resume", tmp_path / "empty", "--quiet")
    assert_one_line_error(result, f"{tmp_path / 'empty' / 'train_config.json'} not found")


def test_train_cli_resume_without_checkpoint_is_one_line_error(trained_run, tmp_path):
    import shutil

    run, result = trained_run
    assert result.exit_code == 0, result.output
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    (copy / "checkpoint.safetensors").unlink()
    result = invoke("train", "--resume", copy, "--eval-tokens", "64", "--quiet")
    assert_one_line_error(result, "no checkpoint at", "nothing to resume")


@pytest.mark.parametrize("option, needle", [
    (["--d-sae", "0"], "d_sae: Input should be greater than 0"),
    (["--batch-size", "0"], "batch_size: Input should be greater than 0"),
    (["-k", "100"], "k=100 is larger than d_sae=64"),
])
def test_train_cli_invalid_option_value_is_one_line_error(files, tmp_path, option, needle):
    result = invoke(*train_args(files, tmp_path / "run", "--layers", "1", *option))
    assert_one_line_error(result, needle)


def test_train_cli_eval_tokens_below_ctx_len_evaluates_one_whole_context(files, tmp_path):
    result = invoke(*train_args(files, tmp_path / "run", "--layers", "1", "--eval-tokens", "8"))
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["eval_tokens"] == 15  # rounded up to one ctx_len-token context, less its sink position


def test_train_cli_ctx_len_beyond_model_context_is_one_line_error(files, tmp_path):
    result = invoke("train", "--model", files["gpt2"], "--data", files["train"], "--layers", "1",
                    "--run-dir", tmp_path / "run", *FAST, "--ctx-len", "128")
    assert_one_line_error(result, "--ctx-len 128 is longer than the model's context (64 tokens)")


def test_train_cli_unknown_device_is_one_line_error(files, tmp_path):
    result = invoke(*train_args(files, tmp_path / "run", "--layers", "1", "--device", "nonsense"))
    assert_one_line_error(result, "unknown device 'nonsense'")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_train_cli_unavailable_cuda_is_one_line_error(files, tmp_path):
    result = invoke(*train_args(files, tmp_path / "run", "--layers", "1", "--device", "cuda"))
    assert_one_line_error(result, "device 'cuda'", "no CUDA GPU")


def test_evaluate_cli_all_at_once_and_layers(run_copy):
    run = run_copy
    out = invoke("evaluate", run, "--eval-tokens", "64", "--all-at-once", "--quiet")
    assert out.exit_code == 0, out.output
    saved = json.loads((run / "metrics.json").read_text())
    together, single = saved["spliced_together"], saved["layers"]["1"]
    assert together["layers"] == [1] and together["ce_spliced"] == single["ce_spliced"]
    assert "spliced at once" in (run / "summary.md").read_text()
    assert_one_line_error(invoke("evaluate", run, "--layers", "0", "--quiet"), "no coder for layer(s) [0]")


def test_evaluate_cli_on_a_mixture_reports_each_source(run_copy, files, tmp_path):
    import shutil

    run = run_copy
    third = tmp_path / "third.jsonl"
    shutil.copy(files["train"], third)  # a second source the run never saw held out
    mixture = f"{files['other']}:0.5,{third}:0.5"
    out = invoke("evaluate", run, "--data", mixture, "--eval-tokens", "128", "--quiet")
    assert out.exit_code == 0, out.output
    folder = next((run / "eval").glob("mixture-*"))
    saved = json.loads((folder / "metrics.json").read_text())
    parts = saved["by_source"]
    assert len(parts) == 2 and sum(p["eval_tokens"] for p in parts.values()) == saved["eval_tokens"]
    # each source's part is that source evaluated alone on as many contexts
    for path in (files["other"], third):
        label = next(k for k in parts if k.endswith(path.name))
        n_ctx = parts[label]["eval_tokens"] // 15  # 16-token contexts less the sink position
        alone = invoke("evaluate", run, "--data", path, "--eval-tokens", str(16 * n_ctx), "--out", tmp_path / path.stem,
                       "--quiet")
        assert alone.exit_code == 0, alone.output
        ref = json.loads((tmp_path / path.stem / "metrics.json").read_text())["layers"]["1"]
        assert parts[label]["layers"]["1"]["ce_spliced"] == pytest.approx(ref["ce_spliced"], rel=1e-6)
        assert parts[label]["layers"]["1"]["fvu"] == pytest.approx(ref["fvu"], rel=1e-6)
    assert "alone (" in (folder / "summary.md").read_text()


def test_train_cli_on_a_mixture_reports_each_source(files, tmp_path):
    """Training on a mixture evaluates each source's held-out contexts alone, as a later
    `evaluate RUN` of the same held-out split does (an independent rebuild of the split)."""
    third = tmp_path / "third.jsonl"
    third.write_bytes(files["other"].read_bytes())
    run = tmp_path / "run"
    result = invoke("train", "--model", files["model"], "--data", f"{files['train']}:0.5,{third}:0.5", "--run-dir", run,
                    *FAST, "--layers", "1", "--eval-tokens", "128")
    assert result.exit_code == 0, result.output
    trained = json.loads((run / "metrics.json").read_text())["by_source"]
    assert len(trained) == 2
    again = invoke("evaluate", run, "--eval-tokens", "128", "--quiet")
    assert again.exit_code == 0, again.output
    rebuilt = json.loads((run / "metrics.json").read_text())["by_source"]
    for label, part in trained.items():
        assert part["layers"]["1"]["ce_spliced"] == pytest.approx(rebuilt[label]["layers"]["1"]["ce_spliced"], rel=1e-6)
    assert "loss recovered by source" in result.output
