"""Data and model sources: zoo, .npz, image folders, package.module:callable."""

import numpy as np
import pytest
import torch

from edge_pipeline.errors import PipelineError
from edge_pipeline.sources import build_model, load_data


def test_digits_split_is_fixed_disjoint_and_stratified(digits):
    again = load_data("zoo:digits")
    assert np.array_equal(digits.test.x, again.test.x) and digits.fingerprint() == again.fingerprint()
    assert len(digits.train) + len(digits.val) + len(digits.test) == 1797
    rows = lambda s: {r.tobytes() + bytes([int(y)]) for r, y in zip(s.x, s.y, strict=True)}  # noqa: E731
    assert not rows(digits.test) & rows(digits.train) and not rows(digits.val) & rows(digits.train)
    assert np.bincount(digits.test.y).min() >= 30
    assert digits.train.x.strides[1] == 8 * 8 * 4, "standard C strides, also on the size-1 channel axis"


def test_npz_source(tmp_path):
    x = np.random.default_rng(0).random((100, 1, 4, 4), dtype=np.float32)
    y = np.arange(100) % 5
    np.savez(tmp_path / "d.npz", x=x, y=y)
    s = load_data(str(tmp_path / "d.npz"))
    assert s.input_shape == (1, 4, 4) and s.num_classes == 5 and len(s.test) == 20
    np.savez(tmp_path / "bad.npz", inputs=x)
    with pytest.raises(PipelineError, match="has no array 'x'"):
        load_data(str(tmp_path / "bad.npz"))


def test_image_folder_source(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(10):
            Image.fromarray(rng.integers(0, 255, (6, 6), dtype=np.uint8)).save(tmp_path / "imgs" / cls / f"{i}.png")
    s = load_data(str(tmp_path / "imgs"))
    assert s.classes == ["cat", "dog"] and s.input_shape == (1, 6, 6)
    x = s.train.rows(np.arange(len(s.train)))[0]
    assert 0 <= x.min() and x.max() <= 1, "grayscale files stay 1-channel, scaled to [0, 1]"


def test_callable_sources(tmp_path, monkeypatch):
    (tmp_path / "userpkg.py").write_text(
        "import numpy as np, torch\n"
        "def model():\n    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))\n"
        "def data():\n    return np.zeros((30, 1, 4, 4), np.float32), np.arange(30) % 3\n"
        "def not_a_model():\n    return 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    m = build_model("userpkg:model", 3, 1)
    assert m(torch.zeros(2, 1, 4, 4)).shape == (2, 3)
    assert load_data("userpkg:data").num_classes == 3
    with pytest.raises(PipelineError, match="returned int, not a torch.nn.Module"):
        build_model("userpkg:not_a_model", 3, 1)
    with pytest.raises(PipelineError, match="has no attribute 'nope'"):
        build_model("userpkg:nope", 3, 1)
