"""Stage 3: the representative set for static int8, pinned so a release can be rebuilt bit for bit.

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


def draw(data: Splits, n: int, seed: int) -> tuple[np.ndarray, np.ndarray | None, str]:
    """Seeded draw from the training split only; stratified by class when labels exist."""
    rng = np.random.default_rng(seed)
    n = min(n, len(data.train))
    if data.train.y is None:
        idx = rng.choice(len(data.train), n, replace=False)
        sampling = "uniform"
    else:
        from sklearn.model_selection import train_test_split

        idx = np.arange(len(data.train)) if n == len(data.train) else train_test_split(
            np.arange(len(data.train)), train_size=n, random_state=seed, stratify=data.train.y)[0]
        sampling = "stratified by class"
    idx = np.sort(idx)
    y = None if data.train.y is None else data.train.y[idx]
    return np.ascontiguousarray(data.train.x[idx]), y, sampling


def provenance(data: Splits, x: np.ndarray, y: np.ndarray | None, seed: int, sampling: str) -> dict:
    hist = None if y is None else {str(c): int((y == i).sum()) for i, c in enumerate(data.classes or [])}
    return {"source": data.source, "split": "train", "seed": seed, "sampling": sampling, "samples": len(x),
            "shape": list(x.shape[1:]), "dtype": str(x.dtype), "class_histogram": hist,
            "input_stats": None if not len(x) else {"min": float(x.min()), "max": float(x.max()),
                                                    "mean": float(x.mean()), "std": float(x.std())}}


def write_set(base: Path, x: np.ndarray, y: np.ndarray | None, prov: dict) -> dict:
    base.parent.mkdir(parents=True, exist_ok=True)
    npz = base.with_suffix(".npz")
    tmp = base.with_name(base.name + ".tmp.npz")
    arrays = {"x": x} if y is None else {"x": x, "y": y}
    np.savez(tmp, **arrays)
    tmp.replace(npz)
    prov = {**prov, "sha256": sha256_file(npz)}
    base.with_suffix(".json").write_text(json.dumps(prov, indent=1) + "\n")
    return prov


def _row_hashes(x: np.ndarray) -> set[str]:
    return {hashlib.sha1(np.ascontiguousarray(r).tobytes()).hexdigest() for r in x}


def load_set(base: Path, data: Splits) -> tuple[np.ndarray, dict]:
    """A pinned set, checked: checksum, provenance, shape, dtype, non-empty, not from the evaluation split."""
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
    with np.load(npz, allow_pickle=False) as z:
        if "x" not in z.files:
            raise PipelineError("representative set has no array 'x'", where=where)
        x = z["x"]
    if len(x) == 0:
        raise PipelineError("representative set is empty", where=where, hint="draw at least one sample")
    if x.dtype != np.float32:
        raise PipelineError(f"representative set has dtype {x.dtype}, the model takes float32", where=where)
    if tuple(x.shape[1:]) != data.input_shape:
        raise PipelineError(f"representative set has input shape {tuple(x.shape[1:])}, the data has "
                            f"{data.input_shape}", where=where, hint="draw a new set for this data")
    overlap = _row_hashes(x) & (_row_hashes(data.test.x) | _row_hashes(data.val.x))
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
    return {"samples": len(x), "sha256": prov["sha256"], "pinned_set": str(base) if base else None,
            "pinned": pinned, "class_histogram": prov.get("class_histogram")}
