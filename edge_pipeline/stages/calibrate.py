"""The calibrate stage: the representative set for static int8, pinned so a release can be rebuilt bit for bit.

N samples from the training split, stratified by class when there are labels, seeded; written as
``<name>.npz`` (x, y) and ``<name>.json`` (provenance: source, split, seed, sampling, class histogram, input
statistics, sha256). A recipe may point at an existing set, which is checked before use.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np

from edge_pipeline.errors import PipelineError
from edge_pipeline.runstore import sha256_file
from edge_pipeline.sources import Splits
from edge_pipeline.stages import Stage


def draw(data: Splits, n: int, seed: int) -> tuple[tuple[np.ndarray, ...], np.ndarray | None, str]:
    """Seeded draw from the training split only; stratified by class where every class allows it."""
    from sklearn.model_selection import train_test_split

    rng = np.random.default_rng(seed)
    total = len(data.train)
    n = min(n, total)
    y_all = data.train.y
    idx, sampling = None, "uniform"
    if y_all is not None and n < total:
        try:
            idx = train_test_split(np.arange(total), train_size=n, random_state=seed, stratify=y_all)[0]
            sampling = "stratified by class"
        except ValueError:  # a class too rare to stratify: a plain seeded draw, said so in the provenance
            sampling = "uniform (classes too rare to stratify)"
    elif y_all is not None:
        idx, sampling = np.arange(total), "all training rows"
    if idx is None:
        idx = rng.choice(total, n, replace=False)
    idx = np.sort(idx)
    return data.train.rows(idx), None if y_all is None else y_all[idx], sampling


def provenance(data: Splits, x: tuple[np.ndarray, ...], y: np.ndarray | None, seed: int, sampling: str) -> dict:
    hist = None if y is None else {str(c): int((y == i).sum()) for i, c in enumerate(data.classes or [])}
    return {"source": data.source, "data_fingerprint": data.fingerprint(), "split": "train", "seed": seed,
            "sampling": sampling, "samples": len(x[0]), "inputs": [
                {"shape": list(a.shape[1:]), "dtype": str(a.dtype),
                 "stats": None if a.dtype.kind != "f" or not len(a) else {"min": float(a.min()), "max": float(a.max()),
                                                            "mean": float(a.mean()), "std": float(a.std())}}
                for a in x], "class_histogram": hist}


def write_set(base: Path, x: tuple[np.ndarray, ...], y: np.ndarray | None, prov: dict) -> dict:
    base.parent.mkdir(parents=True, exist_ok=True)
    npz = base.with_suffix(".npz")
    tmp = base.with_name(base.name + ".tmp.npz")
    from edge_pipeline.harness import runner as harness

    arrays = {f"input_{i}": a for i, a in enumerate(x)} | ({} if y is None else {"y": y})
    harness.save_npz(tmp, arrays)  # byte-identical for the same draw
    tmp.replace(npz)
    prov = {**prov, "sha256": sha256_file(npz)}
    base.with_suffix(".json").write_text(json.dumps(prov, indent=1) + "\n")
    return prov


def _row_hashes(rows: tuple[np.ndarray, ...]) -> set[str]:
    return {hashlib.sha1(b"".join(np.ascontiguousarray(a[i]).tobytes() for a in rows)).hexdigest()
            for i in range(len(rows[0]))}


def _split_hashes(split) -> set[str]:
    out: set[str] = set()
    for inputs, _ in split.batches(256):
        out |= _row_hashes(inputs)
    return out


def load_set(base: Path, data: Splits) -> tuple[tuple[np.ndarray, ...], dict]:
    """A pinned set, checked: checksum, provenance, data, shapes, dtypes, non-empty, not from the evaluation
    splits."""
    from edge_pipeline.harness import runner as harness

    npz, meta = base.with_suffix(".npz"), base.with_suffix(".json")
    where = str(npz)
    if not meta.is_file():
        raise PipelineError(f"representative set has no provenance file {meta}", where=where,
                            hint="sets are made by edge-pipeline calibrate; delete the .npz to draw a new one")
    prov = json.loads(meta.read_text())
    if prov.get("sha256") != sha256_file(npz):
        raise PipelineError("representative set does not match the sha256 in its provenance (was it edited?)",
                            where=where, hint="delete both files to draw a new set, or restore the original")
    if prov.get("split") != "train":
        raise PipelineError(f"representative set was drawn from the '{prov.get('split')}' split",
                            where=f"{meta}: split", hint="calibration data must come from the training split")
    recorded = prov.get("data_fingerprint")
    if recorded is not None and recorded != data.fingerprint():
        raise PipelineError("representative set was drawn from other data than the recipe's", where=str(meta),
                            hint="delete the set's .npz and .json to draw a new one from this data")
    x = tuple(harness.load_inputs(str(npz)))
    if not x:
        raise PipelineError("representative set has no array 'x' or 'input_0'", where=where)
    example = data.example
    if len(x[0]) == 0:
        raise PipelineError("representative set is empty", where=where, hint="draw at least one sample")
    if len(x) != len(example):
        raise PipelineError(f"representative set has {len(x)} input(s), the data has {len(example)}", where=where,
                            hint="draw a new set for this data")
    for i, (a, e) in enumerate(zip(x, example, strict=True)):
        if a.dtype != e.dtype:
            raise PipelineError(f"representative set input {i} has dtype {a.dtype}, the data has {e.dtype}",
                                where=where)
        if a.shape[1:] != e.shape[1:]:
            raise PipelineError(f"representative set has input shape {tuple(a.shape[1:])}, the data has "
                                f"{tuple(e.shape[1:])}", where=where, hint="draw a new set for this data")
    overlap = _row_hashes(x) & (_split_hashes(data.test) | _split_hashes(data.val))
    if overlap:
        raise PipelineError(f"representative set holds {len(overlap)} sample(s) of the evaluation split",
                            where=where, hint="calibration data must come from the training split only")
    return x, prov


def run(ctx, out: Path) -> dict:
    cfg = ctx.recipe.calibrate
    base = Path(cfg.set) if cfg.set else None
    if base is not None and base.with_suffix(".npz").is_file():
        x, prov = load_set(base, ctx.data)
        pinned = "loaded"
    else:
        x, y, sampling = draw(ctx.data, cfg.samples, cfg.seed)
        prov = provenance(ctx.data, x, y, cfg.seed, sampling)
        if base is not None:
            prov = write_set(base, x, y, prov)
            pinned = "written"
        else:
            pinned = "none"
    if base is not None:
        shutil.copy(base.with_suffix(".npz"), out / "calibration.npz")
        shutil.copy(base.with_suffix(".json"), out / "calibration.json")
    else:
        prov = write_set(out / "calibration", x, y, prov)
    return {"samples": len(x[0]), "sha256": prov["sha256"], "pinned_set": str(base) if base else None,
            "pinned": pinned, "sampling": prov.get("sampling"), "class_histogram": prov.get("class_histogram")}


def pinned_set_hash(recipe) -> str | None:
    """A pinned representative set's recorded sha256, so editing the set re-runs everything downstream."""
    if not recipe.calibrate.set:
        return None
    npz = Path(recipe.calibrate.set).with_suffix(".npz")
    return sha256_file(npz) if npz.is_file() else None


STAGE = Stage("calibrate", 3, (), lambda r: {"data": r.data, **r.calibrate.model_dump()},
              lambda r: any(t for t in r.targets),
              external=lambda ctx: {"data": ctx.data_fingerprint, "set": pinned_set_hash(ctx.recipe)},
              command="Draw (or check) the pinned representative set.", summary_keys=("samples", "pinned"),
              card=lambda c, m: f"- **calibrate**: {c['samples']} samples from the training split.")
