"""Nothing the user has is lost: refusals instead of deletes and overwrites, atomic writes with
the user's umask, locks, consistent coder saves under signals, and files from others that decide
nothing dangerous. Each test here failed on the code before these guarantees existed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import assert_one_line_error, build_tiny_tokenizer, save_random_transcoders, write_texts
from test_cli import FAST, _save_llama

from transcoders.cli import main
from transcoders.coders.coder import SparseCoder
from transcoders.coders.config import CoderConfig
from transcoders.coders.io import CoderFileError, load_coder, save_coder
from transcoders.files import FolderLockedError, atomic_write_text, folder_lock, signals_deferred

pytestmark = pytest.mark.usefixtures("single_thread")
D = 32
PROMPT = "The quick brown fox jumps over the lazy dog"


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TRANSCODERS_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def setup(tmp_path_factory, single_thread):
    """A tiny Llama folder, a training text, another text, and a run folder with a random
    transcoder for every layer (enough for ``trace`` and ``verify``)."""
    root = tmp_path_factory.mktemp("safety")
    train, other = write_texts(root)
    model = _save_llama(root / "tiny-llama", build_tiny_tokenizer())
    run = save_random_transcoders(root / "circuit-run", str(model))
    return {"root": root, "model": model, "train": train, "other": other, "circuit_run": run}


def train_args(setup, run_dir, *extra):
    return ["train", "--model", setup["model"], "--data", setup["train"], "--run-dir", run_dir, "--layers", "1", *FAST, *extra]


@pytest.fixture(scope="module")
def trained(setup, tmp_path_factory):
    run = tmp_path_factory.mktemp("trained") / "run"
    result = invoke(*train_args(setup, run, "--eval-tokens", "64"))
    assert result.exit_code == 0, result.output
    return run


def trace_graph(setup, out: Path) -> Path:
    """``trace`` of PROMPT with the random all-layer transcoders into ``out``."""
    result = invoke("trace", setup["circuit_run"], "--model", setup["model"], "--prompt", PROMPT, "--out", out,
                    "--max-feature-nodes", "8")
    assert result.exit_code == 0, result.output
    return out


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


def copy_run(run: Path, dest: Path) -> Path:
    import shutil

    shutil.copytree(run, dest, ignore=shutil.ignore_patterns(".lock"))
    return dest


# ---------------------------------------------------------------- the activation cache


def test_activation_cache_refuses_a_folder_that_is_not_ours_and_leaves_it_whole(setup, tmp_path):
    mine = tmp_path / "my-notes"
    mine.mkdir()
    (mine / "thesis.tex").write_text("three years of work")
    result = invoke(*train_args(setup, tmp_path / "run", "--activation-cache", mine))
    line = assert_one_line_error(result, str(mine), "not an activation cache")
    assert "nothing was changed" in line
    assert (mine / "thesis.tex").read_text() == "three years of work"
    assert [p.name for p in mine.iterdir()] == ["thesis.tex"]


def test_activation_cache_fills_an_empty_folder_with_the_users_umask(setup, tmp_path):
    folder = tmp_path / "cache-l1"
    folder.mkdir()
    old = os.umask(0o027)
    try:
        result = invoke(*train_args(setup, tmp_path / "run", "--activation-cache", folder, "--eval-tokens", "0"))
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.output
    assert (folder / "meta.json").is_file()
    for path in folder.iterdir():
        assert path.stat().st_mode & 0o777 == 0o640, path
    assert folder.stat().st_mode & 0o777 == 0o750


# ---------------------------------------------------------------- evaluate


def test_evaluate_on_other_text_keeps_the_runs_own_results(setup, trained, tmp_path):
    run = copy_run(trained, tmp_path / "run")
    own = {name: (run / name).read_bytes() for name in ("metrics.json", "summary.md", "feature_density.png", "timing.json")}
    assert "training" in json.loads(own["metrics.json"])
    result = invoke("evaluate", run, "--data", setup["other"], "--eval-tokens", "64", "--quiet")
    assert result.exit_code == 0, result.output
    assert {name: (run / name).read_bytes() for name in own} == own
    other = run / "eval" / "other"
    assert "other.jsonl" in json.loads((other / "metrics.json").read_text())["eval_data"]
    assert (other / "summary.md").is_file() and (other / "feature_density.png").is_file()
    custom = tmp_path / "elsewhere"
    result = invoke("evaluate", run, "--data", setup["other"], "--eval-tokens", "64", "--quiet", "--out", custom)
    assert result.exit_code == 0, result.output
    assert (custom / "metrics.json").is_file()


def test_evaluate_on_held_out_split_again_keeps_the_training_timings(trained, tmp_path):
    run = copy_run(trained, tmp_path / "run")
    timings = json.loads((run / "metrics.json").read_text())["training"]
    result = invoke("evaluate", run, "--eval-tokens", "32", "--quiet")
    assert result.exit_code == 0, result.output
    assert json.loads((run / "metrics.json").read_text())["training"] == timings


def test_evaluate_into_an_unwritable_folder_fails_before_evaluating(trained, tmp_path, monkeypatch):
    import transcoders.evaluation.run as evaluation_run

    def must_not_run(*args, **kwargs):
        raise AssertionError("evaluated although the results could not be written")

    monkeypatch.setattr(evaluation_run, "evaluate_coders", must_not_run)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = invoke("evaluate", trained, "--eval-tokens", "32", "--quiet", "--out", blocker / "results")
    assert_one_line_error(result, "cannot write into", str(blocker / "results"))


# ---------------------------------------------------------------- train into a folder


def test_train_refuses_a_folder_holding_a_run_and_changes_nothing(setup, trained, tmp_path):
    run = copy_run(trained, tmp_path / "run")
    before = snapshot(run)
    result = invoke(*train_args(setup, run, "-k", "8"))
    assert_one_line_error(result, str(run), "--resume", "--overwrite")
    assert snapshot(run) == before


def test_train_overwrite_replaces_the_run_but_not_other_files(setup, trained, tmp_path):
    run = copy_run(trained, tmp_path / "run")
    (run / "notes.txt").write_text("mine")
    (run / "layers.1.mlp" / "notes.md").write_text("my notes on these features")
    theirs = save_coder(SparseCoder(CoderConfig(d_in=8, d_out=8, d_sae=16, k=2, layer=0)), run / "downloaded-coder")
    result = invoke(*train_args(setup, run, "-k", "8", "--overwrite", "--eval-tokens", "0"))
    assert result.exit_code == 0, result.output
    assert json.loads((run / "train_config.json").read_text())["k"] == 8
    assert load_coder(run / "layers.1.mlp").cfg.k == 8
    assert not (run / "metrics.json").exists()  # the old run's results went with it
    assert (run / "notes.txt").read_text() == "mine"
    assert (run / "layers.1.mlp" / "notes.md").read_text() == "my notes on these features"
    assert load_coder(theirs).cfg.d_sae == 16  # a coder folder we did not write stays whole


def test_resume_with_different_options_lists_them_and_override_records_them(trained, tmp_path):
    run = copy_run(trained, tmp_path / "run")
    before = snapshot(run)
    result = invoke("train", "--resume", run, "--total-tokens", "1280", "-k", "8", "--quiet")
    line = assert_one_line_error(result, "--total-tokens: saved 640, given 1280", "--k: saved 4, given 8", "--override")
    assert "1280" in line and snapshot(run) == before
    result = invoke("train", "--resume", run, "-k", "8", "--override", "--quiet")
    assert_one_line_error(result, "k cannot change in a resumed run")
    result = invoke("train", "--resume", run, "--total-tokens", "1280", "--override", "--quiet", "--eval-tokens", "0")
    assert result.exit_code == 0, result.output
    assert json.loads((run / "train_config.json").read_text())["total_tokens"] == 1280
    [record] = json.loads((run / "overrides.json").read_text())
    assert record["changes"] == {"total_tokens": [640, 1280]}
    assert json.loads((run / "timing.json").read_text())["train_tokens"] == 1280


def test_resume_after_a_torn_last_log_line(trained, tmp_path):
    run = copy_run(trained, tmp_path / "run")
    with open(run / "train_log.jsonl", "a") as fh:
        fh.write('{"step": 10, "tokens": 6')  # the process died mid-line
    result = invoke("train", "--resume", run, "--total-tokens", "1280", "--override", "--quiet", "--eval-tokens", "0")
    assert result.exit_code == 0, result.output
    steps = [json.loads(line)["step"] for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert steps == [10, 20]


def test_a_second_run_into_a_locked_folder_refuses(setup, tmp_path):
    run = tmp_path / "run"
    with folder_lock(run):
        result = invoke(*train_args(setup, run))
    line = assert_one_line_error(result, "another training run", str(os.getpid()), str(run))
    assert line and not (run / "train_config.json").exists()
    with pytest.raises(FolderLockedError):
        with folder_lock(run), folder_lock(run):
            pass


# ---------------------------------------------------------------- atomic writes, umask, signals


def test_files_the_project_writes_get_the_users_umask(trained, setup, tmp_path):
    old = os.umask(0o027)
    try:
        run = tmp_path / "run"
        result = invoke(*train_args(setup, run, "--eval-tokens", "32"))
        assert result.exit_code == 0, result.output
        graph = trace_graph(setup, tmp_path / "g.json")
    finally:
        os.umask(old)
    written = [p for p in run.rglob("*") if p.is_file() and p.name != ".lock"] + [graph]
    assert {p.name for p in written} >= {"train_config.json", "train_log.jsonl", "timing.json", "metrics.json", "summary.md",
                                         "feature_density.png", "checkpoint.safetensors", "coder.safetensors", "cfg.json",
                                         "stats.safetensors", "g.json"}
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in written}
    assert set(modes.values()) == {"0o640"}, modes
    assert not [p for p in run.rglob("*.tmp")]


def test_signals_are_held_back_inside_signals_deferred():
    got = []
    old = signal.signal(signal.SIGUSR1, lambda *_: got.append("delivered"))
    try:
        with signals_deferred((signal.SIGUSR1,)):
            os.kill(os.getpid(), signal.SIGUSR1)
            got.append("inside")
        got.append("after")
    finally:
        signal.signal(signal.SIGUSR1, old)
    assert got == ["inside", "delivered", "after"]


def test_sigterm_while_saving_a_coder_never_pairs_new_weights_with_an_old_config(tmp_path):
    """A process is killed by SIGTERM right after the new weights are written: the config
    written with them still lands, so the folder loads as the new coder."""
    folder = tmp_path / "coder"
    old = SparseCoder(CoderConfig(d_in=8, d_out=8, d_sae=16, k=2, layer=0))
    save_coder(old, folder)
    script = textwrap.dedent(f"""
        import os, signal, torch
        import transcoders.coders.io as io
        from transcoders.coders.coder import SparseCoder
        from transcoders.coders.config import CoderConfig
        real = io.atomic_save_tensors
        def save_then_die(*args, **kwargs):
            real(*args, **kwargs)
            os.kill(os.getpid(), signal.SIGTERM)
        io.atomic_save_tensors = save_then_die
        new = SparseCoder(CoderConfig(d_in=8, d_out=8, d_sae=32, k=4, layer=0))
        io.save_coder(new, {str(folder)!r})
        print("survived")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGTERM, proc.stderr
    assert "survived" not in proc.stdout
    loaded = load_coder(folder)
    assert loaded.cfg.d_sae == 32 and loaded.W_enc.shape[0] == 32


def test_a_config_that_does_not_belong_to_the_weights_is_refused(tmp_path):
    a = save_coder(SparseCoder(CoderConfig(d_in=8, d_out=8, d_sae=16, k=2, layer=0)), tmp_path / "a")
    b = save_coder(SparseCoder(CoderConfig(d_in=8, d_out=8, d_sae=16, k=4, layer=0)), tmp_path / "b")
    (a / "cfg.json").write_bytes((b / "cfg.json").read_bytes())  # same shapes, other k: only the pairing tells
    with pytest.raises(CoderFileError, match="another config"):
        load_coder(a)
    cfg = json.loads((b / "cfg.json").read_text())
    cfg["model_name"] = "my/renamed-model"  # correcting the model name by hand stays allowed
    (b / "cfg.json").write_text(json.dumps(cfg))
    assert load_coder(b).cfg.model_name == "my/renamed-model"


def test_atomic_write_leaves_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "f.txt"
    atomic_write_text(path, "old")
    from transcoders.files import atomic_write

    def broken(tmp):
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(path, broken)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f.txt"]


# ---------------------------------------------------------------- trace and verify outputs


def test_trace_writes_into_the_run_folder_and_never_replaces_a_graph_without_force(setup, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(setup["circuit_run"], run)
    args = ["trace", run, "--model", setup["model"], "--prompt", PROMPT, "--max-feature-nodes", "8"]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    graph = run / "graphs" / "the-quick-brown-fox-jumps-over-the-lazy-dog.json"
    assert graph.is_file() and f"wrote {graph}" in result.stdout
    graph.write_text("my annotated graph")
    assert_one_line_error(invoke(*args), str(graph), "--force")
    assert graph.read_text() == "my annotated graph"
    result = invoke(*args, "--force")
    assert result.exit_code == 0, result.output
    assert json.loads(graph.read_text())["schema"]


def test_verify_out_is_never_replaced_without_force(setup, tmp_path):
    graph = trace_graph(setup, tmp_path / "g.json")
    report = tmp_path / "report.json"
    report.write_text("keep me")
    args = ["verify", graph, "--model", setup["model"], "--mean-tokens", "0", "--top-edges", "2", "--top-nodes", "1",
            "--sizes", "1", "--out", report]
    assert_one_line_error(invoke(*args), str(report), "--force")
    assert report.read_text() == "keep me"
    result = invoke(*args, "--force")
    assert result.exit_code == 0, result.output
    assert "faithfulness" in json.loads(report.read_text())


# ---------------------------------------------------------------- files from others decide nothing


def test_a_model_named_in_a_graph_is_not_loaded_unless_known_locally(setup, tmp_path, monkeypatch):
    graph = trace_graph(setup, tmp_path / "g.json")
    data = json.loads(graph.read_text())
    data["transcoders"]["meta"]["model"] = "someone/remote-code-model"
    graph.write_text(json.dumps(data))
    import transcoders.models.loading as loading

    def no_loading(*args, **kwargs):
        raise AssertionError("a model named in a file was loaded")

    monkeypatch.setattr(loading, "load_model", no_loading)
    line = assert_one_line_error(invoke("verify", graph, "--mean-tokens", "0"), "someone/remote-code-model", "--model")
    assert "not a known local model" in line


def test_a_model_named_in_a_coder_config_is_not_loaded_unless_known_locally(trained, tmp_path, monkeypatch):
    run = copy_run(trained, tmp_path / "run")
    cfg_path = run / "layers.1.mlp" / "cfg.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["model_name"] = "someone/remote-code-model"
    cfg_path.write_text(json.dumps(cfg))
    import transcoders.models.loading as loading

    monkeypatch.setattr(loading, "load_model", lambda *_a, **_k: (_ for _ in ()).throw(AssertionError("loaded")))
    assert_one_line_error(invoke("evaluate", run, "--quiet"), "someone/remote-code-model", "--model")


def test_verify_and_paths_refuse_a_graph_of_other_transcoders(setup, tmp_path):
    import shutil

    graph = trace_graph(setup, tmp_path / "g.json")
    other = tmp_path / "other-run"
    shutil.copytree(setup["circuit_run"], other)
    coder = load_coder(other / "layers.2.mlp")
    with torch.no_grad():
        coder.W_dec[0] += 1.0  # same shapes, other weights: only the fingerprint tells
    save_coder(coder, other / "layers.2.mlp")
    for command in (["verify", graph, "--mean-tokens", "0"], ["paths", graph]):
        line = assert_one_line_error(invoke(*command, "--run-dir", other, "--model", setup["model"]), "coders_fingerprint")
        assert str(setup["circuit_run"]) in line
    assert invoke("paths", graph, "--run-dir", setup["circuit_run"], "--model", setup["model"]).exit_code == 0


def test_jsonl_records_may_hold_unicode_line_separators(tmp_path):
    from transcoders.data.sources import load_documents

    path = tmp_path / "notes.jsonl"
    texts = ["first\u2028line", "second\x85line\rend", "third"]
    path.write_text("\n".join(json.dumps({"text": t}, ensure_ascii=False) for t in texts) + "\n", encoding="utf-8")
    assert [d.text for d in load_documents(str(path))] == texts


def test_torch_floor_excludes_releases_with_a_weights_only_bypass():
    import tomllib

    from packaging.requirements import Requirement

    deps = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_req = next(Requirement(d) for d in deps if Requirement(d).name == "torch")
    assert "2.5.1" not in torch_req.specifier  # CVE-2025-32434: weights_only=True bypass up to 2.5.1
    assert torch.__version__.split("+")[0] in torch_req.specifier


# ---------------------------------------------------------------- one place for each thing


def test_train_defaults_are_the_python_apis(setup, monkeypatch, tmp_path):
    import transcoders.training.run as training_run
    from transcoders.training.config import TrainConfig

    seen = {}
    monkeypatch.setattr(training_run, "train_run", lambda cfg, _folder, **kw: seen.update(cfg=cfg, kw=kw) or {"timing": {}})
    result = invoke("train", "--run-dir", tmp_path / "r", "--quiet")
    assert result.exit_code == 0, result.output
    assert seen["cfg"] == TrainConfig()
    result = invoke("train", "--run-dir", tmp_path / "r", "--quiet", "--layers", "all", "--sweep", '[{"k": 16}]',
                    "--shard-layers", "--lr", "0.001")
    assert result.exit_code == 0, result.output
    assert seen["cfg"] == TrainConfig(layers="all", sweep=[{"k": 16}], shard_layers=True, lr=1e-3)


def test_convert_format_choices_come_from_the_formats_table(tmp_path):
    from transcoders.coders.formats import FORMATS

    result = invoke("convert", tmp_path / "a", tmp_path / "b", "--to", "nonsense")
    assert result.exit_code == 2
    for name in FORMATS:
        assert name in result.output


def test_sweep_coders_are_keyed_by_layer_and_variant(tmp_path):
    from transcoders.coders.run_folder import CoderKey, find_coders

    for folder in ("layers.3.mlp", "layers.3.mlp/k64", "layers.10.mlp"):
        layer = int(folder.split(".")[1])
        save_coder(SparseCoder(CoderConfig(d_in=8, d_out=8, d_sae=16, k=2, layer=layer)), tmp_path / folder)
    found = find_coders(tmp_path)
    assert list(found) == [CoderKey(3), CoderKey(3, "k64"), CoderKey(10)]
    assert [str(k) for k in found] == ["3", "3/k64", "10"]
    assert found[CoderKey(3, "k64")] == tmp_path / "layers.3.mlp" / "k64"

