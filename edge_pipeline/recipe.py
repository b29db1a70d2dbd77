"""The recipe: a YAML file naming the model, the data, each stage's config, the targets and the devices.

Everything is validated before any work starts; an error names the file, the key and what was expected.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from edge_pipeline.errors import PipelineError, all_of
from edge_pipeline.presets import IMAGENET_1K, PREPROCESS_PRESETS


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TeacherTrainConfig(_Strict):
    """How a zoo teacher is trained when the model source needs training (zoo models only)."""

    epochs: int = Field(30, ge=1)
    lr: float = Field(2e-3, gt=0)
    batch_size: int = Field(64, ge=1)
    seed: int = 0


class PruneConfig(_Strict):
    enabled: bool = True
    method: Literal["structured", "unstructured", "2:4"] = "structured"
    # obd: Optimal Brain Damage, saliency 1/2 h w^2 with the Hessian diagonal h estimated by the squared
    # per-row gradients of the loss against the unpruned model (the empirical Fisher); entropy: the entropy of
    # each channel's globally pooled activation (Luo & Wu 2017). taylor, obd and entropy read the first
    # importance_batches batches of the train split.
    importance: Literal["l1", "l2", "bn_scale", "taylor", "obd", "entropy"] = "l2"
    importance_batches: int = Field(4, ge=1)
    # Exactly one target: a channel ratio, or a budget (absolute or as a fraction of the teacher).
    ratio: float | None = Field(None, gt=0, lt=1)
    max_macs: float | None = Field(None, gt=0)
    max_params: float | None = Field(None, gt=0)
    global_pruning: bool = False
    max_layer_ratio: float = Field(0.9, gt=0, le=1)
    # Kept channel counts are multiples of this (e.g. 8): the int8 kernels of XNNPACK, ORT and LiteRT work in
    # tiles of 8/16 channels, and an odd count (69) wastes the rest of its last tile. Off by default: on narrow
    # layers (16 channels) one rounded step halves the layer and overshoots a budget.
    round_to: int | None = Field(None, ge=1)
    iterative_steps: int = Field(3, ge=1)
    finetune_epochs: int = Field(3, ge=0)
    lr: float = Field(1e-3, gt=0)
    ignore: list[str] = []
    ignore_types: list[str] = []
    sensitivity_scan: bool = False
    scan_ratios: list[float] = [0.25, 0.5, 0.75]
    seed: int = 0


class DistillConfig(_Strict):
    enabled: bool = True
    student: str = "pruned"  # "pruned" | "teacher@WIDTH" | a model source (zoo:NAME, pkg.mod:callable)
    alpha: float = Field(0.7, ge=0, le=1)
    temperature: float = Field(4.0, gt=0)
    soft_only: bool = False
    # Outputs distilled as class scores (KL at the temperature); every other output is matched with MSE.
    # Default: the metric's output when the data has labels, else none (all MSE: boxes, embeddings, scores).
    logit_outputs: list[str] | None = None
    hint_layers: list[tuple[str, str]] = []  # (student layer, teacher layer)
    hint_weight: float = Field(1.0, ge=0)
    epochs: int = Field(40, ge=1)
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    warmup_epochs: int = Field(2, ge=0)
    batch_size: int = Field(64, ge=1)
    patience: int = Field(10, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0


class ClusterConfig(_Strict):
    """Weight clustering after distill (k-means into 2^bits centres per layer, then a short fine-tune of the
    centres with the distill loss against the unclustered model). Off by default."""

    enabled: bool = False
    bits: int = Field(4, ge=2, le=8)
    layer_bits: dict[str, int] = {}  # per-layer bits (module path: 2..8) over ``bits``
    # density (quantiles) by default: on mobilenet32 at 4 bits it kept 93.6% top-1 before the fine-tune where
    # linear (Deep Compression's choice) kept 68.1% (BatchNorm folded, one codebook over channels of unlike ranges)
    init: Literal["density", "linear", "random"] = "density"
    iterations: int = Field(30, ge=1)  # Lloyd's iterations of k-means (it stops early once nothing moves)
    skip: list[str] = []  # layers (module paths, and everything under them) left unclustered
    keep_head: bool = True  # the layers that make the model's outputs stay unclustered
    epochs: int = Field(3, ge=0)  # fine-tune of the centres; 0: none
    lr: float = Field(1e-3, gt=0)
    batch_size: int = Field(64, ge=1)
    patience: int = Field(10, ge=1)
    seed: int = 0


class QatConfig(_Strict):
    """Quantization-aware training after distill: off, on (every int8 target) or auto (only the int8 targets
    whose post-training build misses max_accuracy_drop on val). Trained with the distill stage's loss."""

    mode: Literal["off", "auto", "on"] = "off"
    epochs: int = Field(6, ge=1)
    lr: float = Field(1e-4, gt=0)
    batch_size: int = Field(32, ge=2, le=64)  # <= 64: the batch the shared float export is traced up to
    freeze_bn_epoch: int = Field(2, ge=0)  # BatchNorm statistics frozen from this epoch on (counted from 0)
    freeze_observers_epoch: int = Field(4, ge=0)  # quantizer ranges frozen from this epoch on
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0


class CalibrateConfig(_Strict):
    set: str | None = None  # path (without suffix) of a pinned set; drawn and written there when missing
    samples: int = Field(256, ge=1)
    seed: int = 0
    sensitivity: bool = True  # leave-one-out per layer, only for a target that misses its accuracy budget


class DeviceTestConfig(_Strict):
    enabled: bool = True
    runs: int = Field(100, ge=1)
    warmup: int = Field(10, ge=0)
    threads: int | None = Field(None, ge=1)  # None: each target profile's own thread count
    timeout_s: float = Field(300, gt=0)
    profile: bool = True  # each target's per-operator profile, from its runtime's own profiler


class PackageConfig(_Strict):
    enabled: bool = True
    version: str = "0.1.0"
    dist: str = "dist"
    allow_failing: bool = False


class PreprocessConfig(_Strict):
    """How an image folder's files become model inputs; recorded in the bundle so an app can do the same."""

    mode: Literal["auto", "RGB", "L", "RGBA"] = "auto"  # auto: grayscale files stay 1-channel, others RGB
    resize: int | tuple[int, int] | None = None  # int: shorter side (aspect kept); [height, width]: exact
    center_crop: int | tuple[int, int] | None = None
    preset: Literal["imagenet", "lite", "inception"] | None = None  # sets scale, mean and std
    scale: float = Field(1 / 255, gt=0)  # pixel values times this, before mean/std
    mean: list[float] | None = None
    std: list[float] | None = None
    channel_order: Literal["RGB", "BGR"] = "RGB"
    layout: Literal["NCHW", "NHWC"] = "NCHW"

    @model_validator(mode="before")
    @classmethod
    def _expand_preset(cls, v):
        if not isinstance(v, dict) or v.get("preset") is None:
            return v
        clash = sorted({"scale", "mean", "std"} & set(v))
        if clash:
            raise ValueError(f"preset '{v['preset']}' sets scale, mean and std; also given: {', '.join(clash)} "
                             "(give the preset or the three values)")
        return {**v, **PREPROCESS_PRESETS.get(v["preset"], {})}


class LabelsConfig(_Strict):
    """Which output index each class is, for an image folder: ``classes`` fixes the ids (a file of one class name
    per line, or ``imagenet-1k``: the 1000 synsets sorted, the order of every ImageNet classifier's outputs) so
    that a folder holding some of the classes still gets the model's own ids; ``pattern`` reads each photo's
    class from its file name (a regular expression with a group named ``class``) instead of its sub-folder."""

    classes: str | None = None
    pattern: str | None = None

    @field_validator("pattern")
    @classmethod
    def _pattern_has_a_class_group(cls, v: str | None) -> str | None:
        import re

        if v is None:
            return v
        try:
            compiled = re.compile(v)
        except re.error as e:
            raise ValueError(f"not a regular expression: {e}") from None
        if "class" not in compiled.groupindex:
            raise ValueError("needs a group named 'class', e.g. '_(?P<class>n[0-9]{8})_'")
        return v


class SplitConfig(_Strict):
    """The shares of validation and test rows where the pipeline splits the data itself (files, arrays, an
    image folder, a Dataset); the rest trains and calibrates. Built-in zoo data keeps its own split."""

    val: float = Field(0.2, gt=0, lt=1)
    test: float = Field(0.2, gt=0, lt=1)

    @model_validator(mode="after")
    def _leaves_training_rows(self):
        if self.val + self.test >= 1:
            raise ValueError(f"val {self.val} + test {self.test} leaves no training rows; keep the sum below 1")
        return self

    def fractions(self) -> tuple[float, float]:
        """(train, val) as the splitters take them."""
        return (round(1 - self.val - self.test, 12), self.val)


class Recipe(_Strict):
    name: str
    description: str = ""
    model: str
    weights: str | None = None  # a state_dict file for the model (loaded with weights_only=True)
    data: str
    preprocess: PreprocessConfig = PreprocessConfig()
    labels: LabelsConfig = LabelsConfig()
    split: SplitConfig = SplitConfig()
    # top1 | top5 | cosine | sqnr | max_abs | package.module:callable(outputs, labels) -> float; auto: top1 with
    # labels, else cosine against the float teacher. Budgets (max_accuracy_drop) apply to it.
    metric: str = "auto"
    metric_output: str | None = None  # the output top1/top5 score (default: the first)
    train: TeacherTrainConfig = TeacherTrainConfig()
    prune: PruneConfig = PruneConfig()
    distill: DistillConfig = DistillConfig()
    cluster: ClusterConfig = ClusterConfig()
    calibrate: CalibrateConfig = CalibrateConfig()
    qat: QatConfig = QatConfig()
    targets: list[str] = []
    devices: list[str] = ["local"]
    device_test: DeviceTestConfig = DeviceTestConfig()
    package: PackageConfig = PackageConfig()
    output: str = "runs"

    @field_validator("name")
    @classmethod
    def _name_is_a_folder_name(cls, v: str) -> str:
        if not v or not all(c.isalnum() or c in "-_." for c in v) or v.startswith("."):
            raise ValueError("must be letters, digits, '-', '_' or '.', used as a folder name")
        return v


def _key_path(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _explain(err: dict, source: str) -> PipelineError:
    key = _key_path(err["loc"])
    kind = err["type"]
    if kind == "extra_forbidden":
        parent = Recipe
        for part in err["loc"][:-1]:
            field = parent.model_fields.get(part) if isinstance(part, str) else None
            parent = field.annotation if field is not None and isinstance(field.annotation, type) else None
            if parent is None or not issubclass(parent, BaseModel):
                parent = None
                break
        known = sorted(parent.model_fields) if parent else []
        close = difflib.get_close_matches(str(err["loc"][-1]), known, n=2)
        hint = f"did you mean {' or '.join(close)}?" if close else f"known keys here: {', '.join(known)}"
        return PipelineError(f"unknown key '{err['loc'][-1]}'", where=f"{source}: {key}", hint=hint)
    if kind == "missing":
        return PipelineError(f"missing required key '{err['loc'][-1]}'", where=f"{source}: {key}")
    return PipelineError(
        f"invalid value {err.get('input')!r}: {err['msg']}", where=f"{source}: {key}"
    )


def parse_recipe(data: object, source: str = "<recipe>") -> Recipe:
    if not isinstance(data, dict):
        raise PipelineError("a recipe must be a YAML mapping", where=source, hint="see recipes/digits.yaml")
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise all_of([_explain(err, source) for err in e.errors()]) from None


def expand_env(value, key: str):
    """``${NAME}`` and ``${NAME:-default}`` in a path from the environment, so that one recipe serves data kept
    in a different folder on each machine (``EDGE_PIPELINE_IMAGENET=/data/imagenet/val``)."""
    import os
    import re

    if not isinstance(value, str):
        return value

    def sub(m):
        name, default = m.group(1), m.group(3)
        if name in os.environ:
            return os.environ[name]
        if default is None:
            raise PipelineError(f"environment variable {name} is not set", where=key,
                                hint=f"set {name}, or write ${{{name}:-default}} in the recipe")
        return default
    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:-([^}]*))?\}", sub, value)


def resolve_paths(doc: dict, base: Path) -> dict:
    """Every relative path written in a recipe (weights, data, output, calibrate.set, package.dist, target
    .yaml files) is taken relative to the recipe file's folder, so a project recipe means the same files from
    whatever folder it is run. Sources such as zoo:NAME or package.module:callable are left as they are."""
    import os

    def fix(v):
        if isinstance(v, str) and v and ":" not in v and not Path(v).is_absolute():
            return os.path.normpath(base / v)
        return v

    doc = dict(doc)
    for key in ("weights", "data", "output"):
        if key in doc:
            doc[key] = fix(expand_env(doc[key], key))
    labels = doc.get("labels")
    if isinstance(labels, dict) and labels.get("classes") not in (None, IMAGENET_1K):
        doc["labels"] = {**labels, "classes": fix(expand_env(labels["classes"], "labels.classes"))}
    for section, key in (("calibrate", "set"), ("package", "dist")):
        if isinstance(doc.get(section), dict) and key in doc[section]:
            doc[section] = {**doc[section], key: fix(doc[section][key])}
    if isinstance(doc.get("targets"), list):
        doc["targets"] = [fix(t) if isinstance(t, str) and t.endswith((".yaml", ".yml")) else t
                          for t in doc["targets"]]
    return doc


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe file; the model and data sources are checked too (cheaply, no loading)."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"recipe file not found: {path}", hint="pass a path such as recipes/digits.yaml")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise PipelineError(f"not valid YAML: {e}", where=str(path)) from None
    if isinstance(data, dict):
        data = resolve_paths(data, path.parent.absolute())
    recipe = parse_recipe(data, str(path))
    check_references(recipe, str(path), base=path.parent)
    return recipe


def check_references(recipe: Recipe, source: str, base: Path) -> None:
    """Fail early on sources, targets and devices that do not exist, before any folder is written."""
    from edge_pipeline import sources, targets
    from edge_pipeline.devices import parse_device

    problems: list[PipelineError] = []  # every reference is checked and every problem reported at once

    def check(fn, *args, **kwargs) -> None:
        try:
            fn(*args, **kwargs)
        except PipelineError as e:
            problems.append(e)

    check(sources.check_model_source, recipe.model, where=f"{source}: model")
    check(sources.check_data_source, recipe.data, where=f"{source}: data")
    if recipe.weights and not Path(recipe.weights).is_file():
        problems.append(PipelineError(f"weights file not found: {recipe.weights}", where=f"{source}: weights"))
    if recipe.distill.student not in ("pruned",) and not recipe.distill.student.startswith("teacher@"):
        check(sources.check_model_source, recipe.distill.student, where=f"{source}: distill.student")
    for i, name in enumerate(recipe.targets):
        check(targets.load_profile, name, where=f"{source}: targets[{i}]")
    for i, dev in enumerate(recipe.devices):
        check(parse_device, dev, where=f"{source}: devices[{i}]")
    if problems:
        raise all_of(problems)
