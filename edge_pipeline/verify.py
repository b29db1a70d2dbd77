"""``edge-pipeline verify``: is this bundle intact, and do its models still give their recorded outputs?

A tar.gz is unpacked safely first: entries that would escape the folder, links and device files are refused.
The measurements beside an archive (``NAME-VERSION.measurements.json``, or a file given) must name that
archive's sha256: figures measured of another build are refused.
"""

from __future__ import annotations

import json
import tarfile
import tempfile
from pathlib import Path, PurePosixPath

from edge_pipeline.errors import PipelineError
from edge_pipeline.runstore import sha256_file
from edge_pipeline.stages.package import MANIFEST_SCHEMA, file_table, measurements_path

REQUIRED_KEYS = {"schema", "name", "version", "targets", "files", "toolchain", "recipe"}
GOLDEN_MIN_COSINE = 0.999


def safe_extract(tar_path: Path, dest: Path) -> Path:
    """Unpack regular files and folders only, each inside ``dest``; returns the bundle's top folder. A truncated
    or corrupt archive (EOFError, zlib and tar errors, raised while reading on) is bad input, said plainly."""
    import zlib

    try:
        return _safe_extract(tar_path, dest)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise PipelineError(f"not a readable .tar.gz (truncated or corrupt?): {type(e).__name__}: {e}",
                            where=str(tar_path), hint="copy the archive again and compare its sha256") from None


def _safe_extract(tar_path: Path, dest: Path) -> Path:
    with tarfile.open(tar_path, "r:gz") as tar:
        members = tar.getmembers()
        for m in members:
            path = PurePosixPath(m.name)
            if path.is_absolute() or ".." in path.parts or not m.name:
                raise PipelineError(f"archive entry '{m.name}' would escape the folder", where=str(tar_path),
                                    hint="this archive was not made by edge-pipeline package; do not use it")
            if not (m.isfile() or m.isdir()):
                kind = "link" if (m.issym() or m.islnk()) else "device or special file"
                raise PipelineError(f"archive entry '{m.name}' is a {kind}", where=str(tar_path),
                                    hint="bundles hold regular files only")
        tops = {PurePosixPath(m.name).parts[0] for m in members}
        if len(tops) != 1:
            raise PipelineError("archive does not hold exactly one bundle folder", where=str(tar_path))
        tar.extractall(dest, members=members, filter="data")
    return dest / tops.pop()


def verify_dir(bundle: Path) -> dict:
    """Checksums, manifest schema, missing and extra files, then the golden inputs in each runtime."""
    mpath = bundle / "manifest.json"
    if not mpath.is_file():
        raise PipelineError("manifest.json is missing", where=str(bundle))
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise PipelineError(f"manifest.json is not valid JSON: {e}", where=str(mpath)) from None
    missing_keys = REQUIRED_KEYS - set(manifest)
    if missing_keys or manifest.get("schema") != MANIFEST_SCHEMA:
        raise PipelineError(f"manifest.json does not fit schema {MANIFEST_SCHEMA}: missing {sorted(missing_keys)}"
                            f" or schema {manifest.get('schema')!r}", where=str(mpath))
    recorded, actual = manifest["files"], file_table(bundle)
    for rel in sorted(recorded):
        if rel not in actual:
            raise PipelineError(f"file listed in the manifest is missing: {rel}", where=str(bundle / rel))
        if actual[rel]["sha256"] != recorded[rel]["sha256"] or actual[rel]["size"] != recorded[rel]["size"]:
            raise PipelineError(f"checksum mismatch: {rel}", where=str(bundle / rel),
                                hint="the file changed after packaging; rebuild the bundle")
    extra = sorted(set(actual) - set(recorded))
    if extra:
        raise PipelineError(f"file not in the manifest: {extra[0]}", where=str(bundle / extra[0]),
                            hint="a bundle holds exactly the files its manifest lists")
    from edge_pipeline.evaluation import output_agreement, run_artifact
    from edge_pipeline.harness import runner
    from edge_pipeline.sources.data import ArraySplit

    golden = ArraySplit(tuple(runner.load_inputs(str(bundle / "golden" / "inputs.npz"))), None)
    results = {}
    for name, t in manifest["targets"].items():
        expected = runner.load_outputs(str(bundle / "golden" / f"{name}.npz"))
        got = run_artifact(bundle / t["artifact"], golden)
        per = [output_agreement(g, e) for g, e in zip(got, expected, strict=True)]
        results[name] = {"max_abs": max(p["max_abs"] for p in per), "min_cosine": min(p["cosine_min"] for p in per),
                         "top1_agreement": min((p["top1_agreement"] for p in per if "top1_agreement" in p),
                                               default=1.0)}
        if results[name]["min_cosine"] < GOLDEN_MIN_COSINE or results[name]["top1_agreement"] < 1.0:
            raise PipelineError(f"golden outputs differ for target {name}: {results[name]}",
                                where=str(bundle / t["artifact"]))
    return {"bundle": str(bundle), "files": len(recorded), "targets": results}


def check_measurements(tar_path: Path, measurements: Path) -> dict:
    """The measurements file must be about this archive (its ``archive_sha256``); returns its summary."""
    try:
        doc = json.loads(measurements.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PipelineError(f"measurements file is not readable JSON: {e}", where=str(measurements)) from None
    digest = sha256_file(tar_path)
    if not isinstance(doc, dict) or doc.get("archive_sha256") != digest:
        raise PipelineError(f"the measurements are of another archive: they name sha256 "
                            f"{doc.get('archive_sha256') if isinstance(doc, dict) else None}, this archive's is "
                            f"{digest}", where=str(measurements),
                            hint="use the measurements written with this archive, or test this release again "
                                 "(edge-pipeline test RUN, then package)")
    return {"measurements": str(measurements), "archive_sha256": digest}


def verify(path: str | Path, measurements: str | Path | None = None) -> dict:
    """A bundle folder or archive; for an archive also its measurements (given, or the file beside it)."""
    path = Path(path)
    if path.is_dir():
        if measurements is not None:
            raise PipelineError("measurements name an archive's sha256: give the .tar.gz, not its folder",
                                where=str(path))
        return verify_dir(path)
    if path.is_file():
        given = Path(measurements) if measurements is not None else measurements_path(path)
        checked = check_measurements(path, given) if measurements is not None or given.is_file() else {}
        with tempfile.TemporaryDirectory() as tmp:
            return verify_dir(safe_extract(path, Path(tmp))) | checked
    raise PipelineError(f"no bundle folder or archive at {path}", where=str(path))
