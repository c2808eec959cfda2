"""Training throughput: ``plausible.fit`` against a minimal hand-written PyTorch loop.

Same model, same data, same batch size, in the same run; samples per second (median of
repeats, after a warm-up). Configurations: the plain loop; ``fit`` bare (no EMA); ``fit`` with
EMA; with EMA + validation + checkpoints; and 1 vs 2 DDP processes (gloo on CPU, via
torchrun). ``--device cuda`` runs on a GPU, adding bf16 autocast and torch.compile rows.

    python benchmarks/training.py [--quick] [--device cpu|cuda] [--out results/training.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import plausible


def build(kind: str, device: str) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    if kind == "mlp":
        net = plausible.nets.ResMLP(features=64, hidden=256, blocks=3)
        data = torch.randn(8192, 64)
        model = plausible.Denoiser(net)
    else:
        net = plausible.nets.UNet(2, hidden_channels=(32, 64, 128), hidden_blocks=1,
                                  attention=(2,))
        data = torch.randn(1024, 2, 32, 32)
        model = plausible.Denoiser(net, shape=(2, 32, 32))
    return model.to(device), data.to(device)


def plain_loop(model, data, steps, batch_size, precision="fp32", compile=False) -> float:
    """The minimal hand-written loop: AdamW, random batches, the same loss."""
    device = data.device
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator(device=device).manual_seed(0)
    loss_fn = torch.compile(model.loss) if compile else model.loss
    ctx = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16"
           else torch.autocast(device.type, enabled=False))
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        x = data[torch.randint(0, data.shape[0], (batch_size,), device=device, generator=gen)]
        with ctx:
            loss = loss_fn(x, generator=gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    _sync(device)
    return steps * batch_size / (time.perf_counter() - start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def fit_rate(model, data, steps, batch_size, **options) -> float:
    _sync(data.device)
    start = time.perf_counter()
    plausible.fit(model, data, steps=steps, batch_size=batch_size, progress=False,
                  lr=1e-3, **options)
    _sync(data.device)
    return steps * batch_size / (time.perf_counter() - start)


DDP_SCRIPT = """
import sys, time, torch, plausible, json
torch.manual_seed(0)
net = plausible.nets.ResMLP(features=64, hidden=256, blocks=3)
model = plausible.Denoiser(net)
data = torch.randn(8192, 64)
steps, batch = int(sys.argv[1]), int(sys.argv[2])
plausible.fit(model, data, steps=5, batch_size=batch, progress=False, ema=0.0)
start = time.perf_counter()
plausible.fit(model, data, steps=steps, batch_size=batch, progress=False, ema=0.0)
rate = steps * batch / (time.perf_counter() - start)
if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
    print(json.dumps({"rate": rate}))
"""


def ddp_rate(nproc: int, steps: int, batch_size: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "ddp_bench.py"
        script.write_text(DDP_SCRIPT)
        cmd = [sys.executable, str(script), str(steps), str(batch_size)]
        if nproc > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={nproc}", *cmd[1:]]
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // nproc))}
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
        return json.loads(lines[-1])["rate"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="results/training.json")
    args = parser.parse_args()
    torch.set_flush_denormal(True)
    device = torch.device(args.device)
    results = []
    kinds = ["mlp"] if args.quick else ["mlp", "unet"]
    for kind in kinds:
        steps = 60 if kind == "mlp" else 20
        if args.quick:
            steps //= 2
        batch = 256 if kind == "mlp" else 32
        configs = {
            "plain loop": lambda m, d: plain_loop(m, d, steps, batch),
            "fit (no EMA)": lambda m, d: fit_rate(m, d, steps, batch, ema=0.0),
            "fit (EMA)": lambda m, d: fit_rate(m, d, steps, batch),
            "fit (EMA + validation + checkpoints)": lambda m, d: fit_rate(
                m, d, steps, batch, validation=d[:512], validate_every=steps // 2,
                checkpoint=tempfile.mkdtemp(), checkpoint_every=steps // 2),
        }
        if device.type == "cuda":
            configs["plain loop bf16+compile"] = lambda m, d: plain_loop(
                m, d, steps, batch, precision="bf16", compile=True)
            configs["fit bf16+compile (EMA)"] = lambda m, d: fit_rate(
                m, d, steps, batch, precision="bf16", compile=True)
        rates: dict[str, list[float]] = {name: [] for name in configs}
        for _ in range(args.repeats):  # interleaved repeats: drifts of the machine hit all rows
            for name, run in configs.items():
                model, data = build(kind, args.device)
                run(model, data) if not rates[name] else None  # warm-up on first repeat
                rates[name].append(run(model, data))
        base = statistics.median(rates["plain loop"])
        for name, values in rates.items():
            rate = statistics.median(values)
            results.append({"model": kind, "config": name, "samples_per_s": rate,
                            "ratio_to_plain": rate / base, "batch": batch, "steps": steps})
    if device.type == "cpu":
        steps = 20 if args.quick else 40
        one = ddp_rate(1, steps, 256)
        two = ddp_rate(2, steps, 256)
        results.append({"model": "mlp", "config": "DDP 1 process (gloo)", "samples_per_s": one,
                        "ratio_to_plain": float("nan"), "batch": 256, "steps": steps})
        results.append({"model": "mlp", "config": "DDP 2 processes (gloo)", "samples_per_s": two,
                        "ratio_to_plain": two / one, "batch": 256, "steps": steps})
    print(f"{'model':6} {'configuration':42} {'samples/s':>10} {'ratio':>7}")
    for r in results:
        print(f"{r['model']:6} {r['config']:42} {r['samples_per_s']:10.0f} "
              f"{r['ratio_to_plain']:7.3f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    meta = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads()}
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
