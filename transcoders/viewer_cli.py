"""Viewer commands: ``transcoders serve`` (the local web viewer of runs, graphs and features) and
``transcoders export-html`` (one page as a self-contained HTML file). See ``docs/viewer.md``."""

from __future__ import annotations

from pathlib import Path

import click

from .cli_common import user_errors
from .features.server import LOOPBACK_HOSTS


def check_host(host: str, allow_remote: bool) -> bool:
    """Whether ``host`` is a loopback address. A non-loopback host needs ``allow_remote``.

    Raises:
        ValueError: a non-loopback host without ``allow_remote`` (one line naming the fix).
    """
    if host in LOOPBACK_HOSTS:
        return True
    if not allow_remote:
        raise ValueError(f"--host {host} would serve your runs beyond this machine with no authentication; "
                         "use --host 127.0.0.1, or pass --allow-remote if the network is trusted")
    return False


@click.command()
@click.argument("run_dirs", nargs=-1, type=click.Path(path_type=Path))
@click.option("--graphs", "graph_dirs", multiple=True, type=click.Path(path_type=Path),
              help="also serve the graph files (*.json) in this folder (repeatable)")
@click.option("--host", default="127.0.0.1", show_default=True, help="interface to listen on (loopback by default)")
@click.option("--port", default=8765, show_default=True)
@click.option("--allow-remote", is_flag=True, help="allow a non-loopback --host (the viewer has no authentication)")
@user_errors
def serve(run_dirs, graph_dirs, host, port, allow_remote):
    """Serve the runs in RUN_DIR... (their metrics, graphs and feature stores) and the graphs in
    --graphs folders as a local web app at http://HOST:PORT/ (no internet needed)."""
    loopback = check_host(host, allow_remote)
    if not run_dirs and not graph_dirs:
        raise ValueError("nothing to serve: give run folders (RUN_DIR ...) and/or --graphs DIR")
    import uvicorn

    from .viewer.app import create_app

    app = create_app(run_dirs, graph_dirs, allowed_hosts=list(LOOPBACK_HOSTS) if loopback else None)
    reg = app.state.registry
    if not loopback:
        click.echo(f"warning: serving on {host}: the viewer has no authentication; anyone who can reach "
                   f"{host}:{port} can read these runs and start traces", err=True)
    shown = "127.0.0.1" if host in ("127.0.0.1", "localhost") else host
    click.echo(f"serving {len(reg.runs)} runs and {len(reg.graph_entries())} graphs at "
               f"http://{'[' + shown + ']' if ':' in shown else shown}:{port}/ (Ctrl-C to stop)")
    uvicorn.run(app, host=host, port=port, log_level="warning")


@click.command("export-html")
@click.option("--graph", "graph_file", type=click.Path(path_type=Path), default=None, help="a graph file to export")
@click.option("--run", "run_dir", type=click.Path(path_type=Path), default=None,
              help="the run: alone, its overview; with --feature, that feature; with --graph, where labels and "
                   "feature cards come from [default: the graph's run folder, if it exists]")
@click.option("--feature", "feature_spec", default=None, metavar="LAYER.FEATURE",
              help="with --run: the feature to export (LAYER/VARIANT.FEATURE for a sweep variant)")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="the HTML file to write")
@click.option("--force", is_flag=True, help="replace --out if it exists")
@user_errors
def export_html(graph_file, run_dir, feature_spec, out, force):
    """Write one viewer page (a graph, a feature or a run overview) as a self-contained HTML file
    that opens offline: the viewer's CSS and scripts inline, every response it needs included."""
    from .files import atomic_write_text, refuse_to_replace
    from .viewer.html import export_page
    from .viewer.registry import Registry

    refuse_to_replace(out, force)
    if graph_file is not None:
        if feature_spec is not None:
            raise ValueError("--feature exports a feature page; drop it to export --graph (or drop --graph)")
        if run_dir is None:
            from .circuits.export import load_graph

            recorded = load_graph(graph_file).meta.get("run_dir")
            run_dir = Path(recorded) if isinstance(recorded, str) and Path(recorded).is_dir() else None
        reg = Registry([run_dir] if run_dir is not None else [], graph_files=[graph_file])
        gid = reg.graph_id_for(graph_file)
        assert gid is not None
        page, args = "graph", {"graph": gid}
    elif run_dir is not None:
        reg = Registry([run_dir])
        rid = next(iter(reg.runs))
        if feature_spec is not None:
            from .features_cli import _parse_feature

            layer, index, variant = _parse_feature(feature_spec)
            page, args = "feature", {"run": rid, "layer": layer, "index": index, "variant": variant}
        else:
            page, args = "run", {"run": rid}
    else:
        raise ValueError("nothing to export: pass --graph FILE, --run RUN --feature L.F, or --run RUN")
    doc, _ = export_page(reg, page, args)
    atomic_write_text(out, doc)
    click.echo(f"wrote {out} ({len(doc.encode('utf-8')) / 1e6:.1f} MB)")


VIEWER_COMMANDS = (serve, export_html)
