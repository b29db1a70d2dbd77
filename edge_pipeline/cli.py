"""The ``edge-pipeline`` command: small click commands that parse, delegate to the library, and print."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
from importlib import metadata

import click
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from edge_pipeline.errors import PipelineError

console = Console(stderr=True)
out = Console()


class RichSink:
    """Shows library progress as rich bars on stderr (stdout stays clean for --json)."""

    def __init__(self, progress: Progress):
        self.p = progress

    def start(self, description, total):
        return self.p.add_task(description, total=total)

    def advance(self, handle, amount, description):
        self.p.update(handle, advance=amount, **({"description": description} if description else {}))

    def stop(self, handle):
        self.p.remove_task(handle)

    def note(self, message):
        self.p.console.print(f"[dim]·[/dim] {message}")


def _with_progress(fn):
    from edge_pipeline import progress as prog

    bar = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                   TextColumn("{task.completed:.0f}/{task.total:.0f}"), TimeElapsedColumn(),
                   console=console, transient=True)
    with bar, prog.use_sink(RichSink(bar)):
        return fn()


def handle_errors(fn):
    """PipelineError -> its message and exit code, no traceback (unless --debug)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        debug = click.get_current_context().find_root().params.get("debug")
        try:
            return fn(*args, **kwargs)
        except PipelineError as e:
            if debug:
                raise
            console.print(f"[bold red]error:[/bold red] {e}", highlight=False)
            sys.exit(e.exit_code)

    return wrapper


def _version() -> str:
    try:
        return metadata.version("edge-pipeline")
    except metadata.PackageNotFoundError:
        return "unknown"


@click.group()
@click.version_option(_version(), prog_name="edge-pipeline")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
def main(debug: bool) -> None:
    """From a trained PyTorch model to a tested release bundle for phones and boards."""


def _print_summary(summary) -> None:
    table = Table(title=f"run {summary.run_dir}")
    for col in ("stage", "status", "seconds", "key figures"):
        table.add_column(col)
    for name, s in summary.stages.items():
        m = s.get("metrics", {})
        figures = ", ".join(f"{k}={_fmt(v)}" for k, v in m.items() if isinstance(v, (int, float))
                            and not isinstance(v, bool))
        secs = s.get("seconds")
        table.add_row(name, s["status"], "" if secs is None else f"{secs:.1f}", figures[:160])
    console.print(table)
    if summary.failed_targets:
        console.print(f"[bold red]targets that failed:[/bold red] {', '.join(summary.failed_targets)}")
    console.print(f"run directory: {summary.run_dir}  (run.json inside)")


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


@contextlib.contextmanager
def _stdout_to_stderr():
    """Runtimes and converters log to file descriptor 1; with --json stdout must carry the JSON alone."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _run_command(recipe, out_dir, run_id, from_stage, only, force, as_json, until=None):
    from edge_pipeline import pipeline

    with _stdout_to_stderr() if as_json else contextlib.nullcontext():
        summary = _with_progress(lambda: pipeline.run(recipe, out=out_dir, run_id=run_id, from_stage=from_stage,
                                                      only=only, force=force, until=until))
    if as_json:
        print(json.dumps(summary.run_json, indent=1, default=str))
    _print_summary(summary)
    sys.exit(summary.exit_code)


_STAGE_OPTIONS = [
    click.argument("recipe", type=click.Path(dir_okay=False)),
    click.option("--out", "out_dir", help="Runs folder (default: the recipe's output, runs/)."),
    click.option("--run-id", default="default", show_default=True, help="Run folder name under runs/<recipe>/."),
    click.option("--json", "as_json", is_flag=True, help="Print run.json's content on stdout."),
]


def _stage_options(fn):
    for opt in reversed(_STAGE_OPTIONS):
        fn = opt(fn)
    return fn


@main.command()
@_stage_options
@click.option("--from-stage", help="Re-run this stage and all after it.")
@click.option("--only", help="Run only this stage (earlier stages must be up to date).")
@click.option("--force", is_flag=True, help="Re-run every stage.")
@handle_errors
def run(recipe, out_dir, run_id, as_json, from_stage, only, force):
    """Run a recipe's whole pipeline, reusing unchanged stages."""
    _run_command(recipe, out_dir, run_id, from_stage, only, force, as_json)


def _stage_command(stage: str, help_text: str):
    @_stage_options
    @click.option("--force", is_flag=True, help=f"Re-run {stage} even if unchanged.")
    @handle_errors
    def command(recipe, out_dir, run_id, as_json, force):
        _run_command(recipe, out_dir, run_id, stage if force else None, None, False, as_json, until=stage)

    command.__doc__ = help_text + " Earlier stages run first where they are missing or out of date."
    return main.command(stage)(command)


_stage_command("prune", "Structured pruning of the teacher.")
_stage_command("distill", "Distill the teacher into the student.")
_stage_command("calibrate", "Draw (or check) the pinned representative set.")
_stage_command("lower", "Lower the model to every target's runtime format.")


@main.command()
@handle_errors
def targets():
    """List the target profiles and what each needs installed."""
    from edge_pipeline.doctor import backend_status
    from edge_pipeline.targets import list_profiles

    status = backend_status()
    table = Table(title="target profiles")
    for col in ("name", "backend", "precision", "needs", "installed", "description"):
        table.add_column(col)
    for p in list_profiles():
        st = status[p.backend]
        table.add_row(p.name, p.backend, p.precision, ", ".join(st["needs"]),
                      "yes" if st["ok"] else "[red]no[/red]", p.description)
    out.print(table)


@main.command()
def doctor():
    """Which runtimes and tools are installed, with versions, and what each target is missing."""
    from edge_pipeline.doctor import backend_status, tool_status

    table = Table(title="backends")
    for col in ("backend", "status", "packages"):
        table.add_column(col)
    for name, st in backend_status().items():
        pk = ", ".join(f"{k} {v or '[red]missing[/red]'}" for k, v in st["packages"].items())
        table.add_row(name, "[green]ok[/green]" if st["ok"] else "[red]missing[/red]", pk)
    out.print(table)
    tools = Table(title="device tools")
    for col in ("tool", "found"):
        tools.add_column(col)
    for tool, path in tool_status().items():
        tools.add_row(tool, path or "[yellow]not found[/yellow]")
    out.print(tools)


if __name__ == "__main__":
    main()
