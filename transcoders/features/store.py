"""The feature store: every feature's statistics, examples and weight tables on disk.

Layout (``RUN/features/``; format version :data:`FORMAT_VERSION`)::

    store.json                   manifest: model, text, settings, and per coder the contexts
                                 and tokens covered and a fingerprint of its weights
    tokens.safetensors           tokens [n_contexts, ctx_len] int32, in pass order (a context
                                 index in any file below is a row of this)
    vocab.json                   every token id's text, so reading needs no tokenizer
    layers.6.mlp[/variant]/
      acts.safetensors           the accumulator state (:mod:`.accumulate`), every tensor
                                 [d_sae, ...] or flat: count, sum, max, hist [d_sae, 64],
                                 sink_count, sink_max, top_{key,tok,val,win} [d_sae, top_k(, W)],
                                 sample_{...} [d_sae, n_samples(, W)], cooc_index/cooc_count
                                 (sparse d_sae x d_sae), random windows; and derived:
                                 quantiles [d_sae, n_groups + 1], cooc_top_ids/_jaccard/_count
      weights.safetensors        :func:`.weight_tables.weight_tables`
      labels.json                LLM-free label of every live feature, with its scores
      explanations.jsonl         LLM explanations with their scores (appended, resumable)

A global token index is ``context * ctx_len + position``. Reading one feature opens the
safetensors files once (memory-mapped) and slices row ``index`` of each tensor, so a lookup
costs milliseconds whatever the store's size.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..coders.coder import SparseCoder
from ..coders.io import coders_fingerprint
from ..coders.run_folder import CoderKey
from ..files import atomic_save_tensors, atomic_write_json, atomic_write_text
from .accumulate import HIST_EDGES, LayerAccumulator
from .config import STORE_SETTINGS, FeaturesConfig
from .examples import Example

FORMAT = "transcoders.features"
FORMAT_VERSION = 1
MANIFEST, TOKENS, VOCAB = "store.json", "tokens.safetensors", "vocab.json"
ACTS, WEIGHTS, LABELS, EXPLANATIONS = "acts.safetensors", "weights.safetensors", "labels.json", "explanations.jsonl"
COOC_TOP = 8


class FeatureStoreError(ValueError):
    """A store that is missing, corrupt, or was built from other text, settings or coders."""


def layer_folder(key: CoderKey) -> str:
    """The store's folder of a coder: ``layers.6.mlp`` or ``layers.6.mlp/k64``."""
    return f"layers.{key.layer}.mlp" + (f"/{key.variant}" if key.variant else "")


def parse_key(text: str) -> CoderKey:
    """``"6"`` or ``"6/k64"`` -> :class:`CoderKey`."""
    layer, _, variant = text.partition("/")
    return CoderKey(int(layer), variant)


def _fingerprint(coder: SparseCoder) -> str:
    return coders_fingerprint({0: coder})


# ---------------------------------------------------------------------------------------- derived
def quantiles(sample_val: torch.Tensor, sample_tok: torch.Tensor, n_groups: int) -> torch.Tensor:
    """``[d_sae, n_groups + 1]`` quantiles (0, 1/n, ..., 1) of each feature's sampled activations
    (NaN for a feature that never fired). Exact when a feature fired at most ``n_samples`` times."""
    vals = torch.where(sample_tok >= 0, sample_val.double(), torch.nan)
    q = torch.linspace(0, 1, n_groups + 1, dtype=torch.float64)
    return torch.nanquantile(vals, q, dim=1).T.float().contiguous()


def cooccurrence_top(acc: LayerAccumulator, k: int = COOC_TOP) -> dict[str, torch.Tensor]:
    """Each feature's ``k`` most co-occurring features by Jaccard index
    ``n(i and j) / (n(i) + n(j) - n(i and j))`` over counted tokens."""
    d = acc.d_sae
    C = acc.cooc.view(d, d)
    k = min(k, d - 1)
    ids, jac, cnt = [], [], []
    n = acc.count.double()
    for lo in range(0, d, 1024):
        c = C[lo: lo + 1024].double()
        union = n[lo: lo + 1024, None] + n[None, :] - c
        j = torch.where(union > 0, c / union.clamp_min(1), 0.0)
        j[torch.arange(j.shape[0]), torch.arange(lo, lo + j.shape[0])] = -1.0
        top = j.topk(k, dim=1)
        ids.append(top.indices)
        jac.append(top.values.float())
        cnt.append(c.gather(1, top.indices).int())
    return {"cooc_top_ids": torch.cat(ids), "cooc_top_jaccard": torch.cat(jac), "cooc_top_count": torch.cat(cnt)}


def vocab_strings(tokenizer) -> list[str]:
    """The text of every token id, decoded one by one."""
    n = len(tokenizer)
    return tokenizer.batch_decode([[i] for i in range(n)])


# ---------------------------------------------------------------------------------------- writing
class StoreWriter:
    """Checks that a pass may extend a store, and writes what it accumulated."""

    def __init__(self, folder: Path, cfg: FeaturesConfig, *, model: str, source: str, ctx_len: int, prepend_bos: bool,
                 skip_first: int):
        self.folder, self.cfg = Path(folder), cfg
        self.head = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": model, "source": source,
                     "ctx_len": ctx_len, "prepend_bos": prepend_bos, "skip_first": skip_first,
                     "settings": {k: getattr(cfg, k) for k in STORE_SETTINGS}}
        self.manifest = read_manifest(self.folder) if (self.folder / MANIFEST).exists() else None

    def check(self, tokens: torch.Tensor, coders: dict[CoderKey, SparseCoder]) -> dict[CoderKey, int]:
        """``{key: contexts already covered}``; refuses a store built otherwise.

        Raises:
            FeatureStoreError: other model, text, settings, tokens or coder weights.
        """
        m = self.manifest
        if m is None:
            if self.folder.exists() and any(p.name != ".lock" for p in self.folder.iterdir()):
                raise FeatureStoreError(f"{self.folder} exists and is not a feature store; pass another --out")
            return {}
        for name in ("model", "source", "ctx_len", "prepend_bos", "skip_first", "settings"):
            if m.get(name) != self.head[name]:
                raise FeatureStoreError(
                    f"the feature store {self.folder} was built with {name} = {m.get(name)!r}, this pass has "
                    f"{self.head[name]!r}; run with the store's settings, or write a new store with --out")
        n_old = m["n_contexts"]
        old = load_tensors(self.folder / TOKENS)["tokens"]
        if n_old and not torch.equal(old.long(), tokens[:n_old]):
            raise FeatureStoreError(f"the text of {self.folder} has changed since it was built (its tokens differ); "
                                    "write a new store with --out")
        done = {}
        for key_text, info in m["coders"].items():
            key = parse_key(key_text)
            if key in coders and info["fingerprint"] != _fingerprint(coders[key]):
                raise FeatureStoreError(
                    f"the coder of layer {key} changed since {self.folder}/{layer_folder(key)} was written; "
                    "remove that folder (or write a new store with --out) to start it again")
            done[key] = info["n_contexts"]
        return done

    def save(self, tokens: torch.Tensor, accs: dict[CoderKey, LayerAccumulator], coders: dict[CoderKey, SparseCoder],
             done: dict[CoderKey, int], n_contexts: int, loaded, *, all_coders: dict[CoderKey, SparseCoder],
             seconds: float) -> None:
        """Merge ``accs`` into the saved state of each coder and write every file atomically
        (the manifest last, so a crash leaves the previous store readable)."""
        from .weight_tables import weight_tables

        self.folder.mkdir(parents=True, exist_ok=True)
        m = self.manifest or {**self.head, "n_contexts": 0, "coders": {}}
        if n_contexts > m["n_contexts"]:
            atomic_save_tensors({"tokens": tokens[:n_contexts].int()}, self.folder / TOKENS)
            m["n_contexts"] = n_contexts
        if not (self.folder / VOCAB).exists():
            atomic_write_json(self.folder / VOCAB, vocab_strings(loaded.tokenizer), indent=None)
        per_layer = {k.layer: c for k, c in all_coders.items() if not k.variant}
        for key, acc in accs.items():
            sub = self.folder / layer_folder(key)
            sub.mkdir(parents=True, exist_ok=True)
            if done.get(key, 0) and (sub / ACTS).exists():
                old = LayerAccumulator.from_state(load_tensors(sub / ACTS))
                old.merge(acc)
                acc = old
            state = acc.state()
            state["quantiles"] = quantiles(acc.sample.val, acc.sample.tok, self.cfg.n_groups)
            state.update(cooccurrence_top(acc))
            atomic_save_tensors(state, sub / ACTS)
            coder = coders[key]
            if not (sub / WEIGHTS).exists():
                atomic_save_tensors(weight_tables(loaded.adapter, per_layer, key.layer, coder), sub / WEIGHTS)
            m["coders"][str(key)] = {"folder": layer_folder(key), "n_contexts": n_contexts, "n_tokens": acc.n_tokens,
                                     "d_sae": coder.cfg.d_sae, "kind": coder.cfg.kind, "fingerprint": _fingerprint(coder),
                                     "updated": time.strftime("%Y-%m-%dT%H:%M:%S"), "seconds": round(seconds, 1)}
            store = FeatureStore(self.folder, manifest=m)
            write_labels(store, key)
        atomic_write_json(self.folder / MANIFEST, m)


def write_labels(store: FeatureStore, key: CoderKey) -> Path:
    """LLM-free labels for every live feature of one coder (:func:`.labels.token_label` over
    its top examples: the token each fires on, the token before it, and the logits it
    promotes), written to ``labels.json`` as ``{"labels": {index: text}, "rules": {index:
    {"tokens", "context", "promotes"}}}`` (the rule reads a label back as a simulator).

    Works on whole tensors (no per-feature lookups): seconds for all features of a run.
    """
    from .labels import token_label

    tok = store.tensor(key, ACTS, "top_tok")  # [d_sae, k]
    val = store.tensor(key, ACTS, "top_val")
    T = store.manifest["ctx_len"]
    tokens = load_tensors(store.folder / TOKENS)["tokens"].long().flatten()
    live = tok[:, 0] >= 0
    flat = tok.clamp_min(0)
    peak = tokens[flat]
    prev = torch.where(flat % T > 0, tokens[(flat - 1).clamp_min(0)], -1)
    vocab = store.vocab
    has_logits = "logit_top_ids" in store._handle(key, WEIGHTS).keys()
    l_ids = store.tensor(key, WEIGHTS, "logit_top_ids").tolist() if has_logits else None
    l_sc = store.tensor(key, WEIGHTS, "logit_top_scores").tolist() if has_logits else None
    labels, rules = {}, {}
    tok_l, val_l, peak_l, prev_l = tok.tolist(), val.tolist(), peak.tolist(), prev.tolist()
    for i in live.nonzero().squeeze(1).tolist():
        examples = [Example([vocab[b] if b >= 0 else "", vocab[a]], [0.0, v], center=1)
                    for t, v, a, b in zip(tok_l[i], val_l[i], peak_l[i], prev_l[i]) if t >= 0]
        logits = None if l_ids is None or l_sc is None else [(vocab[j], sc) for j, sc in zip(l_ids[i], l_sc[i])]
        lab = token_label(examples, logits)
        labels[str(i)] = lab.text
        rules[str(i)] = {"tokens": list(lab.tokens), "context": list(lab.context), "promotes": list(lab.promotes)}
    path = store.folder / layer_folder(key) / LABELS
    atomic_write_text(path, json.dumps({"d_sae": int(tok.shape[0]), "labels": labels, "rules": rules},
                                       ensure_ascii=False))
    store._labels.pop(key, None)
    return path


# ---------------------------------------------------------------------------------------- reading
def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file. Raises FeatureStoreError when it is unreadable."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types
        raise FeatureStoreError(f"{path} is unreadable ({exc}); run `transcoders features` again") from exc


def read_manifest(folder: Path) -> dict:
    path = Path(folder) / MANIFEST
    try:
        m = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise FeatureStoreError(f"{path} is missing or unreadable ({exc}); is {folder} a feature store? "
                                "Build one with `transcoders features RUN_DIR`") from exc
    if m.get("format") != FORMAT or m.get("format_version") != FORMAT_VERSION:
        raise FeatureStoreError(f"{path} is not a version-{FORMAT_VERSION} feature store")
    return m


@dataclass
class FeatureRecord:
    """Everything the store knows of one feature.

    Activations are in the coder's units; ``frequency`` is per counted token (the attention
    sink / BOS positions are not counted: ``sink_count`` and ``sink_max`` are theirs);
    ``hist`` counts activations in the bins ``hist_edges`` (log-spaced); ``quantiles`` are the
    ``n_groups + 1`` quantiles of the sampled activations. ``logit_top`` / ``logit_bottom``
    are (token, logit per unit of activation); ``deembedding`` (token, score); ``pullback``
    (feature of the previous layer, virtual weight); ``ov_heads`` (layer, head, score);
    ``neighbours`` (feature, decoder cosine); ``cooccurring`` (feature, Jaccard, count).
    """

    layer: int
    index: int
    variant: str
    n_tokens: int
    count: int
    sum: float
    max: float
    sink_count: int
    sink_max: float
    hist: list[int]
    hist_edges: list[float]
    quantiles: list[float]
    top: list[Example] = field(default_factory=list)
    samples: list[Example] = field(default_factory=list)
    logit_top: list[tuple[str, float]] = field(default_factory=list)
    logit_bottom: list[tuple[str, float]] = field(default_factory=list)
    deembedding: list[tuple[str, float]] = field(default_factory=list)
    pullback: list[tuple[int, float]] = field(default_factory=list)
    ov_heads: list[tuple[int, int, float]] = field(default_factory=list)
    neighbours: list[tuple[int, float]] = field(default_factory=list)
    cooccurring: list[tuple[int, float, int]] = field(default_factory=list)
    label: str | None = None

    @property
    def frequency(self) -> float:
        """Firing frequency per counted token."""
        return self.count / max(self.n_tokens, 1)

    @property
    def mean(self) -> float:
        """Mean activation over the tokens where it fires (0 if it never does)."""
        return self.sum / self.count if self.count else 0.0

    @property
    def sink_only(self) -> bool:
        """Fires at the excluded positions (attention sink / BOS) and nowhere else."""
        return self.count == 0 and self.sink_count > 0

    def quantile_groups(self) -> list[list[Example]]:
        """The sampled examples split into ``len(quantiles) - 1`` groups of equal size by
        activation, lowest first (delphi / SAEDashboard quantile examples)."""
        n_groups = max(1, len(self.quantiles) - 1)
        ordered = sorted(self.samples, key=lambda e: e.acts[e.center])
        groups: list[list[Example]] = [[] for _ in range(n_groups)]
        for i, ex in enumerate(ordered):
            groups[i * n_groups // max(1, len(ordered))].append(ex)
        return groups


class FeatureStore:
    """Read a feature store (see the module docstring for the layout).

    Raises:
        FeatureStoreError: the folder is not a store, or a file is missing or corrupt.
    """

    def __init__(self, folder: str | Path, *, manifest: dict | None = None):
        self.folder = Path(folder)
        self.manifest = manifest if manifest is not None else read_manifest(self.folder)
        self._handles: dict[tuple[CoderKey, str], Any] = {}
        self._names: dict[tuple[CoderKey, str], set[str]] = {}
        self._vocab: list[str] | None = None
        self._tokens = None
        self._labels: dict[CoderKey, dict] = {}

    @property
    def keys(self) -> list[CoderKey]:
        """The coders the store covers, by layer then variant."""
        return sorted(parse_key(k) for k in self.manifest["coders"])

    def info(self, key: CoderKey) -> dict:
        try:
            return self.manifest["coders"][str(key)]
        except KeyError:
            raise FeatureStoreError(f"the store {self.folder} has no layer {key}; it has "
                                    f"{', '.join(map(str, self.keys)) or 'none'} (run `transcoders features` for it)") from None

    def d_sae(self, key: CoderKey) -> int:
        return int(self.info(key)["d_sae"])

    @property
    def vocab(self) -> list[str]:
        if self._vocab is None:
            self._vocab = list(json.loads((self.folder / VOCAB).read_text()))
        return self._vocab

    def token_text(self, ids) -> list[str]:
        vocab = self.vocab
        return [vocab[int(i)] if 0 <= int(i) < len(vocab) else f"<{int(i)}>" for i in ids]

    def _handle(self, key: CoderKey, name: str):
        h = self._handles.get((key, name))
        if h is None:
            path = self.folder / self.info(key)["folder"] / name
            if not path.exists():
                raise FeatureStoreError(f"{path} is missing; run `transcoders features` again")
            h = self._handles[(key, name)] = safe_open(str(path), framework="pt")
        return h

    def tensor(self, key: CoderKey, file: str, name: str) -> torch.Tensor:
        """A whole tensor of one of a coder's files."""
        return self._handle(key, file).get_tensor(name)

    def _row(self, key: CoderKey, file: str, name: str, index: int) -> torch.Tensor | None:
        names = self._names.get((key, file))
        if names is None:
            names = self._names[(key, file)] = set(self._handle(key, file).keys())
        if name not in names:
            return None
        return self._handle(key, file).get_slice(name)[index: index + 1][0]

    def _token_rows(self):
        if self._tokens is None:
            self._tokens = safe_open(str(self.folder / TOKENS), framework="pt").get_slice("tokens")
        return self._tokens

    def window_tokens(self, ctx: int, start: int, length: int) -> list[int]:
        """Token ids of positions ``[start, start + length)`` of context ``ctx`` (clipped)."""
        T = self.manifest["ctx_len"]
        lo, hi = max(0, start), min(T, start + length)
        return self._token_rows()[ctx: ctx + 1, lo:hi][0].tolist()

    def _examples(self, key: CoderKey, prefix: str, index: int, kind) -> list[Example]:
        toks = self._row(key, ACTS, f"{prefix}_tok", index)
        wins = self._row(key, ACTS, f"{prefix}_win", index)
        assert toks is not None and wins is not None
        s = self.manifest["settings"]
        before, T = s["before"], self.manifest["ctx_len"]
        out = []
        for t, w in zip(toks.tolist(), wins.tolist()):
            if t < 0:
                continue
            ctx, pos = divmod(t, T)
            lo = max(0, pos - before)
            ids = self.window_tokens(ctx, lo, pos + s["after"] + 1 - lo)
            acts = w[lo - (pos - before): lo - (pos - before) + len(ids)]
            out.append(Example(self.token_text(ids), acts, kind=kind, center=pos - lo, token_ids=ids, where=(ctx, pos)))
        return out

    def labels(self, key: CoderKey) -> dict:
        if key not in self._labels:
            path = self.folder / self.info(key)["folder"] / LABELS
            self._labels[key] = json.loads(path.read_text()) if path.exists() else {"labels": {}, "rules": {}}
        return self._labels[key]

    def labels_for(self, fingerprints: dict[int, str]) -> tuple[dict[int, dict[str, str]], list[int]]:
        """The labels of the store's coders that are the given coders.

        Args:
            fingerprints: ``{layer: fingerprint}`` of the coders in use (``coders_fingerprint({0:
                coder})``, as a graph's ``meta["layer_fingerprints"]`` records them).

        Returns:
            ``({layer: {str(feature): label}}, stale)``: labels for every layer whose stored
            fingerprint matches; ``stale`` lists the layers the store holds for other weights
            (their labels would describe other features, so none are returned).
        """
        labels, stale = {}, []
        for key in self.keys:
            if key.variant or key.layer not in fingerprints:
                continue
            if self.info(key).get("fingerprint") != fingerprints[key.layer]:
                stale.append(key.layer)
                continue
            labels[key.layer] = self.labels(key)["labels"]
        return labels, stale

    def feature(self, layer: int, index: int, variant: str = "", *, examples=("top", "sample")) -> FeatureRecord:
        """Everything about feature ``index`` of the coder at ``layer`` (and ``variant``).

        Raises:
            FeatureStoreError: no such layer in the store, or ``index`` out of range.
        """
        key = CoderKey(layer, variant)
        d = self.d_sae(key)
        if not 0 <= index < d:
            raise FeatureStoreError(f"feature {index} is out of range: layer {key} has {d} features (0..{d - 1})")
        row = lambda name: self._row(key, ACTS, name, index)
        wrow = lambda name: self._row(key, WEIGHTS, name, index)
        toks = lambda ids, scores: [] if ids is None or scores is None else list(
            zip(self.token_text(ids.tolist()), scores.tolist()))
        pb_ids, pb_sc = wrow("pullback_ids"), wrow("pullback_scores")
        ov_h, ov_s = wrow("ov_heads"), wrow("ov_scores")
        nb_ids, nb_cos = wrow("neighbour_ids"), wrow("neighbour_cos")
        c_ids, c_j, c_n = row("cooc_top_ids"), row("cooc_top_jaccard"), row("cooc_top_count")
        assert c_ids is not None and c_j is not None and c_n is not None
        rec = FeatureRecord(
            layer=layer, index=index, variant=variant, n_tokens=int(self.info(key)["n_tokens"]),
            count=int(row("count")), sum=float(row("sum")), max=float(row("max")),  # type: ignore[arg-type]
            sink_count=int(row("sink_count")), sink_max=float(row("sink_max")),  # type: ignore[arg-type]
            hist=row("hist").tolist(), hist_edges=HIST_EDGES.tolist(),  # type: ignore[union-attr]
            quantiles=row("quantiles").tolist(),  # type: ignore[union-attr]
            logit_top=toks(wrow("logit_top_ids"), wrow("logit_top_scores")),
            logit_bottom=toks(wrow("logit_bottom_ids"), wrow("logit_bottom_scores")),
            deembedding=toks(wrow("deemb_top_ids"), wrow("deemb_top_scores")),
            pullback=[] if pb_ids is None or pb_sc is None else list(zip(pb_ids.tolist(), pb_sc.tolist())),
            ov_heads=[] if ov_h is None or ov_s is None else [(a, h, s) for (a, h), s in zip(ov_h.tolist(), ov_s.tolist())],
            neighbours=[] if nb_ids is None or nb_cos is None else list(zip(nb_ids.tolist(), nb_cos.tolist())),
            cooccurring=[(i, j, n) for i, j, n in zip(c_ids.tolist(), c_j.tolist(), c_n.tolist()) if n > 0],
            label=self.labels(key)["labels"].get(str(index)),
        )
        if "top" in examples:
            rec.top = self._examples(key, "top", index, "top")
        if "sample" in examples:
            rec.samples = self._examples(key, "sample", index, "quantile")
            groups = rec.quantile_groups()
            rec.samples = [Example(e.tokens, e.acts, "quantile", g, e.center, e.token_ids, e.where)
                           for g, group in enumerate(groups) for e in group]
        return rec

    # ------------------------------------------------------------------ non-activating examples
    def _random(self, key: CoderKey) -> dict[str, torch.Tensor]:
        cache = getattr(self, "_rand_cache", {})
        if key not in cache:
            names = ("rand_ctx", "rand_start", "entry_win", "entry_off", "entry_feat", "entry_val", "feat_ptr")
            cache[key] = {n: self.tensor(key, ACTS, n) for n in names}
            self._rand_cache = cache
        return cache[key]

    def _windows_firing(self, key: CoderKey, feature: int) -> torch.Tensor:
        r = self._random(key)
        lo, hi = int(r["feat_ptr"][feature]), int(r["feat_ptr"][feature + 1])
        return torch.unique(r["entry_win"][lo:hi])

    def _random_example(self, key: CoderKey, w: int, kind, feature: int) -> Example:
        r = self._random(key)
        ctx, start = int(r["rand_ctx"][w]), int(r["rand_start"][w])
        s = self.manifest["settings"]
        ids = self.window_tokens(ctx, start, s["before"] + 1 + s["after"])
        lo, hi = int(r["feat_ptr"][feature]), int(r["feat_ptr"][feature + 1])
        acts = [0.0] * len(ids)
        sel = r["entry_win"][lo:hi] == w
        for off, v in zip(r["entry_off"][lo:hi][sel].tolist(), r["entry_val"][lo:hi][sel].tolist()):
            acts[off] = v
        return Example(self.token_text(ids), acts, kind=kind, center=s["before"], token_ids=ids, where=(ctx, start + s["before"]))

    def random_examples(self, layer: int, index: int, n: int, variant: str = "", *, seed: int = 0) -> list[Example]:
        """``n`` random windows where the feature is silent on every token (seeded choice)."""
        key = CoderKey(layer, variant)
        n_windows = self._random(key)["rand_ctx"].numel()
        silent = torch.ones(n_windows, dtype=torch.bool)
        silent[self._windows_firing(key, index)] = False
        pool = silent.nonzero().squeeze(1)
        pick = pool[torch.randperm(pool.numel(), generator=torch.Generator().manual_seed(seed + index))[:n]]
        return [self._random_example(key, int(w), "random", index) for w in pick.sort().values]

    def near_misses(self, layer: int, index: int, n: int, variant: str = "", *, seed: int = 0) -> list[Example]:
        """Up to ``n`` random windows where one of the feature's decoder neighbours fires and the
        feature itself is silent (harder negatives than random windows)."""
        key = CoderKey(layer, variant)
        nb = self._row(key, WEIGHTS, "neighbour_ids", index)
        own = set(self._windows_firing(key, index).tolist())
        pool: list[int] = []
        for j in [] if nb is None else nb.tolist():
            pool += [w for w in self._windows_firing(key, j).tolist() if w not in own and w not in pool]
        g = torch.Generator().manual_seed(seed + index)
        pick = [pool[i] for i in torch.randperm(len(pool), generator=g)[:n].tolist()]
        return [self._random_example(key, w, "near_miss", index) for w in sorted(pick)]
