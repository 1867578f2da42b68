"""torchrun on CPU (gloo): data-parallel training equals a single process on the same global
batch, and layer sharding equals unsharded training exactly."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from transcoders.coders import load_coder
from transcoders.data.activations import MergedStream, rank_stream
from transcoders.data.tokens import build_token_split
from transcoders.models import load_model
from transcoders.training.config import TrainConfig
from transcoders.training.trainer import Trainer

TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent))
pytestmark = pytest.mark.skipif(TORCHRUN is None, reason="torchrun not installed next to this python")

COMMON = ["--batch-size", "64", "--total-tokens", str(64 * 8), "--ctx-len", "16", "--d-sae", "64", "-k", "4",
          "--precision", "fp32", "--harvest-dtype", "float32", "--device", "cpu", "--eval-tokens", "0", "--quiet"]


@pytest.fixture(scope="module")
def model_and_text(tmp_path_factory, tiny_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("dist")
    torch.manual_seed(0)
    cfg = LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=48, vocab_size=len(tiny_tokenizer), max_position_embeddings=64)
    LlamaForCausalLM(cfg).save_pretrained(root / "model")
    tiny_tokenizer.save_pretrained(root / "model")
    words = "the of state union nation congress people year war peace law trade money power".split()
    gen = torch.Generator().manual_seed(1)
    lines = [" ".join(words[i] for i in torch.randint(0, len(words), (200,), generator=gen).tolist()) for _ in range(40)]
    (root / "text").mkdir()
    for i, line in enumerate(lines):
        (root / "text" / f"doc{i:02d}.txt").write_text(line)
    return root / "model", root / "text"


def _torchrun(args: list[str], tmp_path: Path) -> None:
    env = {**os.environ, "TRANSCODERS_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    cmd = [TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "transcoders.cli", "--threads", "1", "train", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_data_parallel_matches_single_process_on_the_same_global_batch(model_and_text, tmp_path):
    model_dir, text = model_and_text
    run = tmp_path / "ddp"
    _torchrun(["--model", str(model_dir), "--data", str(text), "--layers", "1", "--run-dir", str(run), *COMMON], tmp_path)
    ddp = load_coder(run / "layers.1.mlp")

    # the same global batch in one process: both ranks' shares, concatenated
    torch.set_num_threads(1)
    cfg = TrainConfig.model_validate_json((run / "train_config.json").read_text())
    lm = load_model(str(model_dir))
    tokens = build_token_split(str(text), lm.tokenizer, cfg.ctx_len, eval_fraction=cfg.eval_fraction).train
    stream = MergedStream([rank_stream(lm.adapter, tokens, [1], cfg.batch_size, seed=cfg.seed, rank=r, world=2,
                                       block_contexts=cfg.block_contexts, model_batch=cfg.model_batch,
                                       skip_first=cfg.skip_first_tokens) for r in range(2)])
    Trainer(cfg, lm.adapter, None, tmp_path / "single", stream=stream).fit(progress=False)
    single = load_coder(tmp_path / "single" / "layers.1.mlp")
    # stated tolerance: gradients are summed across ranks in another order than in one batch
    for (name, p), (_, q) in zip(ddp.named_parameters(), single.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)
    assert not torch.equal(single.W_enc, load_coder(run / "layers.1.mlp").W_enc * 0)  # trained, not empty


def test_layer_sharding_trains_each_coder_exactly_as_one_process(model_and_text, tmp_path):
    model_dir, text = model_and_text
    args = ["--model", str(model_dir), "--data", str(text), "--layers", "0,1", *COMMON]
    _torchrun([*args, "--shard-layers", "--run-dir", str(tmp_path / "sharded")], tmp_path)
    from click.testing import CliRunner

    from transcoders.cli import main

    torch.set_num_threads(1)
    result = CliRunner().invoke(main, ["--threads", "1", "train", *args, "--run-dir", str(tmp_path / "single")],
                                env={"TRANSCODERS_CACHE": str(tmp_path / "cache")})
    assert result.exit_code == 0, result.output
    for layer in (0, 1):
        a = load_coder(tmp_path / "sharded" / f"layers.{layer}.mlp")
        b = load_coder(tmp_path / "single" / f"layers.{layer}.mlp")
        for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
            assert torch.equal(p, q), (layer, name)
    assert (tmp_path / "sharded" / "checkpoint.rank0.safetensors").exists()
    assert (tmp_path / "sharded" / "checkpoint.rank1.safetensors").exists()
