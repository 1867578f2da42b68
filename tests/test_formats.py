"""Tests for transcoders.coders.formats: other tools' coder files read and written exactly.

Each reader test writes files the way the other tool lays them out (by hand, not with our
writers) and checks our coder's forward against that tool's forward, re-implemented here from
its source. Round trips check ours -> format -> ours for every combination a format supports.
"""

from __future__ import annotations

import json
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file, save_file

from transcoders.coders import CoderConfig, CoderFileError, SparseCoder, load_coder, save_coder
from transcoders.coders.formats import (
    FORMATS,
    detect_format,
    read_circuit_tracer,
    read_coder,
    read_dunefsky,
    read_saelens,
    read_sparsify,
    write_circuit_tracer,
    write_coder,
    write_dunefsky,
    write_saelens,
    write_sparsify,
)

D, D_OUT, D_SAE, K, N = 8, 12, 32, 4, 24

pytestmark = pytest.mark.usefixtures("single_thread")


def randn(g: torch.Generator, *shape: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=g) * scale


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(N, D, generator=torch.Generator().manual_seed(123))


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def make_coder(kind: str, activation: str, *, d_out: int = D, seed: int = 0, layer: int | None = 2) -> SparseCoder:
    """A coder with every parameter random and non-zero (thresholds positive)."""
    hook = f"layers.{layer}.mlp"
    cfg = CoderConfig(
        kind=kind, activation=activation, d_in=D, d_out=d_out, d_sae=D_SAE, k=K, model_name="tiny", layer=layer,
        hookpoint_in=f"{hook}.input", hookpoint_out=f"{hook}.input" if kind == "sae" else f"{hook}.output",
    )
    coder = SparseCoder(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in coder.named_parameters():
            p.copy_(randn(g, *p.shape, scale=0.5).abs() if name == "threshold" else randn(g, *p.shape, scale=0.5))
    return coder


def topk_relu(pre: torch.Tensor, k: int) -> torch.Tensor:
    """Dense ReLU(top-k) activations, the way SAELens's TopK module computes them."""
    vals, idx = pre.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(pre).scatter(-1, idx, vals.relu())


# ====================================================================== EleutherAI sparsify
def write_sparsify_by_hand(folder: Path, *, transcode: bool | None, skip: bool, seed: int = 0) -> tuple[dict, dict]:
    """A sparsify ``<hookpoint>/`` folder as ``SparseCoder.save_to_disk`` writes it.
    ``transcode=None`` drops the key, as configs written before February 2025 do."""
    g = torch.Generator().manual_seed(seed)
    t = {
        "encoder.weight": randn(g, D_SAE, D),
        "encoder.bias": randn(g, D_SAE, scale=0.5),
        "W_dec": randn(g, D_SAE, D),
        "b_dec": randn(g, D),
    }
    if skip:
        t["W_skip"] = randn(g, D, D, scale=0.3)  # nn.Parameter [d_in, d_in], applied as x @ W_skip.mT
    cfg = {"activation": "topk", "expansion_factor": D_SAE // D, "normalize_decoder": True, "num_latents": 0,
           "k": K, "multi_topk": False, "skip_connection": skip, "transcode": transcode, "d_in": D}
    if transcode is None:
        del cfg["transcode"], cfg["activation"]
    folder.mkdir(parents=True)
    save_file(t, folder / "sae.safetensors")
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return t, cfg


def sparsify_forward(t: dict, cfg: dict, x: torch.Tensor) -> torch.Tensor:
    """sparsify ``SparseCoder.forward``: centre (SAEs), ReLU, top-k, sparse decode, skip."""
    sae_in = x if cfg.get("transcode", False) else x - t["b_dec"]
    pre = F.relu(F.linear(sae_in, t["encoder.weight"], t["encoder.bias"]))
    top_acts, top_idx = pre.topk(cfg["k"], sorted=False)
    y = (top_acts[..., None] * t["W_dec"][top_idx]).sum(-2) + t["b_dec"]
    if "W_skip" in t:
        y = y + x @ t["W_skip"].mT
    return y


@pytest.mark.parametrize(
    ("transcode", "skip", "kind"),
    [(True, False, "transcoder"), (False, False, "sae"), (True, True, "skip_transcoder"), (None, False, "sae")],
    ids=["transcoder", "sae", "skip", "pre-2025-config"],
)
def test_sparsify_reader_matches_sparsify_forward(tmp_path, x, transcode, skip, kind):
    folder = tmp_path / "layers.3.mlp"
    t, cfg = write_sparsify_by_hand(folder, transcode=transcode, skip=skip)
    coder = read_sparsify(folder)
    assert (coder.cfg.kind, coder.cfg.activation, coder.cfg.k, coder.cfg.d_sae) == (kind, "topk", K, D_SAE)
    assert coder.cfg.layer == 3
    if transcode:
        assert (coder.cfg.hookpoint_in, coder.cfg.hookpoint_out) == ("layers.3.mlp.input", "layers.3.mlp.output")
    close(coder(x), sparsify_forward(t, cfg, x))


def test_sparsify_kind_override_and_refusals(tmp_path, x):
    folder = tmp_path / "layers.0.mlp"
    t, cfg = write_sparsify_by_hand(folder, transcode=None, skip=False)
    coder = read_sparsify(folder, kind="transcoder")  # an old transcoder: same maths, other label
    assert coder.cfg.kind == "transcoder"
    close(coder(x), sparsify_forward(t, cfg, x))
    (folder / "cfg.json").write_text(json.dumps({**cfg, "activation": "groupmax"}))
    with pytest.raises(ValueError, match="groupmax"):
        read_sparsify(folder)
    (folder / "cfg.json").write_text(json.dumps({**cfg, "signed": True}))
    with pytest.raises(ValueError, match="signed"):
        read_sparsify(folder)


def test_sparsify_shape_mismatch_and_missing_files(tmp_path):
    folder = tmp_path / "layers.0.mlp"
    t, cfg = write_sparsify_by_hand(folder, transcode=True, skip=False)
    save_file({**t, "W_dec": torch.zeros(D_SAE, D + 1)}, folder / "sae.safetensors")
    with pytest.raises(CoderFileError, match="W_dec"):
        read_sparsify(folder)
    (folder / "sae.safetensors").unlink()
    with pytest.raises(CoderFileError, match="sae.safetensors"):
        read_coder(folder, "sparsify")


# ====================================================================== SAELens
def write_saelens_by_hand(folder: Path, case: str, seed: int = 0) -> tuple[dict, dict]:
    """A SAELens folder as ``SAE.save_model`` writes it (v6 layout unless the case says pre-6)."""
    g = torch.Generator().manual_seed(seed)
    d_out = D_OUT if "transcoder" in case else D
    t = {
        "W_enc": randn(g, D, D_SAE), "b_enc": randn(g, D_SAE, scale=0.5),
        "W_dec": randn(g, D_SAE, d_out), "b_dec": randn(g, d_out),
    }
    meta = {"sae_lens_version": "6.5.0", "model_name": "gpt2", "hook_name": "blocks.2.ln2.hook_normalized"}
    cfg: dict = {"architecture": case, "d_in": D, "d_sae": D_SAE, "dtype": "float32", "device": "cpu",
                 "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none", "metadata": meta}
    if case in ("jumprelu", "jumprelu_transcoder"):
        t["threshold"] = randn(g, D_SAE, scale=0.5)  # both signs: SAELens ReLUs before the mask
    elif case == "jumprelu-log":
        t["log_threshold"] = randn(g, D_SAE, scale=0.5)
        cfg["architecture"] = "jumprelu"
    elif case == "topk-rescaled":
        cfg.update(architecture="topk", k=K, rescale_acts_by_decoder_norm=True)
    elif case == "topk-pre6":  # SAELens 5: architecture standard + activation_fn_str topk
        cfg = {"d_in": D, "d_sae": D_SAE, "dtype": "float32", "model_name": "gpt2", "hook_name": "blocks.1.hook_resid_pre",
               "hook_layer": 1, "activation_fn_str": "topk", "activation_fn_kwargs": {"k": K}, "apply_b_dec_to_input": False,
               "normalize_activations": False, "sae_lens_training_version": "5.3.0"}
    elif case == "standard-pre6":  # SAELens 3/4: hook_point names, a finetuning scaling factor
        cfg = {"d_in": D, "d_sae": D_SAE, "dtype": "float32", "model_name": "gpt2", "hook_point": "blocks.5.hook_resid_pre",
               "hook_point_layer": 5, "finetuning_scaling_factor": True, "activation_fn_str": "relu"}
        t["scaling_factor"] = randn(g, D_SAE, scale=0.5).abs() + 0.5
    if "transcoder" in case:
        cfg["d_out"] = d_out
        meta["hook_name_out"] = "blocks.2.hook_mlp_out"
    if case == "skip_transcoder":
        t["W_skip"] = randn(g, d_out, D, scale=0.3)  # [d_out, d_in], applied as x @ W_skip.T
    folder.mkdir(parents=True)
    save_file(t, folder / "sae_weights.safetensors")
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return t, cfg


def saelens_forward(t: dict, cfg: dict, x: torch.Tensor) -> torch.Tensor:
    """SAELens 6 ``SAE.forward`` for each architecture (``sae_lens/saes/*.py``)."""
    arch = cfg.get("architecture", "topk" if cfg.get("activation_fn_str") == "topk" else "standard")
    transcoder = "d_out" in cfg
    sae_in = x if transcoder else x - t["b_dec"] * cfg.get("apply_b_dec_to_input", True)
    pre = sae_in @ t["W_enc"] + t["b_enc"]
    if arch in ("jumprelu", "jumprelu_transcoder"):
        threshold = t["threshold"] if "threshold" in t else t["log_threshold"].exp()
        f = F.relu(pre) * (pre > threshold)
    elif arch == "topk":
        k = cfg.get("k") or cfg["activation_fn_kwargs"]["k"]
        if cfg.get("rescale_acts_by_decoder_norm"):
            norms = t["W_dec"].norm(dim=-1)
            f = topk_relu(pre * norms, k) / norms
        else:
            f = topk_relu(pre, k)
    else:
        f = F.relu(pre)
    if "scaling_factor" in t:
        f = f * t["scaling_factor"]
    y = f @ t["W_dec"] + t["b_dec"]
    if arch == "skip_transcoder":
        y = y + x @ t["W_skip"].T
    return y


SAELENS_CASES = {
    "standard": ("sae", "relu"),
    "standard-pre6": ("sae", "relu"),
    "jumprelu": ("sae", "jumprelu"),
    "jumprelu-log": ("sae", "jumprelu"),
    "topk-rescaled": ("sae", "topk"),
    "topk-pre6": ("sae", "topk"),
    "transcoder": ("transcoder", "relu"),
    "skip_transcoder": ("skip_transcoder", "relu"),
    "jumprelu_transcoder": ("transcoder", "jumprelu"),
}


@pytest.mark.parametrize("case", list(SAELENS_CASES))
def test_saelens_reader_matches_saelens_forward(tmp_path, x, case):
    t, cfg = write_saelens_by_hand(tmp_path / case, case)
    coder = read_saelens(tmp_path / case)
    assert (coder.cfg.kind, coder.cfg.activation) == SAELENS_CASES[case]
    assert coder.cfg.d_out == (D_OUT if "transcoder" in case else D)
    close(coder(x), saelens_forward(t, cfg, x))


def test_saelens_metadata_maps_hooks(tmp_path):
    write_saelens_by_hand(tmp_path / "tc", "transcoder")
    write_saelens_by_hand(tmp_path / "old", "standard-pre6")
    tc, old = read_saelens(tmp_path / "tc"), read_saelens(tmp_path / "old")
    assert (tc.cfg.model_name, tc.cfg.layer) == ("gpt2", 2)
    assert (tc.cfg.hookpoint_in, tc.cfg.hookpoint_out) == ("layers.2.mlp.input", "layers.2.mlp.output")
    assert (old.cfg.layer, old.cfg.hookpoint_in) == (5, "blocks.5.hook_resid_pre")


def test_saelens_refusals(tmp_path):
    t, cfg = write_saelens_by_hand(tmp_path / "s", "standard")
    for bad, match in [({"normalize_activations": "layer_norm"}, "normalize_activations"),
                       ({"architecture": "gated"}, "gated")]:
        (tmp_path / "s" / "cfg.json").write_text(json.dumps({**cfg, **bad}))
        with pytest.raises(ValueError, match=match):
            read_saelens(tmp_path / "s")
    (tmp_path / "s" / "cfg.json").write_text(json.dumps(cfg))
    save_file({**t, "W_enc": t["W_enc"].T.contiguous()}, tmp_path / "s" / "sae_weights.safetensors")
    with pytest.raises(CoderFileError, match="W_enc"):
        read_saelens(tmp_path / "s")
    (tmp_path / "s" / "cfg.json").unlink()
    with pytest.raises(CoderFileError, match="cfg.json"):
        read_saelens(tmp_path / "s")


def test_saelens_writer_layout_and_negative_thresholds(tmp_path):
    coder = make_coder("transcoder", "jumprelu", d_out=D_OUT)
    write_saelens(coder, tmp_path / "tc")
    cfg = json.loads((tmp_path / "tc" / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu_transcoder" and cfg["d_out"] == D_OUT
    assert cfg["metadata"]["hook_name"] == "blocks.2.ln2.hook_normalized"
    assert cfg["metadata"]["hook_name_out"] == "blocks.2.hook_mlp_out"
    shapes = {k: tuple(v.shape) for k, v in load_file(tmp_path / "tc" / "sae_weights.safetensors").items()}
    assert shapes == {"W_enc": (D, D_SAE), "b_enc": (D_SAE,), "W_dec": (D_SAE, D_OUT), "b_dec": (D_OUT,), "threshold": (D_SAE,)}
    with torch.no_grad():
        coder.threshold[0] = -0.1
    with pytest.raises(ValueError, match="negative threshold"):
        write_saelens(coder, tmp_path / "neg")


# ====================================================================== circuit-tracer
CT_CONFIG = """\
model_kind: transcoder_set
model_name: tiny-llama
feature_input_hook: mlp.hook_in
feature_output_hook: mlp.hook_out
scan: tiny-scan
transcoders:
{files}
"""


def write_circuit_tracer_by_hand(folder: Path, *, skip: bool = False, extra: str = "", seed: int = 0) -> list[dict]:
    """Two layers as ``SingleLayerTranscoder.to_safetensors`` writes them: layer 0 ReLU in
    float32, layer 1 JumpReLU in bfloat16."""
    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True)
    layers = []
    for i in range(2):
        t = {"W_enc": randn(g, D_SAE, D), "W_dec": randn(g, D_SAE, D), "b_enc": randn(g, D_SAE, scale=0.5), "b_dec": randn(g, D)}
        if i == 1:
            t["activation_function.threshold"] = randn(g, D_SAE, scale=0.5).abs()
            t = {k: v.bfloat16() for k, v in t.items()}
        if skip:
            t["W_skip"] = randn(g, D, D, scale=0.3).to(t["W_enc"].dtype)
        save_file(t, folder / f"layer_{i}.safetensors")
        layers.append(t)
    files = "\n".join(f"- layer_{i}.safetensors" for i in range(2))
    (folder / "config.yaml").write_text(CT_CONFIG.format(files=files) + extra)
    return layers


def circuit_tracer_forward(t: dict, x: torch.Tensor, activation: str | None = None) -> torch.Tensor:
    """circuit-tracer ``SingleLayerTranscoder.forward`` (weights cast to float32 first)."""
    t = {k: v.float() for k, v in t.items()}
    pre = F.linear(x, t["W_enc"], t["b_enc"])
    if "activation_function.threshold" in t and activation != "relu":
        f = pre * (pre > t["activation_function.threshold"])
    else:
        f = F.relu(pre)
    y = f @ t["W_dec"] + t["b_dec"]
    if "W_skip" in t:
        y = y + x @ t["W_skip"].T
    return y


@pytest.mark.parametrize("skip", [False, True])
def test_circuit_tracer_reader_matches_circuit_tracer_forward(tmp_path, x, skip):
    layers = write_circuit_tracer_by_hand(tmp_path / "set", skip=skip)
    coders = read_circuit_tracer(tmp_path / "set")
    assert sorted(coders) == [0, 1]
    for i, coder in coders.items():
        assert coder.cfg.activation == ("relu", "jumprelu")[i]
        assert coder.cfg.kind == ("skip_transcoder" if skip else "transcoder")
        assert (coder.cfg.layer, coder.cfg.model_name) == (i, "tiny-llama")
        assert (coder.cfg.hookpoint_in, coder.cfg.hookpoint_out) == (f"layers.{i}.mlp.input", f"layers.{i}.mlp.output")
        close(coder(x), circuit_tracer_forward(layers[i], x))


def test_circuit_tracer_config_variants(tmp_path, x):
    layers = write_circuit_tracer_by_hand(tmp_path / "relu", extra="activation: relu\n")
    coders = read_circuit_tracer(tmp_path / "relu" / "config.yaml")  # the config file itself works too
    assert coders[1].cfg.activation == "relu"  # `activation: relu` ignores stored thresholds, as circuit-tracer does
    close(coders[1](x), circuit_tracer_forward(layers[1], x, activation="relu"))

    write_circuit_tracer_by_hand(tmp_path / "glob")
    text = (tmp_path / "glob" / "config.yaml").read_text()
    (tmp_path / "glob" / "config.yaml").write_text(text.split("transcoders:")[0])  # no list: layer_*.safetensors
    assert sorted(read_circuit_tracer(tmp_path / "glob")) == [0, 1]

    write_circuit_tracer_by_hand(tmp_path / "topk", extra="activation: topk\nk: 4\n")
    with pytest.raises(ValueError, match="allow_topk"):
        read_circuit_tracer(tmp_path / "topk")
    coders = read_circuit_tracer(tmp_path / "topk", allow_topk=True)
    assert (coders[0].cfg.activation, coders[0].cfg.k) == ("topk", 4)


def test_circuit_tracer_refusals(tmp_path):
    write_circuit_tracer_by_hand(tmp_path / "set")
    cfg_path = tmp_path / "set" / "config.yaml"
    text = cfg_path.read_text()
    cfg_path.write_text(text.replace("transcoder_set", "cross_layer_transcoder"))
    with pytest.raises(ValueError, match="cross_layer_transcoder"):
        read_circuit_tracer(tmp_path / "set")
    cfg_path.write_text(text.replace("- layer_1.safetensors", "- hf://org/repo/layer_1.safetensors"))
    with pytest.raises(ValueError, match="hf://"):
        read_circuit_tracer(tmp_path / "set")
    cfg_path.write_text(text)
    (tmp_path / "set" / "layer_1.safetensors").unlink()
    with pytest.raises(CoderFileError, match="layer_1.safetensors"):
        read_coder(tmp_path / "set")
    save_file(
        {
            "W_enc": torch.zeros(D_SAE, D), "W_dec": torch.zeros(D_SAE, D + 1),
            "b_enc": torch.zeros(D_SAE), "b_dec": torch.zeros(D),
        },
        tmp_path / "set" / "layer_1.safetensors",
    )
    with pytest.raises(CoderFileError, match="W_dec"):
        read_circuit_tracer(tmp_path / "set")


def test_circuit_tracer_writer(tmp_path):
    coders = {0: make_coder("transcoder", "relu", layer=0), 1: make_coder("transcoder", "jumprelu", layer=1, seed=1)}
    write_circuit_tracer(coders, tmp_path / "set")
    cfg = yaml.safe_load((tmp_path / "set" / "config.yaml").read_text())
    assert cfg == {"model_kind": "transcoder_set", "model_name": "tiny", "feature_input_hook": "mlp.hook_in",
                   "feature_output_hook": "mlp.hook_out", "transcoders": ["layer_0.safetensors", "layer_1.safetensors"]}
    assert "activation_function.threshold" in load_file(tmp_path / "set" / "layer_1.safetensors")
    write_circuit_tracer(coders, tmp_path / "abs", absolute_paths=True)
    assert all(Path(p).is_absolute() for p in yaml.safe_load((tmp_path / "abs" / "config.yaml").read_text())["transcoders"])

    with pytest.raises(ValueError, match="cannot load TopK"):
        write_circuit_tracer({0: make_coder("transcoder", "topk", layer=0)}, tmp_path / "topk")
    with pytest.raises(ValueError, match="every layer 0..n-1"):
        write_circuit_tracer({0: coders[0], 2: coders[1]}, tmp_path / "gap")
    with pytest.raises(ValueError, match="d_model"):
        write_circuit_tracer({0: make_coder("transcoder", "relu", d_out=D_OUT)}, tmp_path / "wide")
    with pytest.raises(TypeError, match="layer: coder"):
        write_coder(coders[0], tmp_path / "one", "circuit-tracer")


# ====================================================================== Dunefsky et al. 2024
def dunefsky_state(*, transcoder: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    """``SparseAutoencoder.state_dict()`` of jacobdunefsky/transcoder_circuits."""
    g = torch.Generator().manual_seed(seed)
    d_out = D_OUT if transcoder else D
    t = {"W_enc": randn(g, D, D_SAE), "b_enc": randn(g, D_SAE, scale=0.5), "W_dec": randn(g, D_SAE, d_out), "b_dec": randn(g, D)}
    if transcoder:
        t["b_dec_out"] = randn(g, d_out)
    return t


def dunefsky_forward(t: dict, x: torch.Tensor) -> torch.Tensor:
    """Their ``SparseAutoencoder.forward``: centre by b_dec, ReLU, decode with b_dec_out (or b_dec)."""
    f = F.relu((x - t["b_dec"]) @ t["W_enc"] + t["b_enc"])
    return f @ t["W_dec"] + t.get("b_dec_out", t["b_dec"])


def test_dunefsky_reader_matches_their_forward(tmp_path, x):
    t = dunefsky_state(transcoder=True)
    torch.save(t, tmp_path / "plain.pt")
    coder = read_dunefsky(tmp_path / "plain.pt")
    assert (coder.cfg.kind, coder.cfg.activation, coder.cfg.d_out) == ("transcoder", "relu", D_OUT)
    close(coder(x), dunefsky_forward(t, x))

    sae = dunefsky_state(transcoder=False, seed=1)
    cfg = {"model_name": "gpt2-small", "hook_point": "blocks.4.hook_resid_pre", "hook_point_layer": 4, "is_transcoder": False}
    torch.save({"cfg": cfg, "state_dict": sae}, tmp_path / "sae.pt")
    coder = read_dunefsky(tmp_path / "sae.pt")
    assert (coder.cfg.kind, coder.cfg.layer, coder.cfg.model_name) == ("sae", 4, "gpt2-small")
    close(coder(x), dunefsky_forward(sae, x))


@pytest.fixture
def fake_sae_training(monkeypatch, tmp_path):
    """A stand-in for their ``sae_training.config`` module, present only while saving; its
    ``__setstate__`` would leave a marker file if our reader ever ran it."""
    marker = tmp_path / "config_code_ran"
    pkg, mod = types.ModuleType("sae_training"), types.ModuleType("sae_training.config")

    @dataclass
    class LanguageModelSAERunnerConfig:
        model_name: str = "gpt2-small"
        hook_point: str = "blocks.8.ln2.hook_normalized"
        hook_point_layer: int = 8
        dtype: torch.dtype = torch.float32
        is_transcoder: bool = True
        out_hook_point: str = "blocks.8.hook_mlp_out"
        use_ghost_grads: tuple = (False,)
        extra: dict = field(default_factory=lambda: {"lr": 4e-4})

        def __setstate__(self, state):
            marker.write_text("ran")
            self.__dict__.update(state)

    LanguageModelSAERunnerConfig.__module__ = "sae_training.config"
    LanguageModelSAERunnerConfig.__qualname__ = "LanguageModelSAERunnerConfig"
    mod.LanguageModelSAERunnerConfig = LanguageModelSAERunnerConfig
    pkg.config = mod
    monkeypatch.setitem(sys.modules, "sae_training", pkg)
    monkeypatch.setitem(sys.modules, "sae_training.config", mod)
    return LanguageModelSAERunnerConfig, marker


def test_dunefsky_released_file_with_pickled_config_is_read_inertly(tmp_path, x, fake_sae_training, monkeypatch):
    cls, marker = fake_sae_training
    t = dunefsky_state(transcoder=True)
    path = tmp_path / "final_sparse_autoencoder_gpt2-small_blocks.8.ln2.hook_normalized_32.pt"
    torch.save({"cfg": cls(), "state_dict": t}, path)  # as their save_model does
    monkeypatch.delitem(sys.modules, "sae_training.config")
    monkeypatch.delitem(sys.modules, "sae_training")
    coder = read_dunefsky(path)
    assert not marker.exists()
    assert (coder.cfg.model_name, coder.cfg.layer) == ("gpt2-small", 8)
    assert (coder.cfg.hookpoint_in, coder.cfg.hookpoint_out) == ("layers.8.mlp.input", "layers.8.mlp.output")
    assert coder.cfg.training["source_config"]["dtype"] == "torch.float32"
    close(coder(x), dunefsky_forward(t, x))
    close(load_coder(save_coder(coder, tmp_path / "ours"))(x), coder(x))


class _Payload:
    """Unpickling this runs ``exec`` of code that writes a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def test_dunefsky_refuses_pickled_code_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"cfg": _Payload(marker), "state_dict": dunefsky_state(transcoder=True)}, path)
    with pytest.raises(CoderFileError, match="refuse to unpickle") as info:
        read_coder(path)
    assert "builtins.exec" in str(info.value) and "weights_only" in str(info.value)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the payload is live: full unpickling would have run it
    assert marker.read_text() == "pwned"


def test_dunefsky_missing_corrupt_and_incomplete(tmp_path):
    with pytest.raises(CoderFileError, match="nope.pt"):
        read_dunefsky(tmp_path / "nope.pt")
    (tmp_path / "garbage.pt").write_bytes(b"\x80\x02 not a checkpoint" * 4)
    with pytest.raises(CoderFileError, match="garbage.pt"):
        read_dunefsky(tmp_path / "garbage.pt")
    t = dunefsky_state(transcoder=True)
    del t["W_dec"]
    torch.save(t, tmp_path / "partial.pt")
    with pytest.raises(CoderFileError, match="W_dec"):
        read_dunefsky(tmp_path / "partial.pt")
    torch.save({"cfg": {"is_transcoder": True}, "state_dict": dunefsky_state(transcoder=False)}, tmp_path / "nobias.pt")
    with pytest.raises(CoderFileError, match="b_dec_out"):
        read_dunefsky(tmp_path / "nobias.pt")


def test_dunefsky_writer_layout(tmp_path):
    write_dunefsky(make_coder("transcoder", "relu", d_out=D_OUT), tmp_path / "tc.pt")
    state = torch.load(tmp_path / "tc.pt", weights_only=True)
    assert {k: tuple(v.shape) for k, v in state.items()} == {
        "W_enc": (D, D_SAE), "b_enc": (D_SAE,), "W_dec": (D_SAE, D_OUT), "b_dec": (D,), "b_dec_out": (D_OUT,)}


# ====================================================================== round trips and dispatch
ROUND_TRIPS = [
    *[("sparsify", kind, "topk", D) for kind in ("transcoder", "skip_transcoder", "sae")],
    *[("saelens", "sae", act, D) for act in ("relu", "jumprelu", "topk")],
    ("saelens", "transcoder", "relu", D_OUT),
    ("saelens", "transcoder", "jumprelu", D_OUT),
    ("saelens", "skip_transcoder", "relu", D_OUT),
    *[("circuit-tracer", kind, act, D) for kind in ("transcoder", "skip_transcoder") for act in ("relu", "jumprelu")],
    ("dunefsky", "transcoder", "relu", D_OUT),
    ("dunefsky", "sae", "relu", D),
    *[("transcoders", kind, act, D) for kind in ("transcoder", "skip_transcoder", "sae") for act in ("relu", "topk", "jumprelu")],
]


@pytest.mark.parametrize(("fmt", "kind", "activation", "d_out"), ROUND_TRIPS, ids=lambda v: str(v))
def test_round_trip_keeps_forward_and_is_auto_detected(tmp_path, x, fmt, kind, activation, d_out):
    coder = make_coder(kind, activation, d_out=d_out, layer=0)
    target = tmp_path / ("coder.pt" if fmt == "dunefsky" else "layers.0.mlp")
    written = write_coder({0: coder} if fmt == "circuit-tracer" else coder, target, fmt)
    assert detect_format(written) == fmt
    back = read_coder(written)
    if fmt == "circuit-tracer":
        assert sorted(back) == [0]
        back = back[0]
    got = (back.cfg.kind, back.cfg.activation, back.cfg.d_in, back.cfg.d_out, back.cfg.d_sae)
    assert got == (kind, activation, D, d_out, D_SAE)
    assert back.cfg.k == (K if activation == "topk" else None) or fmt == "transcoders"
    close(back(x), coder(x))


UNSUPPORTED = [
    ("sparsify", "transcoder", "relu", D),
    ("sparsify", "sae", "jumprelu", D),
    ("sparsify", "transcoder", "topk", D_OUT),
    ("sparsify", "transcoder", "batchtopk", D),
    ("saelens", "transcoder", "topk", D),
    ("saelens", "skip_transcoder", "jumprelu", D),
    ("dunefsky", "transcoder", "topk", D),
    ("dunefsky", "sae", "jumprelu", D),
    ("dunefsky", "skip_transcoder", "relu", D),
    ("circuit-tracer", "sae", "relu", D),
]


@pytest.mark.parametrize(("fmt", "kind", "activation", "d_out"), UNSUPPORTED, ids=lambda v: str(v))
def test_unsupported_combinations_are_refused(tmp_path, fmt, kind, activation, d_out):
    coder = make_coder(kind, activation, d_out=d_out, layer=0)
    with pytest.raises(ValueError, match="cannot|map"):
        write_coder({0: coder} if fmt == "circuit-tracer" else coder, tmp_path / "out", fmt)


def test_detection_from_inner_files_and_errors(tmp_path):
    coder = make_coder("sae", "topk")
    write_sparsify(coder, tmp_path / "run" / "layers.2.mlp")
    write_saelens(coder, tmp_path / "sl")
    assert detect_format(tmp_path / "run" / "layers.2.mlp" / "cfg.json") == "sparsify"
    assert detect_format(tmp_path / "sl" / "sae_weights.safetensors") == "saelens"
    assert isinstance(read_coder(tmp_path / "sl" / "cfg.json"), SparseCoder)
    with pytest.raises(ValueError, match="layers.2.mlp") as info:  # a run folder: name a hookpoint
        read_coder(tmp_path / "run")
    assert all(name in str(info.value) for name in FORMATS)
    with pytest.raises(CoderFileError, match="missing_dir"):
        read_coder(tmp_path / "missing_dir")
    with pytest.raises(ValueError, match="circuit-tracer"):
        read_coder(tmp_path / "sl", format="safetensors")
    with pytest.raises(TypeError):
        write_coder({0: coder}, tmp_path / "x", "saelens")
    assert read_coder(tmp_path / "sl", format="SAE_Lens").cfg.activation == "topk"  # aliases
