"""The ``edge-pipeline`` command: small click commands that parse, delegate to the library, and print."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import sys
from importlib import metadata

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from edge_pipeline import capture
from edge_pipeline.errors import (
    EXIT_BUDGET,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_UNREACHABLE,
    BudgetFailure,
    PipelineError,
)
from edge_pipeline.profiles import overhead_line
from edge_pipeline.stages import stages

# Outside a terminal (CI logs, pipes) rich would wrap tables at 80 columns; use COLUMNS or a wide default.
_WIDTH = None if sys.stderr.isatty() else int(os.environ.get("COLUMNS", 200))
# On a copy of the terminal's stderr: while a stage runs, descriptor 2 itself goes to the stage's log.
console = Console(file=capture.terminal_stream(), width=_WIDTH)
out = Console(width=None if sys.stdout.isatty() else int(os.environ.get("COLUMNS", 200)))



# 0 ok, 1 a target missed its budget or checks, 2 bad input, 3 an internal or runtime failure, 130 Ctrl-C.


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


def _temp_log(command: str):
    """Where a command without a run folder logs other libraries' output: a temporary file, kept and shown only
    when the command fails."""
    import tempfile
    from pathlib import Path

    return Path(tempfile.gettempdir()) / f"edge-pipeline-{command}-{os.getpid()}.log"


def _with_progress(fn, log=None, discard_log: bool = False):
    """Runs ``fn`` with progress bars; with ``log``, other libraries' output goes there (shown on a failure;
    deleted on success with ``discard_log``)."""
    from edge_pipeline import progress as prog

    bar = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console, transient=True)
    with bar, prog.use_sink(RichSink(bar)):
        if log is None:
            return fn()
        try:
            with capture.to_log(log):
                result = fn()
            if discard_log:
                log.unlink(missing_ok=True)
            return result
        except BaseException as e:
            if getattr(e, "log_path", None) is None and log.is_file() and log.stat().st_size:
                e.log_path = log
            raise


def handle_errors(fn):
    """PipelineError -> its message and exit code, no traceback (``--debug`` adds it; the exit code stays)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        debug = click.get_current_context().find_root().params.get("debug")
        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt:
            console.print("[bold red]interrupted[/bold red] (run.json records it; the next run resumes)")
            sys.exit(EXIT_INTERRUPTED)
        except Exception as e:  # noqa: BLE001 - a crash is reported, not dumped; --debug shows the traceback
            if debug:
                console.print_exception()
            _show_log(e)
            stage = getattr(e, "stage", None)
            where = f"stage {stage} failed: " if stage else ""
            if isinstance(e, PipelineError):
                console.print(f"[bold red]error:[/bold red] {where}{e}", highlight=False)
                sys.exit(e.exit_code)
            console.print(f"[bold red]internal error:[/bold red] {where}{type(e).__name__}: {e}" +
                          ("" if debug else "\n  run again with --debug for the traceback"), highlight=False)
            sys.exit(EXIT_INTERNAL)

    return wrapper


def _show_log(err: BaseException) -> None:
    """The last lines other libraries wrote while the failed stage ran, and where the whole log is."""
    path = getattr(err, "log_path", None)
    lines = capture.tail(path) if path else []
    if lines:
        console.print("\n".join(lines), style="dim", highlight=False, markup=False)
    if path:
        console.print(f"log: {path}", highlight=False)


def _terminated(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _version() -> str:
    try:
        return metadata.version("edge-pipeline")
    except metadata.PackageNotFoundError:
        return "unknown"


@click.group()
@click.version_option(_version(), prog_name="edge-pipeline")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.option("--verbose", is_flag=True, help="Stream other libraries' output (default: each stage's log.txt).")
def main(debug: bool, verbose: bool) -> None:
    """From a trained PyTorch model to a tested release bundle for phones and boards."""
    if not verbose:
        capture.enable()
    # SIGTERM (a CI timeout, `kill`) ends a run like Ctrl-C: run.json says interrupted, children are stopped.
    signal.signal(signal.SIGTERM, _terminated)
    # `package.module:callable` sources in the current folder import as they do under `python -m`.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())


def _print_summary(summary) -> None:
    table = Table(title=f"run {summary.run_dir}")
    for col in ("stage", "status", "seconds", "key figures"):
        table.add_column(col)
    by_name = {st.name: st for st in stages()}
    for name, s in summary.stages.items():
        m = s.get("metrics", {})
        stage = by_name.get(name)
        if stage is None or not m:
            figures = ""
        elif stage.summary is not None:
            figures = stage.summary(m)
        else:
            figures = ", ".join(f"{k}={_fmt(m[k])}" for k in stage.summary_keys if k in m)
        secs = s.get("seconds")
        table.add_row(name, s["status"], "" if secs is None else f"{secs:.1f}", figures)
    console.print(table)
    console.print(f"run directory: {summary.run_dir}  (run.json inside)", highlight=False)


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

    try:
        with _stdout_to_stderr() if as_json else contextlib.nullcontext():
            summary = _with_progress(lambda: pipeline.run(recipe, out=out_dir, run_id=run_id, from_stage=from_stage,
                                                          only=only, force=force, until=until))
    except BudgetFailure as e:  # package refused failing targets: show what failed before the error itself
        run_dir = getattr(e, "run_dir", None)
        if run_dir is not None and (run_dir / "run.json").is_file():
            run_json = json.loads((run_dir / "run.json").read_text())
            _print_outcome(run_json, run_dir, run_json.get("failed_targets", []))
        raise
    if as_json:
        print(json.dumps(summary.run_json, indent=1, default=str))
    _print_summary(summary)
    _print_outcome(summary.run_json, summary.run_dir, summary.failed_targets)
    pkg = summary.run_json.get("stages", {}).get("package")
    if pkg:
        console.print(f"bundle: {pkg['metrics']['bundle']}  archive: {pkg['metrics']['tar']}", highlight=False)
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


for _stage in stages():
    if _stage.command:
        _stage_command(_stage.name, _stage.command)


def _print_outcome(run_json: dict, run_dir, failed: list[str]) -> None:
    """The targets x devices table, every check a failed target missed, and where the report is."""
    stages = run_json.get("stages", {})
    dev, lowered = stages.get("device-test"), stages.get("lower", {}).get("metrics", {}).get("targets", {})
    if dev:
        _print_targets(console, dev["metrics"]["results"], "targets × devices", lowered)
    _print_failures(failed, lowered, dev["metrics"]["results"] if dev else {})
    report = run_dir / "report.html"
    if report.is_file():
        console.print(f"report: {report}")


def _print_failures(failed: list[str], lowered: dict, results: dict) -> None:
    """Every check a failed target missed, one line each with its figure and budget: where it failed (lower, on
    the artifact in its runtime; or a device) and what."""
    if not failed:
        return
    console.print(f"[bold red]targets that failed:[/bold red] {', '.join(failed)}")
    for target in failed:
        lower = lowered.get(target, {})
        lines = [f"lower: {f}" for f in lower.get("failures", [])]
        if lower.get("error") and lower.get("error") not in lower.get("failures", []):
            lines.append(f"lower: {lower['error']}")
        lines += [f"{device}: {f}" for device, m in results.get(target, {}).items() for f in m.get("failures", [])]
        for line in lines:
            console.print(f"  {target}  {line}", highlight=False, markup=False)


def _print_targets(con: Console, results: dict, title: str, lowered: dict | None = None) -> None:
    """Targets x devices: the figures that decide a release, then each note once, below the table (a note
    in a cell would wrap the table on a narrow terminal). A target that failed in lower says so in its status."""
    table = Table(title=title)
    for col in ("target", "device", "size (B)", "p50 ms", "model MB", "test metric", "status"):
        table.add_column(col)
    notes: list[str] = []
    for target, by in results.items():
        for device, m in by.items():
            if "error" in m:
                word = "unreachable" if m.get("unreachable") else "error"
                table.add_row(target, device, *[""] * 4, f"[red]{word}: {m['error'].splitlines()[0][:80]}[/red]")
                continue
            lower_failed = bool((lowered or {}).get(target, {}).get("failures"))
            status = ("[red]" + "; ".join(m["failures"]) + "[/red]" if m.get("failures") else
                      "[red]failed in lower (below)[/red]" if lower_failed else "[green]ok[/green]")
            marks = []
            for note in m.get("notes", []) + (["latency unstable (high CV)"] if m["latency"].get("unstable") else []):
                if note not in notes:
                    notes.append(note)
                marks.append(f"({notes.index(note) + 1})")
            acc = m.get("test_metric")
            score = "" if acc is None else f"{m.get('metric', '')} {acc:.4f}"
            status += " " + " ".join(marks) if marks else ""
            model_mb = (m.get("memory") or {}).get("model_bytes")
            table.add_row(target, device, str(m["size_bytes"]), f"{m['latency']['p50_ms']:.3f}",
                          "" if model_mb is None else f"{model_mb / 2**20:.1f}", score, status)
    con.print(table)
    for i, note in enumerate(notes, 1):
        con.print(f"({i}) {note}", style="yellow", highlight=False)
    for target, by in results.items():  # where each int8 target's time goes that is not the model's own
        if "int8" in (lowered or {}).get(target, {}).get("precision", ""):
            for device, m in by.items():
                if line := overhead_line(target, device, m.get("profile")):
                    con.print(line, highlight=False)


@main.command("test")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--device", "devices", multiple=True, default=["local"], show_default=True,
              help="local, ssh://user@host[:port][?key=..&python=..], adb://SERIAL; repeatable.")
@click.option("--threads", type=int, help="Threads (default: each target profile's).")
@click.option("--runs", type=int, default=50, show_default=True)
@click.option("--warmup", type=int, default=5, show_default=True)
@click.option("--timeout", type=float, default=300, show_default=True, help="Seconds per device step.")
@handle_errors
def device_test_command(run_dir, devices, threads, runs, warmup, timeout):
    """Measure a run's artifacts on devices, then run the acceptance suite against the budgets."""
    from pathlib import Path

    from edge_pipeline.device_testing import measure_run

    results_path = _with_progress(lambda: measure_run(Path(run_dir), list(devices), threads, runs, warmup, timeout),
                                  log=Path(run_dir) / "test-log.txt")
    results = json.loads(results_path.read_text())
    _print_targets(out, results["results"], f"device test of {run_dir}")
    import importlib.util
    import subprocess

    from edge_pipeline.resources import shipped

    suite = shipped("device_tests")
    console.print(f"results: {results_path}")
    unreachable = results.get("unreachable_devices", {})
    for device, why in unreachable.items():
        console.print(f"[bold red]unreachable:[/bold red] {device}: {why.splitlines()[0]}", highlight=False)
    reached = any(not m.get("unreachable") for by in results["results"].values() for m in by.values())
    if not reached:
        sys.exit(EXIT_UNREACHABLE)
    if importlib.util.find_spec("pytest") and (suite / "test_acceptance.py").is_file():
        res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(suite),
                              "--rootdir", str(suite), "--results", str(results_path)])
        failed = res.returncode != 0
    else:  # no pytest here: the same checks, in process
        from edge_pipeline.device_testing import acceptance

        passed, failures = acceptance(results)
        for f in failures:
            out.print(f"FAILED {f}")
        out.print(f"{passed} passed, {len(failures)} failed")
        failed = bool(failures)
    sys.exit(EXIT_BUDGET if failed else EXIT_UNREACHABLE if unreachable else EXIT_OK)


@main.command("init")
@click.option("--model", required=True, help="package.module:callable returning a trained nn.Module, or zoo:NAME.")
@click.option("--weights", default=None, help="A state_dict file for the model (loaded with weights_only=True).")
@click.option("--data", required=True, help="zoo:NAME, file.npz, an image folder, or package.module:callable.")
@click.option("--targets", "targets", multiple=True, help="Target profile (repeat); default: the six built-in ones.")
@click.option("--out", "out_path", default=None, help="Recipe file to write (default: recipes/<name>.yaml).")
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
@handle_errors
def init_command(model, weights, data, targets, out_path, force):
    """Write a starter recipe for your model and data, checked as a run would check it."""
    from pathlib import Path

    from edge_pipeline.starter import default_name, write_starter

    path = Path(out_path or f"recipes/{default_name(model)}.yaml")
    written = _with_progress(lambda: write_starter(path, model, data, list(targets) or None, force, weights),
                             log=_temp_log("init"), discard_log=True)
    out.print(f"wrote {written}\nnext: edge-pipeline run {written}")


@main.command("package")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--version", "version", required=True, help="Release version, e.g. 1.2.0.")
@click.option("--dist", default="dist", show_default=True)
@click.option("--allow-failing", is_flag=True, help="Package even if targets failed (recorded in the bundle).")
@click.option("--allow-incomplete", is_flag=True,
              help="Package even if the device test never finished (recorded in the bundle).")
@handle_errors
def package_command(run_dir, version, dist, allow_failing, allow_incomplete):
    """Build dist/<name>-<version>/ and its reproducible tar.gz from a finished run."""
    from pathlib import Path

    from edge_pipeline.stages.package import package

    bundle, tar_path = _with_progress(lambda: package(Path(run_dir), version, Path(dist), allow_failing,
                                                      allow_incomplete=allow_incomplete),
                                      log=Path(run_dir) / "package-log.txt")
    from edge_pipeline.stages.package import measurements_path

    out.print(f"bundle: {bundle}\narchive: {tar_path}\nmeasurements: {measurements_path(tar_path)}")


@main.command("verify")
@click.argument("bundle", type=click.Path(exists=True))
@click.option("--measurements", type=click.Path(exists=True, dir_okay=False),
              help="A measurements JSON that must belong to this archive (default: NAME-VERSION.measurements.json "
                   "beside it, when there).")
@handle_errors
def verify_command(bundle, measurements):
    """Check a bundle's checksums and manifest, then re-run its golden inputs in each runtime; for an archive,
    also that its measurements name its sha256."""
    from edge_pipeline.verify import verify

    res = _with_progress(lambda: verify(bundle, measurements), log=_temp_log("verify"), discard_log=True)
    for name, r in res["targets"].items():
        out.print(f"{name}: golden outputs match (min cosine {r['min_cosine']:.6f}, max abs {r['max_abs']:.3g})")
    if "measurements" in res:
        out.print(f"measurements {res['measurements']} belong to this archive (sha256 {res['archive_sha256']})")
    out.print(f"[green]verified[/green] {res['files']} files in {bundle}")


@main.command("report")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--out", "dest", help="Where to write the HTML (default: RUN_DIR/report.html).")
@handle_errors
def report_command(run_dir, dest):
    """Write the run's self-contained HTML report."""
    from pathlib import Path

    from edge_pipeline.report import write_report

    path = write_report(Path(run_dir), Path(dest) if dest else Path(run_dir) / "report.html")
    out.print(f"report: {path}")


@main.command("bench")
@click.argument("recipes", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--out", "out_md", default="BENCHMARKS.md", show_default=True, help="Markdown table (JSON beside it).")
@click.option("--merge", is_flag=True, help="Keep the other recipes' sections of an earlier bench (each says when "
                                           "and where it was measured); replace only these recipes'.")
@handle_errors
def bench_command(recipes, out_md, merge):
    """Teacher fp32 vs each backend's default int8 flow vs the pipeline, measured in one run."""
    from pathlib import Path

    from edge_pipeline.bench import bench

    with _stdout_to_stderr():
        _with_progress(lambda: bench(list(recipes), Path(out_md), merge=merge))
    out.print(Path(out_md).read_text())


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
