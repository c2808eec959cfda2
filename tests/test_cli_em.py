"""`plausible em CONFIG`: configuration validation naming the field, a tiny run with per-lap
checkpoints, refusal to overwrite a run, resume, and sampling the learned prior."""

from __future__ import annotations

import json

import pytest
import torch

import plausible
from plausible.cli import main
from plausible.config import ConfigError
from plausible.em import parse_em_config
from plausible.tasks import manifold_problem

CONFIG = """
[model]
backbone = "ResMLP"
backbone_args = {{ features = 5, hidden = 32, blocks = 1 }}

[observations]
path = "{obs}"

[em]
out = "{out}"
laps = {laps}
gaussian_iterations = 8

[sampling]
steps = 8
maxiter = 2
batch_size = 128

[training]
steps = 20
batch_size = 64
checkpoint_every = 10
"""


@pytest.fixture
def setup(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    problem = manifold_problem(256, seed=0)
    problem.observations.save(tmp_path / "obs.safetensors")

    def config(laps: int, suffix: str = ".toml") -> str:
        path = tmp_path / f"config{suffix}"
        text = CONFIG.format(obs=tmp_path / "obs.safetensors", out=tmp_path / "run", laps=laps)
        if suffix == ".yaml":
            import tomllib

            import yaml

            text = yaml.safe_dump(tomllib.loads(text))
        path.write_text(text)
        return str(path)

    yield tmp_path, config
    torch.set_num_threads(threads)


def test_em_command_runs_resumes_and_samples(setup, capsys):
    tmp_path, config = setup
    assert main(["em", config(1), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "lap 0: Gaussian prior, log-likelihood" in out and "lap 1: training loss" in out
    run = tmp_path / "run"
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line["lap"] for line in lines] == [0, 1]
    assert len(lines[0]["log_likelihood"]) == 9
    ll = lines[0]["log_likelihood"]
    assert all(b >= a - 1e-9 * abs(a) for a, b in zip(ll, ll[1:]))  # exact EM is monotone
    assert json.loads((run / "latest.json").read_text()) == {"lap": 1}
    # a second run into the same folder is refused, --resume continues with more laps
    assert main(["em", config(2), "--quiet"]) == 1
    assert "resume" in capsys.readouterr().err
    assert main(["em", config(2, ".yaml"), "--quiet", "--resume"]) == 0
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line["lap"] for line in lines] == [0, 1, 2]
    prior = plausible.load(run / "lap-0002" / "model")
    assert prior.shape == (5,)
    # the learned prior is a checkpoint that `plausible sample` reads
    samples = tmp_path / "x.safetensors"
    assert main(["sample", str(run / "lap-0002" / "model"), "-n", "16", "--steps", "4",
                 "--out", str(samples), "--quiet"]) == 0
    assert samples.is_file() and samples.with_suffix(".png").is_file()


def test_em_config_errors_name_the_field(setup, capsys):
    tmp_path, config = setup
    path = config(1)
    assert main(["em", path, "--check"]) == 0
    text = open(path).read()
    bad = tmp_path / "bad.toml"
    for old, new, field in [("laps = 1", "laps = \"x\"", "em.laps"),
                            ("maxiter = 2", "maxiter = 2\nsolvr = 1", "sampling.solvr"),
                            ("steps = 20", "steps = 0", "training.steps"),
                            ("[em]", "[em]\ngaussian_rank = -3", "em.gaussian_rank"),
                            ("steps = 8", "steps = 8\nsampler = \"euler\"", "sampling.sampler")]:
        bad.write_text(text.replace(old, new, 1))
        assert main(["em", str(bad)]) == 2
        assert field in capsys.readouterr().err
    with pytest.raises(ConfigError, match="missing section \\[observations\\]"):
        parse_em_config({"model": {"backbone": "ResMLP"}, "em": {"out": "x"}})
    with pytest.raises(ConfigError, match="model.backbone"):
        parse_em_config({"model": {"backbone": "Nope"}, "observations": {"path": "x"},
                         "em": {"out": "x"}})
    bad.write_text(text.replace(str(tmp_path / "obs.safetensors"), str(tmp_path / "no.zarr")))
    assert main(["em", str(bad), "--quiet"]) == 1
    assert "observations.path" in capsys.readouterr().err
