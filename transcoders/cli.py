"""Command-line interface: ``transcoders train | evaluate | convert | demo``, the circuit
commands ``trace | paths | intervene | verify | qk`` (in :mod:`transcoders.circuit_cli`),
``benchmark-faithfulness`` (:mod:`transcoders.faithfulness_cli`), ``task make | trace``
(:mod:`transcoders.task_cli`), the feature
commands (:mod:`transcoders.features_cli`) and the viewer's ``serve | export-html``
(:mod:`transcoders.viewer_cli`)."""

from __future__ import annotations

import json
from pathlib import Path

import click
import torch

from . import __version__
from .circuit_cli import CIRCUIT_COMMANDS
from .cli_common import config_options, explicit_settings, parse_layers, quiet_progress, user_errors
from .coders.formats import FORMATS
from .data.sources import describe_source
from .faithfulness_cli import FAITHFULNESS_COMMANDS
from .features_cli import FEATURE_COMMANDS
from .files import refuse_to_replace
from .task_cli import TASK_COMMANDS
from .training.checkpoint import CheckpointError
from .training.config import RESUME_OVERRIDABLE, TrainConfig
from .viewer_cli import VIEWER_COMMANDS

DEMO_TOKENS = 1_228_800


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _log_line(line: str) -> None:
    click.echo(line, err=line.startswith("warning:"))


def _print_report(result: dict) -> None:
    timing = result["timing"]
    if not timing:  # a non-zero torchrun rank: rank 0 reports
        return
    click.echo(
        f"trained {timing['train_tokens']:,} tokens: {timing['tokens_per_s']:.0f} tokens/s end to end "
        f"(harvest {timing['harvest_tokens_per_s']:.0f} tokens/s, coder {timing['coder_tokens_per_s']:.0f} tokens/s)"
    )
    metrics = result.get("metrics")
    if metrics:
        for layer, m in metrics["layers"].items():
            click.echo(
                f"layer {layer}: L0 {m['l0']:.1f}, FVU {m['fvu']:.3f}, CE clean {m['ce_clean']:.4f} / spliced "
                f"{m['ce_spliced']:.4f} / zero-ablated {m['ce_zero_ablation']:.4f} nats/token, "
                f"loss recovered {_fmt(m['ce_loss_recovered'])}, KL {m['kl']:.4f}"
                + ("" if m.get("dead_in_training") is None else
                   f", dead {m['dead_in_training']:.1%} (silent for the last {m['dead_window']:,} training tokens)")
            )
            by_source = metrics.get("by_source") or {}
            if by_source:
                click.echo("  loss recovered by source: " + ", ".join(
                    f"{label} {_fmt(part['layers'][layer]['ce_loss_recovered'])}" for label, part in by_source.items()))
        click.echo(f"report: {metrics['summary_path']}")


@click.group()
@click.version_option(__version__, prog_name="transcoders")
@click.option("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
def main(threads: int | None) -> None:
    """Train, evaluate and analyse transcoders of Hugging Face causal LMs."""
    if threads:
        torch.set_num_threads(threads)


def resume_settings(run_dir: Path, given: dict, override: bool) -> tuple[TrainConfig, dict]:
    """The settings to resume the run in ``run_dir`` with: the saved ones, changed by ``given``
    (options set on the command line) only with ``override``. Returns ``(settings, changes)``
    with ``changes = {field: [saved, new]}``.

    Raises:
        CheckpointError: no saved run; options that differ without ``override``; or changes to
            settings the checkpoint depends on.
    """
    from .evaluation.run import read_train_config

    saved = read_train_config(run_dir)
    if saved is None:
        raise CheckpointError(f"{run_dir / 'train_config.json'} not found: --resume needs a run folder written by "
                              "`transcoders train`.")
    wanted = TrainConfig.model_validate({**saved.model_dump(), **given})
    changes = {k: [getattr(saved, k), getattr(wanted, k)] for k in given if getattr(saved, k) != getattr(wanted, k)}
    if not changes:
        return saved, {}
    listed = "; ".join(f"--{k.replace('_', '-')}: saved {old!r}, given {new!r}" for k, (old, new) in changes.items())
    if not override:
        raise CheckpointError(f"--resume {run_dir}: options differ from the saved run ({listed}). Drop them to resume "
                              "as saved, or pass --override to change them (recorded in overrides.json).")
    fixed = sorted(set(changes) - RESUME_OVERRIDABLE)
    if fixed:
        raise CheckpointError(f"--resume {run_dir}: {', '.join(fixed)} cannot change in a resumed run (the checkpoint "
                              f"depends on them; only {', '.join(sorted(RESUME_OVERRIDABLE))} can). Start a new run instead.")
    return wanted, changes


@main.command()
@config_options(TrainConfig)
@click.option("--run-dir", type=click.Path(path_type=Path), default=Path("runs/latest"), show_default=True)
@click.option("--resume", "resume_dir", type=click.Path(path_type=Path), default=None,
              help="continue the interrupted run in this folder (its saved settings are reused)")
@click.option("--override", is_flag=True, help="with --resume: change the options given (total tokens, checkpointing, "
              "device) from the saved run; the changes are recorded in overrides.json")
@click.option("--overwrite", is_flag=True, help="replace the run already in --run-dir (its files only)")
@click.option("--eval-tokens", type=int, default=8192, show_default=True, help="held-out tokens for evaluation (0: skip)")
@click.option("--quiet", is_flag=True, help="no progress bars")
@click.pass_context
@user_errors
def train(ctx: click.Context, run_dir: Path, resume_dir: Path | None, override: bool, overwrite: bool, eval_tokens: int,
          quiet: bool, **settings) -> None:
    """Train coders on MLP activations, then evaluate them on held-out text."""
    quiet_progress(quiet)
    from .training.run import train_run

    changes = {}
    if resume_dir is not None:
        if overwrite:
            raise click.UsageError("--resume and --overwrite exclude each other: continue the run, or replace it")
        cfg, changes = resume_settings(resume_dir, explicit_settings(ctx, TrainConfig, settings), override)
        folder = resume_dir
    else:
        if override:
            raise click.UsageError("--override only applies with --resume")
        cfg, folder = TrainConfig(**settings), run_dir
    result = train_run(cfg, folder, resume=resume_dir is not None, overwrite=overwrite, overrides=changes,
                       progress=not quiet, evaluate=eval_tokens > 0, eval_tokens=eval_tokens, log=_log_line)
    _print_report(result)


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--data", default=None, help="measure on this text instead of the run's held-out split")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="folder for the results [default: RUN_DIR for its held-out split, RUN_DIR/eval/<source-name> for --data]")
@click.option("--model", default=None, help="the model the coders belong to [default: the coders' model, if known locally]")
@click.option("--prepend-bos/--no-prepend-bos", "prepend_bos", default=None,
              help="start every context with BOS [default: as the run was trained]; contradicting the run is an error")
@click.option("--eval-tokens", type=int, default=8192, show_default=True)
@click.option("--batch-size", type=int, default=8, show_default=True, help="contexts per forward pass")
@click.option("--all-at-once", is_flag=True,
              help="also splice every coder at once (and all but one, per layer): CE, KL, loss recovered")
@click.option("--layers", "layers", default=None, help="only these layers' coders (comma-separated)")
@click.option("--quiet", is_flag=True)
@user_errors
def evaluate(run_dir: Path, data: str | None, out: Path | None, model: str | None, prepend_bos: bool | None,
             eval_tokens: int, batch_size: int, all_at_once: bool, layers: str | None, quiet: bool) -> None:
    """Evaluate the coders in RUN_DIR: L0, FVU, dead/dense features, spliced-in loss (one layer at
    a time, and with --all-at-once every layer together). RUN_DIR may also be a cross-layer
    transcoder in circuit-tracer's format (W_enc_{i}/W_dec_{i}.safetensors), which is always
    spliced all at once as well."""
    quiet_progress(quiet)
    from .evaluation.run import evaluate_run

    chosen = None
    if layers is not None:
        chosen = parse_layers(layers)
        chosen = None if chosen == "all" else chosen
    metrics = evaluate_run(run_dir, data=data, out=out, model=model, prepend_bos=prepend_bos, eval_tokens=eval_tokens,
                           batch_size=batch_size, progress=not quiet, all_at_once=all_at_once, layers=chosen)
    shown = ("layers", "eval_tokens", "spliced_together", "by_source")
    click.echo(json.dumps({k: v for k, v in metrics.items() if k in shown}, indent=2))
    click.echo(f"report: {metrics['summary_path']}")


@main.command()
@click.argument("source", type=click.Path(path_type=Path))
@click.argument("dest", type=click.Path(path_type=Path))
@click.option("--to", "to_format", type=click.Choice(FORMATS), required=True, help="format to write")
@click.option("--from", "from_format", type=click.Choice(FORMATS), default=None, help="format of SOURCE [default: detected]")
@click.option("--force", is_flag=True, help="replace DEST if it exists")
@user_errors
def convert(source: Path, dest: Path, to_format: str, from_format: str | None, force: bool) -> None:
    """Convert coders between formats: ours, sparsify, SAELens, circuit-tracer, Dunefsky et al. (.pt,
    read without executing pickled code)."""
    from .coders.formats import read_coder, write_coder

    if dest.exists() and (dest.is_file() or any(dest.iterdir())):
        refuse_to_replace(dest, force)
    coders = read_coder(source, from_format)
    if to_format == "circuit-tracer" and not isinstance(coders, dict):
        coders = {coders.cfg.layer or 0: coders}
    if to_format != "circuit-tracer" and isinstance(coders, dict):
        if len(coders) != 1:
            raise ValueError(f"{source} holds {len(coders)} coders; {to_format} holds one per folder")
        coders = next(iter(coders.values()))
    click.echo(f"wrote {write_coder(coders, dest, to_format)}")


@main.command()
@click.option("--run-dir", type=click.Path(path_type=Path), default=Path("runs/demo"), show_default=True)
@click.option("--total-tokens", type=int, default=DEMO_TOKENS, show_default=True)
@click.option("--overwrite", is_flag=True, help="replace an earlier demo run in --run-dir")
@click.option("--quiet", is_flag=True)
@user_errors
def demo(run_dir: Path, total_tokens: int, overwrite: bool, quiet: bool) -> None:
    """The main job: a layer-6 TopK transcoder of SmolLM2-135M trained on the default text mixture
    (books, email, Python and Django docs, Python code, State of the Union addresses) and
    evaluated on each source's held-out documents (about 15 minutes on 2 CPU cores)."""
    quiet_progress(quiet)
    from .training.run import train_run

    cfg = TrainConfig(total_tokens=total_tokens)
    click.echo(f"training a layer-6 transcoder of {cfg.model} on {describe_source(cfg.data)} into {run_dir}")
    _print_report(train_run(cfg, run_dir, overwrite=overwrite, progress=not quiet, log=_log_line))


for _command in CIRCUIT_COMMANDS + FAITHFULNESS_COMMANDS + FEATURE_COMMANDS + TASK_COMMANDS + VIEWER_COMMANDS:
    main.add_command(_command)

if __name__ == "__main__":
    main()
