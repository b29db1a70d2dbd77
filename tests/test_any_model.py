"""Any model in: N inputs and outputs, non-classifiers, user metrics, and the data forms users really have."""

import numpy as np
import pytest
import realshaped as rs
import torch
from edge_support import evaluator_for
from torch import nn

from edge_pipeline.errors import PipelineError
from edge_pipeline.evaluation import predict, resolve_metric
from edge_pipeline.interface import ModelInterface, discover
from edge_pipeline.recipe import PruneConfig
from edge_pipeline.sources import load_data
from edge_pipeline.sources.data import StreamSplit, split_arrays
from edge_pipeline.stages.prune import output_layers, prune


def test_interface_names_inputs_after_forward_and_flattens_dict_outputs():
    data = load_data("realshaped:token_splits")
    iface = discover(rs.tiny_encoder(), data.example, data.input_names)
    assert [(s.name, s.dtype, s.shape) for s in iface.inputs] == [("input_ids", "int64", (rs.SEQ,)),
                                                                    ("attention_mask", "int64", (rs.SEQ,))]
    heads = discover(rs.three_heads(), (np.zeros((2, 3, 24, 24), np.float32),))
    assert heads.input_names == ["image"] and heads.output_names == ["boxes", "landmarks", "prob"]
    assert [o.shape for o in heads.outputs] == [(4,), (10,), (2,)]
    assert ModelInterface.from_dict(heads.to_dict()) == heads


class ReturnsNone(nn.Module):
    def forward(self, x):
        return {"y": x * 2, "extra": None}


class NoBatchDim(nn.Module):
    def forward(self, x):
        return x.sum()


@pytest.mark.parametrize("model, message", [
    (ReturnsNone(), "model output 'extra' is a NoneType, not a tensor"),
    (NoBatchDim(), "no batch dimension"),
    (nn.Linear(3, 2), "the model fails on an example batch"),
])
def test_outputs_that_cannot_be_flattened_are_refused_naming_them(model, message):
    with pytest.raises(PipelineError, match=message):
        discover(model, (np.zeros((2, 4), np.float32),))


def test_input_dtype_no_backend_takes_is_refused():
    with pytest.raises(PipelineError, match="dtype complex64"):
        split_arrays(np.zeros((20, 3), np.complex64), None, None, "test")


def test_image_folder_keeps_rgb_and_applies_the_recorded_preprocessing(tmp_path):
    rs.write_rgb_folder(tmp_path / "imgs", per_class=4)
    pre = {"resize": 20, "center_crop": 16, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    data = load_data(str(tmp_path / "imgs"), preprocess=pre)
    assert isinstance(data.train, StreamSplit), "image folders are read on demand"
    assert data.input_shape == (3, 16, 16) and data.classes == ["blue", "green", "red"]
    assert data.preprocessing["mode"] == "RGB" and data.preprocessing["center_crop"] == 16
    # The red class is red: channel 0 brightest at the disc, after the same mean/std an app applies.
    from PIL import Image

    from edge_pipeline.sources.images import preprocess

    img = Image.open(next((tmp_path / "imgs" / "red").glob("*.png")))
    a = preprocess(img, data.preprocessing)
    assert a.shape == (3, 16, 16) and a[0].max() > a[2].max()


def test_long_tailed_labels_split_without_crashing_and_calibration_draws():
    from edge_pipeline.stages.calibrate import draw

    y = np.array([0] * 60 + [1] * 30 + [2] * 5 + [3, 4])  # classes 3 and 4 have one sample each
    data = split_arrays(np.random.default_rng(0).random((len(y), 4), dtype=np.float32), y, None, "tail")
    assert len(data.train) + len(data.val) + len(data.test) == len(y) and data.num_classes == 5
    x, _, sampling = draw(data, 20, seed=0)
    assert len(x[0]) == 20 and "uniform" in sampling


def test_string_labels_become_class_names():
    y = np.array(["cat", "dog", "bird"] * 10)
    data = split_arrays(np.zeros((30, 2), np.float32), y, None, "strings")
    assert data.classes == ["bird", "cat", "dog"] and set(np.unique(data.train.y)) <= {0, 1, 2}


@pytest.mark.parametrize("x, y, message", [
    (np.zeros((30, 2)), np.r_[np.arange(29) % 3, -1], "label at row 29 is -1"),
    (np.zeros((30, 2)), np.arange(29) % 3, r"different lengths \(input 0: 30, labels: 29\)"),
    (np.zeros((5, 2)), np.arange(5) % 2, "only 5 samples"),
    (np.zeros((30, 2)), np.zeros(30, int), "every label is 0"),
    (np.where(np.arange(60).reshape(30, 2) == 33, np.nan, 0.0), np.arange(30) % 2, "NaN or Inf at row 16"),
    (np.zeros((30, 2)), np.arange(30) % 3 + 0.5, "not a class id"),
])
def test_bad_data_is_refused_naming_what_and_where(x, y, message):
    with pytest.raises(PipelineError, match=message):
        split_arrays(x, y, None, "bad")


def test_a_dataset_callable_is_streamed_and_split_with_its_labels():
    data = load_data("realshaped:keywords")
    assert isinstance(data.test, StreamSplit) and data.classes == ["kw3", "kw7", "kw12", "kw20"]
    assert data.input_shape == (1, 400) and len(data.train) + len(data.val) + len(data.test) == 240
    batches = list(data.val.batches(16))
    assert sum(len(b[0][0]) for b in batches) == len(data.val) and batches[0][1] is not None


def test_metrics_default_to_cosine_without_labels_and_take_a_user_callable(tmp_path, monkeypatch):
    assert resolve_metric("auto", ["a"], has_labels=False).name == "cosine"
    with pytest.raises(PipelineError, match="needs labels"):
        resolve_metric("top1", ["a"], has_labels=False)
    with pytest.raises(PipelineError, match="'nope' is not an output"):
        resolve_metric("top1", ["a"], has_labels=True, metric_output="nope")
    (tmp_path / "mymetric.py").write_text("def neg_mse(outputs, labels):\n"
                                          "    return -float(((outputs['boxes'] - 1) ** 2).mean())\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    data = load_data("realshaped:face_crops")
    model = rs.three_heads()
    ev = evaluator_for(model, data, metric="mymetric:neg_mse")
    outputs = predict(model, data.test)
    assert ev.score_outputs(outputs, "test") == pytest.approx(-float(((outputs[0] - 1) ** 2).mean()))
    cos = evaluator_for(model, data)
    assert cos.metric.name == "cosine" and cos.score_outputs(outputs, "test") == pytest.approx(1.0)


def test_pruning_protects_every_output_layer_of_a_multi_output_model():
    data = load_data("realshaped:face_crops")
    model = rs.three_heads()
    example = tuple(torch.from_numpy(a[:1]) for a in data.example)
    assert set(output_layers(model, example)) == {model.boxes, model.landmarks, model.prob}
    res = prune(model, data, PruneConfig(ratio=0.5, iterative_steps=1, finetune_epochs=1), evaluator_for(
        rs.three_heads(), data))
    assert (res.model.boxes.out_features, res.model.landmarks.out_features, res.model.prob.out_features) == (4, 10, 2)
    assert res.params[1] < res.params[0]


def test_conv1d_and_attention_models_prune_and_still_run():
    kws = load_data("realshaped:keywords")
    net = rs.keyword_net()
    res = prune(net, kws, PruneConfig(ratio=0.5, iterative_steps=1, finetune_epochs=0), evaluator_for(
        rs.keyword_net(), kws))
    assert res.model.features[0].out_channels < 32 and res.model.classifier.out_features == 4
    tok = load_data("realshaped:token_splits")
    enc = rs.tiny_encoder()
    res = prune(enc, tok, PruneConfig(ratio=0.5, iterative_steps=1, finetune_epochs=0), evaluator_for(
        rs.tiny_encoder(), tok))
    # torch-pruning 1.6.1 prunes the feed-forward width; the residual stream (embedding, attention) stays whole
    # on this encoder, and attention's bookkeeping stays consistent with its projections.
    attn = res.model.attn
    assert res.model.ff[0].out_features < 64 and res.params[1] < res.params[0]
    assert attn.head_dim * attn.num_heads == attn.embed_dim == attn.out_proj.in_features
    out = predict(res.model, tok.test)
    assert out[0].shape == (len(tok.test), 2) and np.isfinite(out[0]).all()


def test_a_streamed_dataset_with_nan_is_refused_naming_the_row():
    from edge_pipeline.sources.data import split_dataset

    class WithNaN:
        def __len__(self):
            return 30

        def __getitem__(self, i):
            x = np.full(4, np.nan if i == 23 else 1.0, np.float32)
            return x, i % 2

    data = split_dataset(WithNaN(), "nan-stream")
    with pytest.raises(PipelineError, match="NaN or Inf at dataset row 23"):
        for split in (data.train, data.val, data.test):
            list(split.batches(8))
