"""Structured pruning really shrinks residual, concat and depthwise models, and they still export."""

import pytest
import torch
from edge_support import evaluator_for

from edge_pipeline.errors import PipelineError
from edge_pipeline.modelio import load_model, save_model
from edge_pipeline.modelstats import model_stats
from edge_pipeline.recipe import PruneConfig
from edge_pipeline.sources import build_model
from edge_pipeline.stages.prune import prune


@pytest.mark.parametrize("zoo", ["mobilenetv2-tiny", "resnet-tiny", "digits-cnn"])
@pytest.mark.parametrize("importance", ["l2", "bn_scale", "taylor"])
def test_budget_is_met_and_model_still_runs_and_exports(digits, zoo, importance, tmp_path):
    model = build_model(f"zoo:{zoo}", 10, 1)
    base = model_stats(model, digits.example)
    cfg = PruneConfig(max_macs=0.5, iterative_steps=2, finetune_epochs=0, importance=importance)
    res = prune(model, digits, cfg, evaluator_for(model, digits))
    after = model_stats(res.model, digits.example)
    assert after["macs"] <= 0.5 * base["macs"] * 1.05
    assert after["macs"] >= 0.5 * base["macs"] * 0.80, "pruned far past the budget"
    assert after["params"] < base["params"]
    x = torch.from_numpy(digits.test.x[:4])
    assert res.model(x).shape == (4, 10)
    ep = torch.export.export(res.model, (x[:1],))
    assert ep.module()(x[:1]).shape == (1, 10)
    # Saved and loaded without pickled code, onto the source architecture.
    save_model(res.model, {"source": f"zoo:{zoo}", "num_classes": 10, "in_channels": 1}, tmp_path / "m.pt")
    loaded, _ = load_model(tmp_path / "m.pt")
    torch.testing.assert_close(loaded(x), res.model(x))


def test_ratio_target_and_head_kept(digits):
    model = build_model("zoo:digits-cnn", 10, 1)
    res = prune(model, digits, PruneConfig(ratio=0.5, iterative_steps=2, finetune_epochs=1),
                evaluator_for(model, digits))
    assert res.model.classifier.out_features == 10
    assert res.macs[1] < 0.5 * res.macs[0]
    assert set(res.val_metric) == {"before", "pruned", "finetuned"}


def test_sensitivity_scan_gives_per_layer_drops(digits):
    model = build_model("zoo:digits-cnn", 10, 1)
    res = prune(model, digits, PruneConfig(max_macs=0.6, sensitivity_scan=True, scan_ratios=[0.3, 0.6],
                                           finetune_epochs=0, iterative_steps=1), evaluator_for(model, digits))
    assert res.sensitivity and all(set(v) == {"0.3", "0.6"} for v in res.sensitivity.values())
    assert "classifier" not in res.sensitivity


@pytest.mark.parametrize("method", ["unstructured", "2:4"])
def test_sparsity_options_zero_weights_but_keep_shapes(digits, method):
    model = build_model("zoo:digits-cnn", 10, 1)
    res = prune(model, digits, PruneConfig(method=method, ratio=0.5, finetune_epochs=1), evaluator_for(model, digits))
    assert res.macs[0] == res.macs[1] and res.params[0] == res.params[1]
    assert 0.45 <= res.sparsity <= 0.55


def test_unknown_ignored_layer_is_a_clear_error(digits):
    model = build_model("zoo:digits-cnn", 10, 1)
    with pytest.raises(PipelineError, match="layer 'classifer' in prune.ignore does not exist") as e:
        prune(model, digits, PruneConfig(ratio=0.5, ignore=["classifer"]), evaluator_for(model, digits))
    assert "classifier" in e.value.hint and "prune.ignore[0]" in e.value.where


def test_budget_that_cannot_be_met_is_a_clear_error(digits):
    model = build_model("zoo:digits-cnn", 10, 1)
    with pytest.raises(PipelineError, match="budget cannot be met"):
        prune(model, digits, PruneConfig(max_macs=0.01, max_layer_ratio=0.5, finetune_epochs=0),
              evaluator_for(model, digits))


def test_loading_onto_another_architecture_is_refused(digits, tmp_path):
    model = build_model("zoo:digits-cnn", 10, 1)
    save_model(model, {"source": "zoo:resnet-tiny", "num_classes": 10, "in_channels": 1}, tmp_path / "m.pt")
    with pytest.raises(PipelineError, match="does not fit architecture zoo:resnet-tiny"):
        load_model(tmp_path / "m.pt")


def test_round_to_keeps_channel_counts_in_multiples(digits):
    model = build_model("zoo:digits-cnn", 10, 1)
    res = prune(model, digits, PruneConfig(max_macs=0.3, iterative_steps=1, finetune_epochs=0, round_to=8),
                evaluator_for(model, digits))
    convs = [m for m in res.model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(c.out_channels % 8 == 0 for c in convs), [c.out_channels for c in convs]
    assert res.macs[1] <= 0.3 * res.macs[0] and any(c.out_channels < 64 for c in convs)


def test_macs_count_subclassed_convs_like_their_base():
    """EfficientNet writes its convs as a Conv2d subclass (same padding); torch-pruning's counter skipped them
    (21.0M MACs for EfficientNet-Lite0 instead of ~405M), and MAC budgets and bench sizing read that figure."""
    import numpy as np
    from torch import nn

    from edge_pipeline.modelstats import model_stats

    class SamePadConv(nn.Conv2d):
        def forward(self, x):
            return super().forward(nn.functional.pad(x, (1, 1, 1, 1)))

    plain = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16 * 16, 4))
    custom = nn.Sequential(SamePadConv(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16 * 16, 4))
    x = (np.zeros((1, 3, 16, 16), np.float32),)
    assert model_stats(custom, x)["macs"] == model_stats(plain, x)["macs"] > 8 * 27 * 16 * 16
