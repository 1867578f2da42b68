"""Shared fixtures: tiny random language models of every supported family, built offline.

Nothing here touches the network: models are built from config classes with random weights,
and the tokenizer is trained on a few sentences. Every build is seeded and takes milliseconds.
"""

from __future__ import annotations

import json
import os
import re

# Never reach the Hugging Face hub from the test suite (must be set before huggingface_hub loads).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

from transcoders.models import ModelAdapter, adapter_for

FAMILIES = ("gpt2", "gpt_neox", "llama", "gemma2")

N_LAYERS = 3
D_MODEL = 32
VOCAB = 100
MAX_POS = 64
# family -> (adapter family, d_mlp)
EXPECTED = {
    "gpt2": ("gpt2", 4 * D_MODEL),
    "gpt_neox": ("gpt_neox", 64),
    "llama": ("llama", 48),
    "gemma2": ("gemma", 48),
}


def build_tiny_model(family: str, *, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.nn.Module:
    """A 3-layer, 32-wide random causal LM of ``family`` in eval mode with gradients off."""
    from transformers import (
        Gemma2Config,
        Gemma2ForCausalLM,
        GPT2Config,
        GPT2LMHeadModel,
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
    )

    torch.manual_seed(seed)
    if family == "gpt2":
        cfg = GPT2Config(
            n_layer=N_LAYERS, n_embd=D_MODEL, n_head=4, vocab_size=VOCAB, n_positions=MAX_POS,
            bos_token_id=0, eos_token_id=0,
        )
        model = GPT2LMHeadModel(cfg)
    elif family == "gpt_neox":
        cfg = GPTNeoXConfig(
            num_hidden_layers=N_LAYERS, hidden_size=D_MODEL, num_attention_heads=4, intermediate_size=64,
            vocab_size=VOCAB, use_parallel_residual=True, max_position_embeddings=MAX_POS,
            bos_token_id=0, eos_token_id=0,
        )
        model = GPTNeoXForCausalLM(cfg)
    elif family == "llama":
        cfg = LlamaConfig(
            num_hidden_layers=N_LAYERS, hidden_size=D_MODEL, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=48, vocab_size=VOCAB, max_position_embeddings=MAX_POS,
        )
        model = LlamaForCausalLM(cfg)
    elif family == "gemma2":
        cfg = Gemma2Config(
            num_hidden_layers=N_LAYERS, hidden_size=D_MODEL, num_attention_heads=4, num_key_value_heads=2,
            head_dim=8, intermediate_size=48, vocab_size=VOCAB, max_position_embeddings=MAX_POS,
        )
        model = Gemma2ForCausalLM(cfg)
    else:  # pragma: no cover - programming error in a test
        raise ValueError(f"unknown family {family!r}")
    if family == "gemma2":
        # Gemma norms start at zero weight (scale 1 + w); randomise them so the post-MLP norm
        # really transforms its input and a wrong hookpoint would show.
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "layernorm" in name or name.endswith("norm.weight"):
                    p.normal_(0.0, 0.2)
    return model.to(dtype).eval().requires_grad_(False)


def tiny_adapter(model: torch.nn.Module) -> ModelAdapter:
    """The library's adapter for a tiny model."""
    return adapter_for(model)


@pytest.fixture(scope="module", params=FAMILIES)
def tiny_model(request) -> torch.nn.Module:
    """One tiny random model per supported family (float32, eval, seeded)."""
    model = build_tiny_model(request.param)
    model.family_id = request.param  # the test-side family name (gemma2 vs adapter's "gemma")
    return model


@pytest.fixture(scope="module")
def tiny_llama() -> torch.nn.Module:
    model = build_tiny_model("llama")
    model.family_id = "llama"
    return model


@pytest.fixture(scope="module")
def tiny_tokens() -> torch.Tensor:
    """``[6, 8]`` token ids, all distinct (so every harvested activation row is distinct)."""
    gen = torch.Generator().manual_seed(1234)
    return torch.randperm(VOCAB, generator=gen)[:48].view(6, 8)


def build_tiny_tokenizer():
    """A tiny byte-level BPE tokenizer with an ``<eos>`` token, trained here (no downloads)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    sentences = ["Fellow citizens of the Senate and House of Representatives.",
                 "The quick brown fox jumps over the lazy dog.", "the state of the union is strong"]
    tok.train_from_iterator(sentences * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


@pytest.fixture(scope="module")
def tiny_tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def single_thread():
    """Run tiny-model tests on one intra-op thread: their tensors are far too small to gain from
    more, and OpenMP spin-waiting makes them 10x slower when other processes share the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- shared by the training tests -------------------------------------------------------------
@pytest.fixture(scope="module")
def llama_adapter(tiny_llama):
    """Adapter of the tiny Llama."""
    return tiny_adapter(tiny_llama)


@pytest.fixture(scope="module")
def train_tokens() -> torch.Tensor:
    """``[12, 16]`` random token ids."""
    return torch.randint(0, VOCAB, (12, 16), generator=torch.Generator().manual_seed(0))


def read_log(run_dir) -> list[dict]:
    """The records of ``run_dir/train_log.jsonl``."""
    return [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]


# transformers' "Loading weights" progress bar, which may share stderr with an error line
PROGRESS = re.compile(r"\|[^|]*\| *\d+/\d+ \[")


def assert_one_line_error(result, *needles: str) -> str:
    """A click result that failed as the CLI promises: exit 2, one ``error:`` line naming each
    of ``needles``, no traceback. Returns that line.

    At least one needle is required: a test must say which problem the message has to name
    (any one-line error would otherwise pass)."""
    if not needles:
        raise TypeError("assert_one_line_error needs at least one substring naming the problem")
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    lines = [line for line in re.split(r"[\r\n]", result.stderr) if line.strip() and not PROGRESS.search(line)]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]



def save_random_transcoders(run, model_name: str, *, d_model: int = 32, d_sae: int = 64, k: int = 4, seed: int = 1):
    """A run folder with a random top-k transcoder (small random biases) for each of the
    ``N_LAYERS`` layers of a tiny model; returns the folder."""
    from transcoders.coders.coder import SparseCoder
    from transcoders.coders.config import CoderConfig
    from transcoders.coders.io import save_coder

    torch.manual_seed(seed)
    for layer in range(N_LAYERS):
        c = SparseCoder(CoderConfig(kind="transcoder", activation="topk", d_in=d_model, d_out=d_model, d_sae=d_sae, k=k,
                                    layer=layer, model_name=model_name))
        with torch.no_grad():
            c.b_enc.normal_(0, 0.1)
            c.b_dec.normal_(0, 0.1)
        save_coder(c, run / f"layers.{layer}.mlp")
    return run


def write_texts(root, seed: int = 0) -> tuple:
    """``train.jsonl`` (12 documents) and ``other.jsonl`` (4) of random sentences in ``root``."""
    import random

    from test_cli import _document

    rng = random.Random(seed)
    train, other = root / "train.jsonl", root / "other.jsonl"
    train.write_text("\n".join(json.dumps({"text": _document(rng, 8)}) for _ in range(12)) + "\n")
    other.write_text("\n".join(json.dumps({"text": _document(rng, 8)}) for _ in range(4)) + "\n")
    return train, other


def assert_injections_match_edges(rep, graph, nodes, rel: float = 1e-4) -> None:
    """Removing each source node's write (a feature's decoder row times its activation, or an
    error node's error) from the frozen model moves every target by exactly its edge weight."""
    from transcoders.circuits.graph import FEATURE
    from transcoders.circuits.interventions import frozen_target_values

    base = frozen_target_values(rep, rep.forward(), graph.targets)
    for node in nodes:
        layer, pos = int(graph.layer[node]), int(graph.pos[node])
        v = torch.zeros(rep.n_pos, rep.d_model, dtype=torch.float64)
        if int(graph.kind[node]) == FEATURE:
            v[pos] = graph.activation[node] * rep.coders[layer].W_dec[int(graph.feature[node])]
        else:
            v[pos] = rep.layers[layer].error[pos]
        after = frozen_target_values(rep, rep.forward({layer: -v}), graph.targets)
        for i, t in enumerate(graph.target_nodes.tolist()):
            edge = float(graph.edge_weight[(graph.edge_dst == t) & (graph.edge_src == node)].sum())
            assert abs(float(base[i] - after[i]) - edge) <= rel * max(abs(edge), 1e-3) + 1e-10, (node, i)


def tiny_llama_run(root) -> tuple:
    """``(model_dir, run)``: a tiny Llama saved in ``root/model`` and a run folder ``root/run`` with a
    random transcoder per layer and a train config pointing at ``write_texts(root)``'s text, as
    ``transcoders features`` and the viewer need."""
    from test_cli import _save_llama

    from transcoders.training.config import TrainConfig

    model_dir = _save_llama(root / "model", build_tiny_tokenizer())
    train, _ = write_texts(root)
    run = save_random_transcoders(root / "run", str(model_dir))
    (run / "train_config.json").write_text(TrainConfig(model=str(model_dir), data=str(train), ctx_len=16,
                                                       skip_first_tokens=1).model_dump_json())
    return model_dir, run
