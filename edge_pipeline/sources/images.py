"""Image folders (one sub-folder per class), read lazily with the recipe's preprocessing.

The preprocessing is plain data (mode, resize, centre crop, scale, mean/std, channel order, layout) so that it
is recorded in the manifest and the model card and an app can reproduce it exactly. Done with PIL and numpy:
there is no CPU build of torchvision to lean on.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path

import numpy as np

from edge_pipeline.errors import PipelineError
from edge_pipeline.presets import IMAGENET_1K
from edge_pipeline.sources.data import IMAGE_SUFFIXES, SPLIT_FRACTIONS, Splits, split_dataset

DEFAULT_PREPROCESS = {"mode": "auto", "resize": None, "center_crop": None, "preset": None, "scale": 1 / 255,
                      "mean": None, "std": None, "channel_order": "RGB", "layout": "NCHW"}


def resolve_mode(first_image, mode: str) -> str:
    """``auto`` keeps grayscale images grayscale (1 channel) and makes everything else RGB (3 channels)."""
    if mode != "auto":
        return mode
    return "L" if first_image.mode in ("1", "L", "LA", "I", "I;16", "F") else "RGB"


def preprocess(img, p: dict) -> np.ndarray:
    """One PIL image to the model's input array, exactly as recorded in ``p``."""
    from PIL import Image

    img = img.convert(p["mode"])
    if p["resize"]:
        r = p["resize"]
        if isinstance(r, int):  # the shorter side to r, aspect kept (torchvision's Resize(int))
            w, h = img.size
            s = r / min(w, h)
            r = (max(1, round(w * s)), max(1, round(h * s)))
        else:
            r = (r[1], r[0])  # recipe gives [height, width]; PIL takes (width, height)
        img = img.resize(r, Image.BILINEAR)
    if p["center_crop"]:
        ch, cw = (p["center_crop"],) * 2 if isinstance(p["center_crop"], int) else p["center_crop"]
        w, h = img.size
        left, top = (w - cw) // 2, (h - ch) // 2
        img = img.crop((left, top, left + cw, top + ch))
    a = np.asarray(img, dtype=np.float32) * p["scale"]
    if a.ndim == 2:
        a = a[:, :, None]
    if p["channel_order"] == "BGR":
        a = a[:, :, ::-1]
    if p["mean"] is not None:
        a = a - np.asarray(p["mean"], dtype=np.float32)
    if p["std"] is not None:
        a = a / np.asarray(p["std"], dtype=np.float32)
    if p["layout"] == "NCHW":
        a = a.transpose(2, 0, 1)
    return np.ascontiguousarray(a, dtype=np.float32)


class ImageFolderDataset:
    """``(image array, class id)`` per file, decoded on access; ``targets`` lets splits read labels cheaply."""

    def __init__(self, files: list[Path], targets: list[int], p: dict):
        self.files, self.targets, self.p = files, targets, p

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(self.files[i]) as img:
                return preprocess(img, self.p), self.targets[i]
        except (UnidentifiedImageError, OSError) as e:
            raise PipelineError(f"cannot read image: {e}", where=str(self.files[i]),
                                hint="remove or replace the file") from None


def read_class_list(spec: str, where: str) -> list[str]:
    """The class names in output order: ``imagenet-1k`` (shipped) or a file of one name per line."""
    path = Path(__file__).with_name("imagenet_1k_synsets.txt") if spec == IMAGENET_1K else Path(spec)
    if not path.is_file():
        raise PipelineError(f"class list not found: {spec}", where=where,
                            hint=f"give a file with one class name per line, in the model's output order, or "
                                 f"{IMAGENET_1K}")
    names = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if not names or repeated:
        raise PipelineError(f"class list {spec} " + (f"names {repeated[0]} twice" if repeated else "is empty"),
                            where=where, hint="one distinct class name per line")
    return names


def _label_ids(found: list[str], classes: list[str] | None, what: list[str], where: str,
               list_name: str | None) -> tuple[list[int], list[str]]:
    """Class names per image to ids: by their place in the class list, else in sorted order."""
    if classes is None:
        classes = sorted(set(found))
        return [classes.index(c) for c in found], classes
    index = {c: i for i, c in enumerate(classes)}
    for name, item in zip(found, what, strict=True):
        if name not in index:
            close = difflib.get_close_matches(name, classes, n=1)
            raise PipelineError(f"class '{name}' of {item} is not in the class list {list_name}", where=where,
                                hint=(f"did you mean {close[0]}? " if close else "")
                                     + "the class list must name every class the folder holds")
    return [index[c] for c in found], classes


def load_image_folder(path: Path, options: dict | None = None, labels: dict | None = None,
                      fractions=SPLIT_FRACTIONS) -> Splits:
    """Images with their classes: one sub-folder per class (ImageNet's own layout), or the class read from each
    file name by ``labels['pattern']``; ``labels['classes']`` fixes the class ids."""
    from PIL import Image

    labels = labels or {}
    where = str(path)
    classes = read_class_list(labels["classes"], f"{where}: labels.classes") if labels.get("classes") else None
    files, found, what = [], [], []
    if labels.get("pattern"):
        pattern = re.compile(labels["pattern"])
        for f in sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
            m = pattern.search(f.name)
            if m is None:
                raise PipelineError(f"file name {f.name} does not match labels.pattern {pattern.pattern!r}",
                                    where=str(f), hint="fix the pattern, or move files that are not data away")
            files.append(f)
            found.append(m.group("class"))
            what.append(f"file {f.relative_to(path)}")
    else:
        class_dirs = sorted(p for p in path.iterdir() if p.is_dir())
        if not class_dirs:
            raise PipelineError(f"image folder {path} has no class sub-folders", where=where,
                                hint="lay images out as FOLDER/<class>/<image>.png, or read classes from file "
                                     "names with labels.pattern")
        for d in class_dirs:
            for f in sorted(d.iterdir()):
                if f.suffix.lower() in IMAGE_SUFFIXES:
                    files.append(f)
                    found.append(d.name)
                    what.append(f"sub-folder {d.name}")
    if not files:
        raise PipelineError(f"image folder {path} holds no images", where=where)
    targets, classes = _label_ids(found, classes, what, where, labels.get("classes"))
    p = {**DEFAULT_PREPROCESS, **(options or {})}
    with Image.open(files[0]) as first:
        p["mode"] = resolve_mode(first, p["mode"])
        if not p["resize"] and not p["center_crop"]:
            p["resize"] = [first.size[1], first.size[0]]  # every image to the first one's size
    return split_dataset(ImageFolderDataset(files, targets, p), str(path), classes, preprocessing=p,
                         fractions=fractions)
