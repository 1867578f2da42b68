"""Command-line interface: ``transcoders train | evaluate | convert | demo`` and the circuit
commands ``trace | paths | intervene | verify`` (in :mod:`transcoders.circuit_cli`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
import torch
from pydantic import ValidationError

from .circuit_cli import register as register_circuit_commands
from .coders.io import CoderFileError
from .data.cache import ActivationCacheError
from .data.sources import DataSourceError
from .models.adapters import AdapterError
from .models.loading import DEFAULT_MODEL, ModelLoadError
from .training.checkpoint import CheckpointError
from .training.config import TrainConfig
from .training.trainer import TrainingDiverged, TrainingInterrupted

USER_ERRORS = (ActivationCacheError, ModelLoadError, DataSourceError, AdapterError, CoderFileError, CheckpointError, ValueError,
               OSError)
DEMO_TOKENS = 1_228_800


def _fail(exc: BaseException, code: int = 2) -> None:
    click.echo(f"error: {exc}", err=True)
    sys.exit(code)


def _run(fn):
    """Turn the library's errors into one clear line and an exit code, not a traceback."""
    try:
        return fn()
    except TrainingInterrupted as exc:
        _fail(exc, 130)
    except TrainingDiverged as exc:
        _fail(exc, 3)
    except ValidationError as exc:
        fields = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in exc.errors())
        _fail(f"invalid settings: {fields}")
    except USER_ERRORS as exc:
        _fail(exc)


def _quiet(quiet: bool) -> None:
    """Silence the progress bars of transformers and datasets too."""
    if quiet:
        import transformers

        transformers.utils.logging.disable_progress_bar()
        try:
            import datasets

            datasets.disable_progress_bars()
        except ImportError:
            pass


def _parse_layers(value: str) -> list[int] | str:
    if value == "all":
        return "all"
    try:
        return sorted({int(v) for v in value.split(",") if v.strip()})
    except ValueError:
        raise click.BadParameter(f"{value!r}: give layer numbers separated by commas (e.g. 6 or 4,6,8) or 'all'") from None


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


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
            )
        click.echo(f"report: {metrics['summary_path']}")


@click.group()
@click.option("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
def main(threads: int | None) -> None:
    """Train, evaluate and analyse transcoders of Hugging Face causal LMs."""
    if threads:
        torch.set_num_threads(threads)


_train_options = [
    click.option("--model", default=DEFAULT_MODEL, show_default=True, help="hub name, model folder, .gguf file or package"),
    click.option("--data", default=None, help="text file, folder of .txt, .jsonl, or dataset name [default: bundled State of the Union corpus]"),
    click.option("--layers", default="6", show_default=True, help="comma-separated layers, or 'all'"),
    click.option("--kind", type=click.Choice(["transcoder", "skip_transcoder", "sae"]), default="transcoder", show_default=True),
    click.option("--activation", type=click.Choice(["topk", "batchtopk", "jumprelu", "relu"]), default="topk", show_default=True,
                 help="batchtopk is saved as jumprelu with its fitted threshold"),
    click.option("--expansion-factor", type=int, default=16, show_default=True, help="d_sae = factor * d_model"),
    click.option("--d-sae", type=int, default=None, help="number of features (overrides --expansion-factor)"),
    click.option("-k", "--k", "k", type=int, default=32, show_default=True, help="active features per token (topk)"),
    click.option("--l1-coefficient", type=float, default=1.0, show_default=True, help="L1 weight (relu)"),
    click.option("--l0-coefficient", type=float, default=2e-3, show_default=True, help="L0 weight (jumprelu)"),
    click.option("--lr", type=float, default=None, help="Adam learning rate [default: scaled with d_sae]"),
    click.option("--batch-size", type=int, default=4096, show_default=True, help="tokens per step"),
    click.option("--total-tokens", type=int, default=2_000_000, show_default=True),
    click.option("--ctx-len", type=int, default=256, show_default=True),
    click.option("--skip-first-tokens", type=int, default=1, show_default=True,
                 help="leading positions of each context left out of training and evaluation (the attention sink)"),
    click.option("--seed", type=int, default=0, show_default=True),
    click.option("--precision", type=click.Choice(["bf16", "fp32"]), default="bf16", show_default=True, help="coder matmul precision"),
    click.option("--harvest-dtype", type=click.Choice(["bfloat16", "float32"]), default="bfloat16", show_default=True),
    click.option("--device", default="auto", show_default=True),
    click.option("--shard-layers", is_flag=True, help="under torchrun: split the coders across ranks instead of the data"),
    click.option("--activation-cache", default=None, help="on-disk activation cache folder to train from (built first if absent)"),
    click.option("--sweep", "sweep", default=None,
                 help='JSON list of variants trained side by side, e.g. \'[{"k": 16}, {"k": 64}]\''),
    click.option("--checkpoint-every", type=int, default=100, show_default=True, help="steps between checkpoints"),
]


def train_options(fn):
    for option in reversed(_train_options):
        fn = option(fn)
    return fn


def _config(layers: str, sweep: str | None = None, **kw) -> TrainConfig:
    try:
        variants = json.loads(sweep) if sweep else []
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"--sweep is not valid JSON ({exc}); example: '[{{\"k\": 16}}, {{\"k\": 64}}]'") from None
    return TrainConfig(layers=_parse_layers(layers), sweep=variants, **kw)


@main.command()
@train_options
@click.option("--run-dir", type=click.Path(path_type=Path), default=Path("runs/latest"), show_default=True)
@click.option("--resume", "resume_dir", type=click.Path(path_type=Path), default=None,
              help="continue the interrupted run in this folder (its settings are reused)")
@click.option("--eval-tokens", type=int, default=8192, show_default=True, help="held-out tokens for evaluation (0: skip)")
@click.option("--quiet", is_flag=True, help="no progress bars")
def train(run_dir: Path, resume_dir: Path | None, eval_tokens: int, quiet: bool, layers: str, **kw) -> None:
    """Train coders on MLP activations, then evaluate them on held-out text."""
    _quiet(quiet)
    from .training.run import train_run

    def go():
        if resume_dir is not None:
            path = resume_dir / "train_config.json"
            if not path.exists():
                raise CheckpointError(f"{path} not found: --resume needs a run folder written by `transcoders train`.")
            cfg = TrainConfig.model_validate(json.loads(path.read_text()))
            folder = resume_dir
        else:
            cfg, folder = _config(layers, **kw), run_dir
        result = train_run(cfg, folder, resume=resume_dir is not None, progress=not quiet,
                           evaluate=eval_tokens > 0, eval_tokens=eval_tokens)
        _print_report(result)

    _run(go)


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--data", default=None, help="measure on this text instead of the run's held-out split")
@click.option("--eval-tokens", type=int, default=8192, show_default=True)
@click.option("--batch-size", type=int, default=8, show_default=True, help="contexts per forward pass")
@click.option("--quiet", is_flag=True)
def evaluate(run_dir: Path, data: str | None, eval_tokens: int, batch_size: int, quiet: bool) -> None:
    """Evaluate the coders in RUN_DIR: L0, FVU, dead/dense features, spliced-in loss."""
    _quiet(quiet)
    from .evaluation.run import evaluate_run

    def go():
        metrics = evaluate_run(run_dir, data=data, eval_tokens=eval_tokens, batch_size=batch_size, progress=not quiet)
        click.echo(json.dumps({k: v for k, v in metrics.items() if k in ("layers", "eval_tokens")}, indent=2))
        click.echo(f"report: {metrics['summary_path']}")

    _run(go)


@main.command()
@click.argument("source", type=click.Path(path_type=Path))
@click.argument("dest", type=click.Path(path_type=Path))
@click.option("--to", "to_format", type=click.Choice(["transcoders", "sparsify", "saelens", "circuit-tracer", "dunefsky"]),
              required=True, help="format to write")
@click.option("--from", "from_format", default=None, help="format of SOURCE [default: detected]")
def convert(source: Path, dest: Path, to_format: str, from_format: str | None) -> None:
    """Convert coders between formats: ours, sparsify, SAELens, circuit-tracer, Dunefsky et al. (.pt,
    read without executing pickled code)."""
    from .coders.formats import read_coder, write_coder

    def go():
        coders = read_coder(source, from_format)
        if to_format == "circuit-tracer" and not isinstance(coders, dict):
            coders = {coders.cfg.layer or 0: coders}
        if to_format != "circuit-tracer" and isinstance(coders, dict):
            if len(coders) != 1:
                raise ValueError(f"{source} holds {len(coders)} coders; {to_format} holds one per folder")
            coders = next(iter(coders.values()))
        click.echo(f"wrote {write_coder(coders, dest, to_format)}")

    _run(go)


@main.command()
@click.option("--run-dir", type=click.Path(path_type=Path), default=Path("runs/demo"), show_default=True)
@click.option("--total-tokens", type=int, default=DEMO_TOKENS, show_default=True)
@click.option("--quiet", is_flag=True)
def demo(run_dir: Path, total_tokens: int, quiet: bool) -> None:
    """The main job: a layer-6 TopK transcoder of SmolLM2-135M on the State of the Union corpus,
    trained and evaluated on held-out addresses (about 10 minutes on 2 CPU cores)."""
    _quiet(quiet)
    from .training.run import train_run

    def go():
        cfg = TrainConfig(total_tokens=total_tokens)
        click.echo(f"training a layer-6 transcoder of {cfg.model} on the State of the Union corpus into {run_dir}")
        _print_report(train_run(cfg, run_dir, progress=not quiet))

    _run(go)


register_circuit_commands(main, _run)

if __name__ == "__main__":
    main()
