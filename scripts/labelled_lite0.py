"""What the EfficientNet-Lite0 measurement scripts share: the labelled recipe's data, model, evaluator,
calibration rows, one test row saved for the runner, and the local device."""

import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from edge_pipeline.devices import LocalDevice, parse_device
from edge_pipeline.evaluation import Evaluator, resolve_metric
from edge_pipeline.harness import runner
from edge_pipeline.interface import discover
from edge_pipeline.recipe import load_recipe
from edge_pipeline.sources import build_model, load_data

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "efficientnet-lite0-imagenet.yaml"


def setup() -> SimpleNamespace:
    """recipes/efficientnet-lite0-imagenet.yaml's photos (EDGE_PIPELINE_IMAGENET), its published-weights model
    and calibration rows, a top-1 evaluator on its test split, a temporary folder, and the local device."""
    r = load_recipe(str(RECIPE))
    data = load_data(r.data, preprocess=r.preprocess.model_dump(), labels=r.labels.model_dump(),
                     fractions=r.split.fractions())
    model = build_model(r.model, data.num_classes, data.input_shape[0]).eval()
    iface = discover(model, data.example)
    tmp = Path(tempfile.mkdtemp())
    runner.save_inputs(tmp / "row.npz", data.test.rows(np.arange(1)))
    return SimpleNamespace(
        data=data, model=model, iface=iface, tmp=tmp, row=tmp / "row.npz",
        evaluator=Evaluator(data, iface, resolve_metric("top1", iface.output_names, True, None), model),
        calibration=tuple(data.train.rows(np.arange(min(r.calibrate.samples, len(data.train))))),
        device=LocalDevice(parse_device("local"), 600))
