"""Weight clustering (k-means into 2^b centres, fine-tuned) and what it ships: at most 2^b distinct weights per
clustered layer, read back from each runtime's file, a smaller compressed download, and a fine-tune that resumes
after SIGKILL. Pruning importance from second derivatives (Optimal Brain Damage) and channel entropy."""

import json

import numpy as np
import pytest
import torch
import torch_pruning as tp
from edge_support import killed_then_resumed
from torch import nn
from torch.nn.utils import parametrize

from edge_pipeline import clustering, importance
from edge_pipeline.errors import PipelineError
from edge_pipeline.pipeline import run

INT8 = ["tflite-int8", "ort-mobile-int8", "executorch-xnnpack-int8"]


def test_kmeans_finds_the_centres_and_a_centre_learns_from_every_weight_that_shares_it():
    rng = np.random.default_rng(0)
    true = np.array([-1.0, 0.2, 3.0])
    values = torch.from_numpy(np.concatenate([c + 0.01 * rng.standard_normal(300) for c in true]))
    for init in clustering.INITS:
        centres, idx = clustering.kmeans_1d(values, 4, init)
        assert torch.unique(centres[idx]).numel() <= 4
        if init != "random":  # random starts can settle in a local minimum (here three centres near 3.0)
            assert all(float((centres - c).abs().min()) < 0.05 for c in true), (init, centres)

    layer, dense = nn.Linear(8, 4), nn.Linear(8, 4)
    centres, idx = clustering.kmeans_1d(layer.weight, 4)
    parametrize.register_parametrization(layer, "weight", clustering.Codebook(centres, idx), unsafe=True)
    with torch.no_grad():
        dense.weight.copy_(centres[idx])
        dense.bias.copy_(layer.bias)
    x = torch.randn(5, 8)
    layer(x).pow(2).sum().backward()
    dense(x).pow(2).sum().backward()
    expected = torch.zeros(4).index_add_(0, idx.flatten(), dense.weight.grad.flatten())
    assert torch.allclose(layer.parametrizations.weight[0].centres.grad, expected, atol=1e-5)
    clustering.bake(layer)
    assert not parametrize.is_parametrized(layer) and torch.unique(layer.weight).numel() <= 4


def test_batchnorm_folded_into_its_conv_leaves_the_outputs_and_an_identity_batchnorm():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1),
                          nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    x = torch.randn(4, 3, 8, 8)
    model(x)
    for bn in (model[1], model[4]):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 3)
        bn.weight.data.uniform_(0.5, 2)
        bn.bias.data.uniform_(-1, 1)
    model.eval()
    ref = model(x)
    pairs, heads = clustering.graph_facts(model, (x[:1],))
    assert pairs == [("0", "1"), ("3", "4")] and heads == ["6"]
    assert clustering.fold_batch_norms(model, pairs) == ["0", "3"]
    assert torch.allclose(model(x), ref, atol=1e-5)
    # One codebook per layer survives the runtimes' own BatchNorm folding: every channel is scaled alike.
    scale = model[4].weight / torch.sqrt(model[4].running_var + model[4].eps)
    assert torch.unique(scale).numel() == 1


@pytest.fixture
def cluster_recipe(write_recipe):
    def make(targets, **cluster):
        return write_recipe(train={"epochs": 3}, calibrate={"samples": 64, "sensitivity": False},
                            cluster={"enabled": True, "bits": 4, "epochs": 1, **cluster}, targets=targets,
                            device_test={"enabled": False}, package={"enabled": False})
    return make


@pytest.mark.slow
def test_a_clustered_model_ships_at_most_2b_weights_per_layer_in_each_runtimes_file(cluster_recipe):
    path = cluster_recipe([*INT8, "tflite-fp32"])
    clustered = json.loads((run(path).run_dir / "run.json").read_text())
    cl = clustered["stages"]["cluster"]["metrics"]
    assert cl["layers"] == 3 and cl["bits"] == [4] and cl["max_distinct_weights"] <= 16  # the head kept whole
    assert cl["batchnorms_folded"] == 3  # each conv's BatchNorm, first: one codebook per layer in the files
    assert cl["test_metric"] >= clustered["stages"]["teacher"]["metrics"]["test_metric"] - 0.03

    doc = yaml_without_cluster(path)
    plain = json.loads((run(doc, run_id="unclustered").run_dir / "run.json").read_text())
    for name, t in clustered["stages"]["lower"]["metrics"]["targets"].items():
        assert not t["failures"], (name, t["failures"])
        download = t["download"]
        described = json.loads((path.parent / "runs" / "tiny" / "default" / "06-lower" / name /
                                "describe.json").read_text())
        assert described["download"] == download and "k-means clustered to 4 bits" in download["clustering"]
        weights = download["weights"]
        if name.startswith("executorch"):
            assert not weights["read_back"] and "XNNPACK delegate" in weights["why"]
        else:
            # Read back from the file: the three clustered layers hold 16 values at most (one int8 scale per
            # clustered layer), the unclustered head more.
            counts = sorted(w["distinct"] for w in weights["tensors"].values())
            assert len(counts) == 4 and counts[2] <= 16 < counts[3], (name, counts)
        if name in INT8:
            before = plain["stages"]["lower"]["metrics"]["targets"][name]["download"]["gzip_bytes"]
            assert download["gzip_bytes"] < 0.7 * before, (name, download["gzip_bytes"], before)


def yaml_without_cluster(path):
    import yaml

    doc = yaml.safe_load(path.read_text())
    doc["cluster"]["enabled"] = False
    out = path.with_name("unclustered.yaml")
    out.write_text(yaml.safe_dump(doc))
    return out


@pytest.mark.slow
def test_the_cluster_fine_tune_resumes_after_sigkill_to_the_same_model(cluster_recipe, tmp_path):
    path = cluster_recipe(["tflite-fp32"], epochs=5)
    run_dir = tmp_path / "runs" / "tiny" / "default"
    killed_then_resumed(["run", str(path)], path, run_dir, "cluster", "03-cluster", "cluster fine-tune", 5)
    straight = run(path, run_id="straight", until="cluster")
    a, b = (torch.load(d / "03-cluster" / "model.pt", weights_only=True) for d in (run_dir, straight.run_dir))
    # The resumed run ends where an unbroken one does, to float rounding (the killed run was another process,
    # whose thread count orders sums differently: they differ from epoch 1 on, by 1e-7).
    assert a.keys() == b.keys() and all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in a)


def test_cluster_settings_are_checked_before_any_work(cluster_recipe, tmp_path):
    path = cluster_recipe(["tflite-int8"])
    path.write_text(path.read_text().replace("targets:", "qat:\n  mode: 'on'\ntargets:"))
    with pytest.raises(PipelineError, match="cluster and qat cannot both run"):
        run(path)
    assert not (tmp_path / "runs" / "tiny" / "default" / "00-teacher").exists(), "refused before training"
    path = cluster_recipe(["tflite-int8"], skip=["features.9"])
    with pytest.raises(PipelineError, match=r"no layer 'features.9'") as e:
        run(path)
    assert "cluster.skip[0]" in e.value.where


class ZeroedBranch(nn.Module):
    """A conv whose last 8 channels are multiplied by zero before the head: their weights do not matter, though
    they are the largest."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.head = nn.Linear(16, 3)
        self.register_buffer("mask", torch.tensor([1.0] * 8 + [0.0] * 8))
        with torch.no_grad():
            self.conv.weight[8:] *= 10

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).mean((2, 3)) * self.mask)


def _channel_importance(model, imp):
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(1, 3, 8, 8))
    group = dg.get_pruning_group(model.conv, tp.prune_conv_out_channels, idxs=list(range(16)))
    return imp(group)


def test_obd_ranks_the_channels_whose_weights_do_not_matter_last_where_magnitude_ranks_them_first():
    from types import SimpleNamespace

    from edge_pipeline.sources.data import ArraySplit

    model = ZeroedBranch()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((128, 3, 8, 8)).astype(np.float32)
    y = rng.integers(0, 3, 128)
    data = SimpleNamespace(train=ArraySplit((x,), y))

    def loss(s, t, labels):
        return nn.functional.cross_entropy(s[0], labels)

    obd = importance.criterion("obd")
    importance.prepare("obd", obd, model, model, data, loss, batches=2)
    scores = _channel_importance(model, obd)
    assert float(scores[8:].max()) == 0.0 < float(scores[:8].min()), scores
    l2 = _channel_importance(model, importance.criterion("l2"))
    assert float(l2[8:].min()) > float(l2[:8].max())


def test_entropy_is_zero_for_a_channel_that_answers_every_input_alike():
    rows = torch.stack([torch.full((256,), 3.0), torch.rand(256, generator=torch.Generator().manual_seed(0)),
                        torch.cat([torch.zeros(128), torch.ones(128)])], 1)
    h = importance.channel_entropy(rows)
    assert float(h[0]) == 0.0
    assert abs(float(h[2]) - np.log(2)) < 1e-6
    assert float(h[1]) > np.log(8)  # spread over 16 bins
