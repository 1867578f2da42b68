"""Export the feature store as circuit-tracer's per-feature JSON files, so that clicking a
feature node of a graph written by :func:`transcoders.circuits.export.save_graph` in
circuit-tracer's frontend shows that feature's examples, output tokens and histogram.

The format
----------
One JSON object per feature, the ``Model`` of circuit-tracer's
``circuit_tracer/frontend/feature_models.py`` (mirrored by :class:`CircuitTracerFeature`).
How each field is read was taken from the frontend's JavaScript
(``circuit_tracer/frontend/assets/``; safety-research/circuit-tracer at d797c82 and 196e2ce):

``transcoder_id`` (str), ``index`` (int)
    Not read by the frontend. We write the transcoder set's name (model / run folder) and the
    frontend feature id ``cantor(layer, index)`` the file is named by (below).
``examples_quantiles``: list of ``{quantile_name: str, examples: [example]}``
    ``feature_examples/init-feature-examples-list.js`` draws each group in order under its
    ``quantile_name``. An example is ``{tokens: [str], tokens_acts_list: [float],
    train_token_ind: int, is_repeated_datapoint: bool}``: the window's tokens as text, the
    activation on each (a token is coloured when its activation is non-zero), the index in the
    window of the token the example was chosen for (the line is centred on it), and whether it
    repeats an example shown above (drawn faded). Our groups: the top examples, then the
    quantile groups of the sampled activating examples (:meth:`.FeatureRecord.quantile_groups`),
    highest first, then random windows where the feature is silent.
``top_logits``, ``bottom_logits``: list of str
    ``feature_examples/init-feature-examples-logits.js`` prints them as tokens (no scores).
``act_min``, ``act_max``: float
    The domain of the colour scale of example tokens (``init-feature-examples.js``) and the
    x range of the histogram (``attribution_graph/render-act-histogram.js``). We write
    ``0`` (silence) and the feature's largest activation, so the weakest activation is still
    coloured and the histogram starts at 0.
``quantile_values``: list of float
    ``render-act-histogram.js`` labels a node's activation ``Npct`` with ``N = i + 1`` for the
    first ``i`` where ``activation <= quantile_values[i]`` (100 above the last): the values are
    the activation at percentiles 1, 2, ..., 100. We compute these 100 from the feature's
    sampled activations with the interpolation of the store's own ``quantiles`` (which they
    equal at the group boundaries), exact when the feature fired at most ``n_samples`` times.
``histogram``: list of float
    Drawn as ``len(histogram)`` bars of equal width between ``act_min`` and ``act_max`` (the
    node's activation is marked at bin ``floor((act - act_min) / (act_max - act_min) * n)``).
    The store counts activations in 64 log-spaced bins (:data:`.accumulate.HIST_EDGES`); we
    spread each log bin's count over :data:`HISTOGRAM_BINS` linear bins on ``[0, act_max]``,
    uniformly in log(activation) within the log bin (whose upper end is clipped at the
    feature's max), so the counts still sum to the feature's firing count.
``activation_frequency``: float
    Shown as a percentage: firing count per counted token (:attr:`.FeatureRecord.frequency`).

Where the frontend looks
------------------------
A feature node of a graph has ``feature = cantor(layer, index)`` (``(a + b)(a + b + 1)/2 + b``,
as :func:`transcoders.circuits.export.graph_to_json` and circuit-tracer's ``graph_models.py``
write it). ``init-feature-examples.js`` loads it from ``./features/<scan>/<feature>.json``
where ``scan`` is the graph's ``metadata.scan`` (the per-layer ``transcoder_list`` entry when
the scan starts with ``custom-``), or from ``<scan>/<feature>.json`` when the scan starts with
``./``. So :func:`export_circuit_tracer` writes ``OUT/<scan>/<cantor(layer, index)>.json``:

- served as ``/features/`` by a static server (or circuit-tracer's ``serve(features_dir=OUT)``),
  a graph whose ``metadata.scan`` is ``<scan>`` finds its features. circuit-tracer's own
  ``util.js`` redirects ``./features/`` to Anthropic's CDN, so with its frontend unchanged use:
- ``OUT = <data_dir>/features`` and save the graph with ``scan="./data/features/<scan>"``:
  circuit-tracer's local server maps ``/data/`` to its ``data_dir``.

The default ``scan`` is what ``save_graph`` writes by default for a graph of the store's model
(its name), when that name is a plain relative name; otherwise (a local path) its last part,
and the graph must then be saved with that ``scan``. A scan starting with ``/`` makes newer
frontends load features from a binary index instead, so it is refused.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict

from ..circuits.export import _cantor
from ..coders.run_folder import CoderKey
from ..files import atomic_write_json, refuse_to_replace
from .examples import Example
from .store import ACTS, FeatureStore, FeatureStoreError

HISTOGRAM_BINS = 50
"""Linear bins of the exported histogram (the frontend takes any number)."""
PERCENTILES = 100
"""``quantile_values`` holds the activation at percentiles 1..100 (see the module docstring)."""


# ---------------------------------------------------------------------------------------- format
# Taken from circuit-tracer's circuit_tracer/frontend/feature_models.py (Example, ExamplesQuantile,
# Model; field names, types and order as there), as read by circuit_tracer/frontend/assets/
# feature_examples/init-feature-examples{,-list,-logits}.js and attribution_graph/render-act-histogram.js.
# Stricter than the original: no other fields, no NaN or infinity (browsers reject them in JSON).
_STRICT = ConfigDict(extra="forbid", allow_inf_nan=False)


class CircuitTracerExample(BaseModel):
    """One context window (circuit-tracer's ``Example``)."""

    model_config = _STRICT

    tokens_acts_list: list[float]
    train_token_ind: int
    is_repeated_datapoint: bool
    tokens: list[str]


class CircuitTracerExamplesQuantile(BaseModel):
    """A titled group of examples (circuit-tracer's ``ExamplesQuantile``)."""

    model_config = _STRICT

    quantile_name: str
    examples: list[CircuitTracerExample]


class CircuitTracerFeature(BaseModel):
    """One feature file (circuit-tracer's ``Model`` in ``frontend/feature_models.py``)."""

    model_config = _STRICT

    transcoder_id: str
    index: int
    examples_quantiles: list[CircuitTracerExamplesQuantile]
    top_logits: list[str]
    bottom_logits: list[str]
    act_min: float
    act_max: float
    quantile_values: list[float]
    histogram: list[float]
    activation_frequency: float


def circuit_tracer_feature_schema() -> dict:
    """The JSON Schema of one feature file (from :class:`CircuitTracerFeature`)."""
    return CircuitTracerFeature.model_json_schema()


def feature_id(layer: int, index: int) -> int:
    """The frontend's id of feature ``index`` of ``layer``: the Cantor pairing graphs use for
    a feature node's ``feature``, and the name of its file."""
    return _cantor(layer, index)


# ---------------------------------------------------------------------------------------- pieces
def linear_histogram(counts: list[int], edges: list[float], act_max: float, n_bins: int = HISTOGRAM_BINS) -> list[float]:
    """Counts over log-spaced bins ``edges`` (``len(counts) + 1`` of them; the first bin also
    holds what lies below ``edges[0]``, the last what lies above ``edges[-1]``) re-binned into
    ``n_bins`` equal bins on ``[0, act_max]``, each log bin's count spread uniformly in
    log(activation) over its part below ``act_max``. The result sums to ``sum(counts)``."""
    c = torch.tensor(counts, dtype=torch.float64)
    if act_max <= 0 or not bool((c > 0).any()):
        return [0.0] * n_bins
    e = torch.tensor(edges, dtype=torch.float64)
    lo = e[:-1].clone()
    hi = torch.minimum(e[1:], torch.tensor(act_max, dtype=torch.float64))
    hi[-1] = act_max  # the last bin is open above
    lin = torch.linspace(0.0, act_max, n_bins + 1, dtype=torch.float64)
    a, b = lin[:-1][None, :], lin[1:][None, :]
    ov_lo, ov_hi = torch.maximum(a, lo[:, None]), torch.minimum(b, hi[:, None])
    spread = hi > lo
    share = torch.where(ov_hi > ov_lo, (ov_hi.clamp_min(1e-300).log() - ov_lo.clamp_min(1e-300).log())
                        / (hi.log() - lo.log()).clamp_min(1e-300)[:, None], 0.0)
    share[~spread] = 0.0
    out = (c[:, None] * share).sum(0)
    # bins whose support is empty (all of it above act_max: float rounding at the max, or tiny
    # values below edges[0] when act_max < edges[0]) go where act_max lies: the last bin
    out[-1] += float(c[~spread].sum())
    return out.tolist()


def percentile_values(values: list[float], n: int = PERCENTILES) -> list[float]:
    """The activation at percentiles ``1/n .. n/n`` of ``values`` (linear interpolation, as
    :func:`.store.quantiles`); empty when there are none."""
    if not values:
        return []
    q = torch.arange(1, n + 1, dtype=torch.float64) / n
    return torch.quantile(torch.tensor(values, dtype=torch.float64), q).tolist()


def _spread_pick(group: list[Example], n: int) -> list[Example]:
    """Up to ``n`` examples of a group sorted by activation, evenly spread over it, highest first."""
    if n <= 0 or not group:
        return []
    if len(group) <= n:
        picked = list(group)
    elif n == 1:
        picked = [group[len(group) // 2]]
    else:
        picked = [group[round(i * (len(group) - 1) / (n - 1))] for i in range(n)]
    return sorted(picked, key=lambda e: -e.acts[e.center])


def _example_json(ex: Example, seen: set[tuple[int, int]]) -> dict:
    repeated = ex.where in seen and ex.where != (-1, -1)
    seen.add(ex.where)
    return {"tokens_acts_list": [float(a) for a in ex.acts], "train_token_ind": int(ex.center),
            "is_repeated_datapoint": bool(repeated), "tokens": list(ex.tokens)}


# ---------------------------------------------------------------------------------------- one feature
def circuit_tracer_feature(store: FeatureStore, layer: int, index: int, *, transcoder_id: str, n_per_group: int = 5,
                           n_top: int | None = None, n_random: int | None = None, variant: str = "") -> dict:
    """Feature ``index`` of ``layer`` as circuit-tracer's feature JSON (see the module docstring).

    Args:
        transcoder_id: written as the file's ``transcoder_id``.
        n_per_group: examples shown per quantile group (spread over the group's activations).
        n_top: top examples shown (default: every one the store keeps).
        n_random: random windows where the feature is silent, shown last (default
            ``n_per_group``; 0 for none).
        variant: the coder variant (the frontend's ids cannot tell variants apart).

    Raises:
        FeatureStoreError: no such layer, or ``index`` out of range.
        pydantic.ValidationError: a value is not finite (a damaged store).
    """
    rec = store.feature(layer, index, variant)
    seen: set[tuple[int, int]] = set()
    groups: list[dict] = []
    top = rec.top if n_top is None else rec.top[:max(0, n_top)]
    if top:
        groups.append({"quantile_name": "Top activations", "examples": [_example_json(e, seen) for e in top]})
    quantile_groups = rec.quantile_groups()
    n_groups = len(quantile_groups)
    for g in reversed(range(n_groups)):
        picked = _spread_pick(quantile_groups[g], n_per_group)
        if not picked:
            continue
        acts = [e.acts[e.center] for e in quantile_groups[g]]
        name = f"Quantile group {g + 1} of {n_groups} (activations {min(acts):.3g} to {max(acts):.3g})"
        groups.append({"quantile_name": name, "examples": [_example_json(e, seen) for e in picked]})
    n_rand = n_per_group if n_random is None else n_random
    if n_rand > 0:
        silent = store.random_examples(layer, index, n_rand, variant)
        if silent:
            groups.append({"quantile_name": "Random windows where the feature is silent",
                           "examples": [_example_json(e, seen) for e in silent]})
    act_max = rec.max if rec.max > 0 else 1.0  # a dead feature: any non-empty range
    obj = {
        "transcoder_id": transcoder_id,
        "index": feature_id(layer, index),
        "examples_quantiles": groups,
        "top_logits": [t for t, _ in rec.logit_top],
        "bottom_logits": [t for t, _ in rec.logit_bottom],
        "act_min": 0.0,
        "act_max": float(act_max),
        "quantile_values": percentile_values([e.acts[e.center] for e in rec.samples]),
        "histogram": linear_histogram(rec.hist, rec.hist_edges, rec.max),
        "activation_frequency": float(rec.frequency),
    }
    CircuitTracerFeature.model_validate(obj)
    return obj


# ---------------------------------------------------------------------------------------- names
_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*(/[A-Za-z0-9_][A-Za-z0-9._-]*)*")


def default_scan(store: FeatureStore) -> str:
    """The scan (folder) name of a store's features: its model's name, which is what
    ``save_graph`` writes as ``metadata.scan`` for that model's graphs by default, when it is a
    plain relative name (``HuggingFaceTB/SmolLM2-135M``); for a local path, its last part."""
    model = str(store.manifest.get("model") or "")
    if _SAFE_NAME.fullmatch(model):
        return model
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(model.rstrip("/\\")).name).strip(".-")
    return name or "transcoders"


def default_transcoder_id(store: FeatureStore) -> str:
    """``<scan>/<run folder name>``: the store's folder is ``RUN/features`` by default, else its
    own name stands for the run."""
    folder = store.folder.resolve()
    run = folder.parent.name if folder.name == "features" else folder.name
    return f"{default_scan(store)}/{run}"


def _check_scan(scan: str) -> str:
    if not _SAFE_NAME.fullmatch(scan):
        raise ValueError(
            f"scan {scan!r} cannot be a folder name: use letters, digits, '.', '_', '-' and '/' between parts, "
            "no part starting with '.' and no leading '/' (for circuit-tracer's local server, export to "
            "<data_dir>/features with scan NAME and save the graph with scan './data/features/NAME')")
    return scan


def feature_path(out_dir: str | Path, scan: str, layer: int, index: int) -> Path:
    """Where the frontend looks for a feature of a graph whose scan is ``scan``, with
    ``out_dir`` served as ``./features/``."""
    return Path(out_dir) / _check_scan(scan) / f"{feature_id(layer, index)}.json"


# ---------------------------------------------------------------------------------------- export
def export_circuit_tracer(store: FeatureStore, out_dir: str | Path, *, transcoder_id: str | None = None,
                          layers: Iterable[int] | None = None, features: Iterable[int | tuple[int, int]] | None = None,
                          force: bool = False, scan: str | None = None, variant: str = "", n_per_group: int = 5,
                          n_random: int | None = None) -> list[Path]:
    """Write one circuit-tracer feature file per feature: ``out_dir/<scan>/<cantor(layer, index)>.json``.

    Args:
        transcoder_id: the files' ``transcoder_id`` (default :func:`default_transcoder_id`).
        layers: the layers to export (default: every layer the store has for ``variant``).
        features: feature indices (taken in each exported layer) or ``(layer, index)`` pairs
            (those of ``layers`` only, when given); default: every live feature. Features
            listed here are exported even if they never fired; otherwise dead ones are skipped.
        force: replace files that exist (otherwise nothing is written if any exists).
        scan: the graph's ``metadata.scan`` the files are for (default :func:`default_scan`).
        variant, n_per_group, n_random: see :func:`circuit_tracer_feature`.

    Returns:
        the paths written, in (layer, index) order.

    Raises:
        FeatureStoreError: a layer the store lacks, or an index out of range.
        OutputExistsError: a file exists and ``force`` is not set (nothing was written).
        ValueError: a ``scan`` that cannot be a folder name.
    """
    scan = _check_scan(scan if scan is not None else default_scan(store))
    tid = transcoder_id if transcoder_id is not None else default_transcoder_id(store)
    available = [k.layer for k in store.keys if k.variant == variant]
    wanted = sorted(set(layers)) if layers is not None else available
    for layer in wanted:
        store.info(CoderKey(layer, variant))  # raises for a layer the store lacks
    jobs: list[tuple[int, int]] = []
    listed = None if features is None else list(features)
    for layer in wanted:
        key = CoderKey(layer, variant)
        d = store.d_sae(key)
        if listed is None:
            count = store.tensor(key, ACTS, "count")
            idx = (count > 0).nonzero().flatten().tolist()
        else:
            idx = sorted({int(f) for f in listed if not isinstance(f, tuple)}
                         | {int(f[1]) for f in listed if isinstance(f, tuple) and int(f[0]) == layer})
        for i in idx:
            if not 0 <= i < d:
                raise FeatureStoreError(f"feature {i} is out of range: layer {key} has {d} features (0..{d - 1})")
            jobs.append((layer, i))
    if listed is not None:
        missing = sorted({int(f[0]) for f in listed if isinstance(f, tuple)} - set(wanted))
        if missing and layers is None:
            store.info(CoderKey(missing[0], variant))  # a pair names a layer the store lacks: raise
    paths = [feature_path(out_dir, scan, layer, i) for layer, i in jobs]
    for p in paths:
        refuse_to_replace(p, force)
    for (layer, i), p in zip(jobs, paths):
        obj = circuit_tracer_feature(store, layer, i, transcoder_id=tid, n_per_group=n_per_group, n_random=n_random,
                                     variant=variant)
        atomic_write_json(p, obj, indent=None)
    return paths


__all__ = ["HISTOGRAM_BINS", "CircuitTracerExample", "CircuitTracerExamplesQuantile", "CircuitTracerFeature",
           "circuit_tracer_feature", "circuit_tracer_feature_schema", "default_scan", "default_transcoder_id",
           "export_circuit_tracer", "feature_id", "feature_path", "linear_histogram", "percentile_values"]
