"""`plausible train CONFIG` and `plausible sample RUN`: config validation naming the field,
training with checkpoints, resume, and sampling from the run."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import energy_distance
from plausible.cli import main
from plausible.config import ConfigError, parse_config

CONFIG = """
[model]
backbone = "ResMLP"
backbone_args = {{ features = 2, hidden = 64, blocks = 2 }}

[data]
path = "{data}"
validation = 0.1

[training]
out = "{out}"
steps = {steps}
batch_size = 256
lr = 2e-3
checkpoint_every = 200
"""


@pytest.fixture
def setup(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 2, generator=g) * torch.tensor([0.5, 2.0]) + torch.tensor([1.0, -1.0])
    save_file({"x": x}, str(tmp_path / "data.safetensors"))

    def config(steps: int) -> str:
        path = tmp_path / "config.toml"
        path.write_text(CONFIG.format(data=tmp_path / "data.safetensors", out=tmp_path / "run",
                                      steps=steps))
        return str(path)

    return tmp_path, config, x


def test_train_then_sample_reproduces_the_data(setup, capsys):
    tmp_path, config, x = setup
    assert main(["train", config(400), "--quiet"]) == 0
    assert main(["train", config(400), "--quiet"]) == 1  # refuses to overwrite the run
    with pytest.warns(UserWarning, match="changed training options"):  # 400 -> 600 steps
        assert main(["train", config(600), "--resume", "--quiet"]) == 0
    out = tmp_path / "samples.safetensors"
    assert main(["sample", str(tmp_path / "run"), "-n", "1000", "--out", str(out),
                 "--quiet"]) == 0
    samples = load_file(str(out))["x"]
    assert samples.shape == (1000, 2)
    assert (tmp_path / "samples.png").stat().st_size > 0
    torch.testing.assert_close(samples.mean(0), torch.tensor([1.0, -1.0]), atol=0.25, rtol=0)
    torch.testing.assert_close(samples.std(0), torch.tensor([0.5, 2.0]), atol=0.25, rtol=0.15)
    # two-sample check against held-out data, with the data-vs-data floor
    ref, ref2 = x[:1000], x[1000:2000]
    assert energy_distance(samples, ref) < 5 * energy_distance(ref2, ref) + 0.01


@pytest.mark.parametrize(
    "change,field",
    [
        ({"training": {"out": "r", "lrr": 1}}, "training.lrr"),
        ({"training": {"out": "r", "steps": "ten"}}, "training.steps"),
        ({"training": {"out": "r", "ema": True}}, "training.ema"),
        ({"training": {"out": "r", "precision": "fp8"}}, "training.precision"),
        ({"model": {"backbone": "Transformer"}}, "model.backbone"),
        ({"model": {"backbone": "ResMLP", "backbone_args": {"features": 2, "width": 3}}},
         "model.backbone_args"),
        ({"model": {"backbone": "ResMLP", "backbone_args": {"features": 2},
                    "schedule": {"kind": "nope"}}}, "model.schedule"),
        ({"data": {"key": "x"}}, "data.path"),
        ({"extra": {}}, "extra"),
        ({"training": {"out": "r", "patience": 3}}, "training.patience"),  # no validation
        ({"training": {"out": "r", "patience": 0}}, "training.patience"),
        ({"training": {"out": "r", "decay": "plateau"}}, "training.decay"),  # no validation
        ({"training": {"out": "r", "decay": "step"}}, "training.decay"),
    ],
)
def test_config_errors_name_the_field(change, field):
    raw = {"model": {"backbone": "ResMLP", "backbone_args": {"features": 2}},
           "data": {"path": "d.safetensors"}, "training": {"out": "r"}}
    raw.update(change)
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        parse_config(raw)


def test_cli_reports_config_errors(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("model: {backbone: ResMLP, backbone_args: {features: 2}}\n"
                    "data: {path: d.npy}\ntraining: {out: r, batch_size: 0}\n")
    assert main(["train", str(path), "--check"]) == 2
    assert "training.batch_size" in capsys.readouterr().err


def test_sample_reports_a_missing_checkpoint(tmp_path, capsys):
    assert main(["sample", str(tmp_path / "nothing")]) == 1
    assert "no checkpoint" in capsys.readouterr().err
