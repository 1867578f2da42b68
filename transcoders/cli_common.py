"""What every command shares: click options made from a pydantic settings model (so that each
setting's default, help and choices live in one place, and the CLI's defaults are the Python
API's), and the mapping of library errors to one-line messages."""

from __future__ import annotations

import json
import sys
import types
import typing
from collections.abc import Callable
from typing import Any

import click
from pydantic import BaseModel, ValidationError

# Every library error a user can cause is a ValueError subclass (or an OSError) whose message
# names the problem and the fix.
USER_ERRORS = (ValueError, OSError)


def _fail(exc: BaseException | str, code: int = 2) -> None:
    click.echo(f"error: {exc}", err=True)
    sys.exit(code)


def run_command(fn: Callable[[], Any]) -> Any:
    """Run a command's body; turn the library's errors into one clear line and an exit code
    (2: bad input, 3: training diverged, 130: interrupted), not a traceback."""
    from .training.trainer import TrainingDiverged, TrainingInterrupted

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


def user_errors(fn: Callable) -> Callable:
    """Decorate a command so that library errors end it with one line (see :func:`run_command`)."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return run_command(lambda: fn(*args, **kwargs))

    return wrapper


def quiet_progress(quiet: bool) -> None:
    """With ``quiet``, silence the progress bars of transformers and datasets too."""
    if quiet:
        import transformers

        transformers.utils.logging.disable_progress_bar()
        try:
            import datasets

            datasets.disable_progress_bars()
        except ImportError:
            pass


def parse_layers(value: str | list[int]) -> list[int] | str:
    """``"6"``, ``"4,6,8"`` or ``"all"`` -> ``[6]``, ``[4, 6, 8]``, ``"all"``.

    Raises:
        click.BadParameter: anything else.
    """
    if not isinstance(value, str):
        return value
    if value.strip() == "all":
        return "all"
    try:
        layers = sorted({int(v) for v in value.split(",") if v.strip()})
    except ValueError:
        layers = []
    if not layers:
        raise click.BadParameter(f"{value!r}: give layer numbers separated by commas (e.g. 6 or 4,6,8) or 'all'")
    return layers


def parse_json_list(value: str | list) -> list:
    """A JSON list given on the command line (``--sweep``)."""
    if not isinstance(value, str):
        return value
    try:
        out = json.loads(value)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not valid JSON ({exc}); example: '[{{\"k\": 16}}, {{\"k\": 64}}]'") from None
    if not isinstance(out, list):
        raise click.BadParameter("expected a JSON list, e.g. '[{\"k\": 16}, {\"k\": 64}]'")
    return out


# Fields whose command-line text needs parsing, and their metavar.
PARSERS: dict[str, tuple[Callable[[Any], Any], str]] = {"layers": (parse_layers, "LAYERS"), "sweep": (parse_json_list, "JSON")}
SHORT = {"k": "-k"}


def _strip_optional(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def config_options(model: type[BaseModel], *, exclude: tuple[str, ...] = ()) -> Callable:
    """A decorator adding one ``--field-name`` option per field of ``model`` (less ``exclude``):
    the field's default, its description as help, ``Literal`` values as choices, bools as
    ``--x/--no-x`` flags."""

    def decorate(fn: Callable) -> Callable:
        for name, field in reversed(list(model.model_fields.items())):
            if name in exclude:
                continue
            flag = "--" + name.replace("_", "-")
            names = [SHORT[name], flag] if name in SHORT else [flag]
            default = field.get_default(call_default_factory=True)
            kw: dict[str, Any] = {"help": field.description, "show_default": default is not None}
            annotation = _strip_optional(field.annotation)
            if name in PARSERS:
                parser, metavar = PARSERS[name]
                kw.update(type=str, callback=lambda _ctx, _param, v, p=parser: p(v), metavar=metavar,
                          default=",".join(map(str, default)) if isinstance(default, list) and name == "layers"
                          else json.dumps(default) if isinstance(default, list) else default)
            elif annotation is bool:
                names = [f"{flag}/--no-{flag[2:]}"]
                kw.update(default=default)
            elif typing.get_origin(annotation) is typing.Literal:
                kw.update(type=click.Choice([str(a) for a in typing.get_args(annotation)]), default=default)
            elif annotation in (int, float, str):
                kw.update(type=annotation, default=default)
            else:
                raise TypeError(f"{model.__name__}.{name}: no command-line form for {field.annotation}")
            fn = click.option(*names, name, **kw)(fn)
        return fn

    return decorate


def explicit_settings(ctx: click.Context, model: type[BaseModel], params: dict[str, Any]) -> dict[str, Any]:
    """The fields of ``model`` that the user set on the command line (not left at default)."""
    return {name: params[name] for name in model.model_fields if name in params
            and ctx.get_parameter_source(name) not in (click.core.ParameterSource.DEFAULT, None)}
