"""Write an evaluation to a run folder: ``metrics.json``, ``summary.md``, ``feature_density.png``."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..files import atomic_savefig, atomic_write_bytes

METRICS = "metrics.json"
SUMMARY = "summary.md"
DENSITY_PLOT = "feature_density.png"


def plot_feature_density(frequencies: dict[str, torch.Tensor], path: Path) -> Path:
    """Histogram of log10 firing frequency per feature, one panel per layer; dead features
    (frequency 0) are counted in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(frequencies), 1, figsize=(7, 2.6 * len(frequencies)), squeeze=False)
    for ax, (layer, freq) in zip(axes[:, 0], frequencies.items()):
        live = freq[freq > 0]
        if len(live):
            ax.hist(live.log10().numpy(), bins=60, color="#3b6ea8")
        ax.set_title(f"layer {layer}: {len(live)} live, {int((freq == 0).sum())} dead of {len(freq)} features")
        ax.set_xlabel("log10 firing frequency on eval tokens")
        ax.set_ylabel("features")
    fig.tight_layout()
    try:
        atomic_savefig(fig, path, dpi=110)
    finally:
        plt.close(fig)
    return path


def summary_text(metrics: dict, header: str = "") -> str:
    """A short human-readable table of the per-layer metrics."""
    lines = [f"# Evaluation{(' - ' + header) if header else ''}", "",
             f"Evaluation tokens: {metrics['eval_tokens']:,}. Cross-entropy in nats/token. Dead (training): no "
             f"activation in the last {_window(metrics)} training tokens; silent (eval): no activation on the "
             f"evaluation tokens (too few tokens to call a rare feature dead).", "",
             "| layer | L0 | FVU | dead (training) | silent (eval) | dense | CE clean | CE spliced | CE zero-abl. | "
             "CE mean-abl. | loss recovered | KL |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for layer, m in metrics["layers"].items():
        dead = "n/a" if m.get("dead_in_training") is None else f"{m['dead_in_training']:.1%}"
        lines.append(
            f"| {layer} | {m['l0']:.1f} | {m['fvu']:.3f} | {dead} | {m['dead_fraction']:.1%} | {m['dense_fraction']:.1%} | "
            f"{m['ce_clean']:.4f} | {m['ce_spliced']:.4f} | {m['ce_zero_ablation']:.4f} | {m['ce_mean_ablation']:.4f} | "
            f"{'n/a' if m['ce_loss_recovered'] is None else format(m['ce_loss_recovered'], '.3f')} | {m['kl']:.4f} |"
        )
    together = metrics.get("spliced_together")
    if together:
        lines += ["", f"## All {len(together['layers'])} coders spliced at once (layers {_ranges(together['layers'])})", "",
                  "| CE clean | CE spliced | CE increase | KL | CE zero-abl. | CE mean-abl. | recovered vs zero | "
                  "recovered vs mean |", "|---|---|---|---|---|---|---|---|",
                  f"| {together['ce_clean']:.4f} | {together['ce_spliced']:.4f} | {together['ce_increase']:+.4f} | "
                  f"{together['kl']:.4f} | {together['ce_zero_ablation']:.4f} | {together['ce_mean_ablation']:.4f} | "
                  f"{_frac(together['loss_recovered_vs_zero'])} | {_frac(together['loss_recovered_vs_mean'])} |"]
        if together["leave_one_out"]:
            lines += ["", "What each layer's coder adds on top of all the others (CE spliced minus CE with every "
                      "coder but that one):", "", "| layer | CE without it | CE added | KL without it |", "|---|---|---|---|"]
            lines += [f"| {layer} | {m['ce_without']:.4f} | {m['ce_added']:+.4f} | {m['kl_without']:.4f} |"
                      for layer, m in together["leave_one_out"].items()]
    for label, m in (metrics.get("by_source") or {}).items():
        lines += ["", f"## {label} alone ({m['eval_tokens']:,} tokens)", "",
                  "| layer | L0 | FVU | CE spliced | loss recovered | KL |", "|---|---|---|---|---|---|"]
        lines += [f"| {layer} | {x['l0']:.1f} | {x['fvu']:.3f} | {x['ce_spliced']:.4f} | {_frac(x['ce_loss_recovered'])} | "
                  f"{x['kl']:.4f} |" for layer, x in m["layers"].items()]
        if m.get("spliced_together"):
            t = m["spliced_together"]
            lines += ["", f"All at once: CE {t['ce_clean']:.4f} -> {t['ce_spliced']:.4f} ({t['ce_increase']:+.4f}), "
                      f"KL {t['kl']:.4f}"]
    return "\n".join(lines) + "\n"


def _window(metrics: dict) -> str:
    windows = sorted({m["dead_window"] for m in metrics["layers"].values() if m.get("dead_window")})
    return "/".join(f"{w:,}" for w in windows) or "n/a"


def _frac(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _ranges(layers: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``0-2, 5``."""
    out, start = [], None
    for i, x in enumerate(layers):
        start = x if start is None else start
        if i + 1 == len(layers) or layers[i + 1] != x + 1:
            out.append(str(x) if start == x else f"{start}-{x}")
            start = None
    return ", ".join(out)


def write_report(run_dir: str | Path, metrics: dict, extra: dict | None = None, header: str = "") -> Path:
    """Write ``metrics.json`` (the JSON part of ``metrics`` plus ``extra``), ``summary.md`` and
    the density plot into ``run_dir`` (each atomically); return the path of ``summary.md``."""
    run_dir = Path(run_dir)
    data = {k: v for k, v in metrics.items() if k != "feature_frequency"}
    data.update(extra or {})
    atomic_write_bytes(run_dir / METRICS, json.dumps(data, indent=2).encode())
    text = summary_text(metrics, header)
    if "feature_frequency" in metrics:
        plot_feature_density(metrics["feature_frequency"], run_dir / DENSITY_PLOT)
        text += f"\n![feature density]({DENSITY_PLOT})\n"
    if extra:
        text += "\n```\n" + json.dumps(extra, indent=2) + "\n```\n"
    atomic_write_bytes(run_dir / SUMMARY, text.encode())
    return run_dir / SUMMARY
