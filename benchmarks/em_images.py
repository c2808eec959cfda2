"""Empirical Bayes by EM on images: corrupted MNIST and accelerated MRI (issue 6, item 2).

Two experiments, each a function that returns its JSON payload and writes its figures:

- ``mnist_experiment``: MNIST digits with 75 % (and 50 %) of the pixels deleted at random per
  image plus noise. A prior is learned by EM from the corrupted images only
  (:func:`plausible.em.fit`, lap 0 a Gaussian); its samples are compared with those of the same
  network trained on the clean images with the same budget, by the Fréchet distance in the
  feature space of a small CNN classifier trained on clean MNIST (the FID recipe).
  Target: at 75 %, the EM prior's Fréchet distance within 2x of the clean prior's.
- ``mri_experiment``: axial slices of the MNI152 T1 brain template, observed only through
  k-space sub-sampled 4-6x (random Cartesian lines, fully sampled centre). A prior is learned by
  EM from those observations (lap 0: the exact EM Gaussian of
  :func:`plausible.tasks.mri.fourier_gaussian_em`); held-out slices are reconstructed with MMPS
  (posterior mean of a few samples) and compared with the truth (PSNR, SSIM) against the
  zero-filled and Gaussian-prior (lap 0) reconstructions. Target: the posterior mean beats
  zero filling by at least 5 dB PSNR.

Usage::

    nice python benchmarks/em_images.py --experiment mnist [--quick] [--seed 0] [--threads 1]
    nice python benchmarks/em_images.py --experiment mri [--quick]

(or ``python benchmarks/em.py --experiment mnist|mri ...``, which runs this script).
Outputs ``results/em_<experiment>[_quick][_<pct>].json``, PNG figures next to it and the trained
priors under ``results/em_<experiment>..._models/`` (``plausible.load`` reads them).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import plausible  # noqa: E402
from _common import RESULTS, setup, write_json  # noqa: E402
from plausible import em  # noqa: E402
from plausible.checkpoints import save_model  # noqa: E402
from plausible.nets import UNet  # noqa: E402
from plausible.plots import image_grid  # noqa: E402
from plausible.tasks import mnist as mnist_task  # noqa: E402
from plausible.tasks import mri as mri_task  # noqa: E402

__all__ = ["MNIST_CONFIG", "MRI_CONFIG", "mnist_experiment", "mri_experiment", "main"]

MNIST_CONFIG: dict[str, Any] = {
    "n_obs": 768,  # corrupted training images (EM) = clean training images (reference prior)
    "deleted": [0.75, 0.5],
    "noise": 0.05,  # std of the noise on kept pixels (images in [-1, 1])
    "laps": 4,
    "unet": {"hidden_channels": [16, 32, 64], "hidden_blocks": 1, "padding": "zeros"},
    "sigma_data": 0.5,
    "training": {"steps": 150, "batch_size": 64, "lr": 2e-3, "ema": 0.99},
    "sampling": {"steps": 10, "sampler": "ddim", "maxiter": 1, "batch_size": 256},
    "gaussian_rank": 16,
    "gaussian_iterations": 16,
    "classifier": {"n": 10000, "epochs": 2, "features": 128},
    "fd": {"n": 500, "steps": 16, "sampler": "ddim"},
}
MNIST_QUICK: dict[str, Any] = {
    **MNIST_CONFIG, "n_obs": 128, "deleted": [0.75], "laps": 1,
    "training": {"steps": 20, "batch_size": 32, "lr": 2e-3, "ema": 0.9},
    "sampling": {"steps": 4, "sampler": "ddim", "maxiter": 1, "batch_size": 128},
    "gaussian_iterations": 4,
    "classifier": {"n": 1000, "epochs": 1, "features": 128},
    "fd": {"n": 100, "steps": 4, "sampler": "ddim"},
}

MRI_CONFIG: dict[str, Any] = {
    "size": 64,
    "axis": 2,
    "repeats": 2,  # k-space acquisitions (independent masks) per training slice
    "acceleration": [4.0, 6.0],
    "center_fraction": 0.08,
    "kind": "lines",
    "noise": 0.01,  # std per real component of k-space (orthonormal FFT, images in [-1, 1])
    "laps": 4,
    "gaussian_iterations": 64,
    "unet": {"hidden_channels": [8, 16, 32, 64], "hidden_blocks": 1, "padding": "zeros"},
    "sigma_data": 0.5,
    "training": {"steps": 250, "batch_size": 32, "lr": 2e-3, "ema": 0.99},
    "sampling": {"steps": 12, "sampler": "ddim", "maxiter": 3, "batch_size": 64},
    "eval": {"samples": 4, "steps": 24, "sampler": "ddim", "maxiter": 3},
}
MRI_QUICK: dict[str, Any] = {
    **MRI_CONFIG, "size": 32, "repeats": 1, "laps": 1, "gaussian_iterations": 8,
    "unet": {"hidden_channels": [8, 16], "hidden_blocks": 1, "padding": "zeros"},
    "training": {"steps": 10, "batch_size": 16, "lr": 2e-3, "ema": 0.9},
    "sampling": {"steps": 4, "sampler": "ddim", "maxiter": 1, "batch_size": 64},
    "eval": {"samples": 1, "steps": 4, "sampler": "ddim", "maxiter": 1},
}


def _prior(config: dict[str, Any], shape: tuple[int, ...], seed: int) -> plausible.Denoiser:
    torch.manual_seed(seed)
    net = UNet(shape[0], **config["unet"])
    return plausible.Denoiser(net, plausible.VPSchedule(), sigma_data=config["sigma_data"],
                              shape=shape)


def _rows(rows: list[tuple[str, torch.Tensor]], n: int) -> tuple[torch.Tensor, list[str]]:
    """Stacks ``n`` images per row, with the row's label on its first image."""
    images, titles = [], []
    for label, x in rows:
        images.append(x[:n].detach().float().cpu())
        titles += [label] + [""] * (min(n, len(x)) - 1)
    return torch.cat(images), titles


# ---------------------------------------------------------------------------------------------
# corrupted MNIST


def mnist_experiment(config: dict[str, Any], seed: int = 0, tag: str = "em_mnist",
                     progress: bool = False) -> dict[str, Any]:
    """Runs the corrupted-MNIST experiment; returns the JSON payload and writes the figures
    ``results/<tag>_<pct>.png``."""
    out: dict[str, Any] = {"config": config, "seed": seed}
    tick = time.perf_counter()
    train_x, train_y = mnist_task.load_mnist("train")
    test_x, test_y = mnist_task.load_mnist("test")
    g = torch.Generator().manual_seed(seed)

    # the feature extractor: a small CNN trained on clean images
    cfg = config["classifier"]
    order = torch.randperm(len(train_x), generator=g)
    cls_idx = order[:cfg["n"]]
    t0 = time.perf_counter()
    classifier = mnist_task.train_classifier(train_x[cls_idx], train_y[cls_idx],
                                             epochs=cfg["epochs"], seed=seed,
                                             features=cfg["features"])
    with torch.no_grad():
        logits = torch.cat([classifier(test_x[i:i + 1000]) for i in range(0, len(test_x), 1000)])
    accuracy = float((logits.argmax(1) == test_y).float().mean())
    out["classifier"] = {"test_accuracy": accuracy, "seconds": time.perf_counter() - t0}
    print(f"classifier: test accuracy {accuracy:.4f}", flush=True)

    n_fd = config["fd"]["n"]
    perm = torch.randperm(len(test_x), generator=g)
    reference = mnist_task.features(classifier, test_x[perm[:n_fd]])
    floor = mnist_task.frechet_distance(mnist_task.features(classifier,
                                                            test_x[perm[n_fd:2 * n_fd]]),
                                        reference)
    out["fd_floor"] = floor  # two disjoint real sets of n_fd test images
    print(f"Fréchet distance floor (real vs real, n = {n_fd}): {floor:.3f}", flush=True)

    def fd(x: torch.Tensor) -> float:
        return mnist_task.frechet_distance(mnist_task.features(classifier,
                                                               x.clamp(-1, 1).float()),
                                           reference)

    def prior_samples(prior: plausible.Denoiser, lap_seed: int) -> torch.Tensor:
        if isinstance(prior, plausible.GaussianDenoiser):
            return prior.sample(n_fd, generator=torch.Generator().manual_seed(lap_seed)).float()
        was = prior.training
        prior.eval()
        x = plausible.sample(prior, n_fd, steps=config["fd"]["steps"],
                             sampler=config["fd"]["sampler"], seed=lap_seed, progress=False)
        prior.train(was)
        return x

    x_obs = train_x[order[cfg["n"]:cfg["n"] + config["n_obs"]]]  # disjoint from the classifier's
    shape = (1, 28, 28)
    training = config["training"]
    total_steps = config["laps"] * training["steps"]

    # the reference: the same network trained on the clean images, same total budget
    t0 = time.perf_counter()
    clean = _prior(config, shape, seed)
    plausible.fit(clean, x_obs, **{**training, "steps": total_steps}, seed=seed,
                  progress=progress)
    clean_x = prior_samples(clean, seed + 999)
    out["clean"] = {"fd": fd(clean_x), "seconds": time.perf_counter() - t0,
                    "steps": total_steps}
    save_model(clean, RESULTS / f"{tag}_models" / "clean")
    print(f"clean prior ({total_steps} steps): FD {out['clean']['fd']:.3f}", flush=True)

    out["runs"] = {}
    for deleted in config["deleted"]:
        pct = round(100 * deleted)
        t0 = time.perf_counter()
        gd = torch.Generator().manual_seed(seed * 1000 + pct)
        y, masks = mnist_task.corrupt(x_obs, deleted, config["noise"], generator=gd)
        obs = em.Observations(y, em.Masks(masks), config["noise"])
        prior = _prior(config, shape, seed)
        grid: list[tuple[str, torch.Tensor]] = [
            ("clean", x_obs), ("observed", torch.where(masks, y, torch.zeros_like(y)))]
        laps: list[dict[str, Any]] = []

        def metric(lap: int, current: plausible.Denoiser, x: torch.Tensor | None,
                   grid: list = grid, laps: list = laps, pct: int = pct) -> dict[str, Any]:
            samples = prior_samples(current, seed + 100 * lap + pct)
            record = {"lap": lap, "fd_prior": fd(samples)}
            if x is not None:
                record["fd_posterior"] = fd(x[:n_fd])
                grid.append((f"lap {lap} posterior", x))
            grid.append((f"lap {lap} prior", samples))
            laps.append(record)
            print(f"  {pct}% deleted, lap {lap}: FD prior {record['fd_prior']:.3f}"
                  + (f", FD posterior samples {record['fd_posterior']:.3f}"
                     if x is not None else ""), flush=True)
            return record

        result = em.fit(prior, obs, laps=config["laps"], gaussian_rank=config["gaussian_rank"],
                        gaussian_iterations=config["gaussian_iterations"],
                        sampling=config["sampling"], training=training, metric=metric,
                        seed=seed, progress=progress)
        save_model(result.prior, RESULTS / f"{tag}_models" / f"em_{pct}")
        grid.append(("clean prior", clean_x))
        images, titles = _rows(grid, 10)
        path = RESULTS / f"{tag}_{pct}.png"
        image_grid(images, nrow=10, path=path, titles=titles, vmin=-1, vmax=1).clf()
        final = laps[-1]["fd_prior"]
        out["runs"][str(pct)] = {
            "deleted": deleted,
            "laps": laps,
            "em_log": [{k: v for k, v in r.items() if k != "log_likelihood"}
                       for r in result.laps],
            "gaussian_log_likelihood": result.gaussian_log_likelihood,
            "fd_final": final,
            "fd_ratio_to_clean": final / out["clean"]["fd"],
            "seconds": time.perf_counter() - t0,
            "figure": str(path.relative_to(RESULTS.parent)),
        }
    r75 = out["runs"].get("75")
    if r75 is not None:
        out["target"] = {"what": "75% deleted: EM prior FD <= 2 x clean prior FD",
                         "ratio": r75["fd_ratio_to_clean"],
                         "met": bool(r75["fd_ratio_to_clean"] <= 2.0)}
    out["seconds"] = time.perf_counter() - tick
    return out


# ---------------------------------------------------------------------------------------------
# accelerated MRI


def mri_experiment(config: dict[str, Any], seed: int = 0, tag: str = "em_mri",
                   progress: bool = False) -> dict[str, Any]:
    """Runs the accelerated-MRI experiment; returns the JSON payload and writes the figures
    ``results/<tag>_laps.png`` and ``results/<tag>_recon.png``."""
    out: dict[str, Any] = {"config": config, "seed": seed}
    tick = time.perf_counter()
    size, noise = config["size"], config["noise"]
    train, train_index = mri_task.load_mni_slices(size, config["axis"], split="train")
    test, test_index = mri_task.load_mni_slices(size, config["axis"], split="test")
    out["slices"] = {"train": len(train), "test": len(test),
                     "test_index": test_index.tolist()}
    g = torch.Generator().manual_seed(seed)
    x_obs = train.repeat(config["repeats"], 1, 1, 1)
    kw = {"acceleration": tuple(config["acceleration"]),
          "center_fraction": config["center_fraction"], "kind": config["kind"]}
    masks = mri_task.kspace_masks(len(x_obs), size, generator=g, **kw)
    y = mri_task.observe(x_obs, masks, noise, generator=g)
    obs = em.Observations(y, em.FourierMasks(masks), noise)
    out["observations"] = {"n": len(obs), "sampled_fraction": float(masks.float().mean())}
    print(f"MRI: {len(train)} training slices x {config['repeats']} acquisitions, "
          f"{len(test)} held-out slices; k-space sampled {float(masks.float().mean()):.3f}",
          flush=True)

    # lap 0: the exact EM Gaussian (mean image + covariance diagonal in the Fourier basis)
    t0 = time.perf_counter()
    fg, history = mri_task.fourier_gaussian_em(y, masks, noise, config["gaussian_iterations"])
    schedule = plausible.VPSchedule()
    gaussian = fg.denoiser(schedule)
    out["gaussian"] = {"log_likelihood": history, "seconds": time.perf_counter() - t0}

    # held-out k-space observations
    gt = torch.Generator().manual_seed(seed + 1)
    test_masks = mri_task.kspace_masks(len(test), size, generator=gt, **kw)
    test_y = mri_task.observe(test, test_masks, noise, generator=gt)
    truth = (test + 1) / 2  # [0, 1] for PSNR / SSIM

    def scores(x: torch.Tensor) -> dict[str, Any]:
        x01 = (x.clamp(-1, 1).double() + 1) / 2
        p = mri_task.psnr(x01, truth.double())
        s = mri_task.ssim(x01, truth.double())
        return {"psnr": float(p.mean()), "psnr_std": float(p.std()), "ssim": float(s.mean()),
                "ssim_std": float(s.std()), "psnr_per_slice": p.tolist()}

    recon: dict[str, torch.Tensor] = {
        "zero-filled": mri_task.zero_filled(test_y, test_masks),
        "Gaussian (lap 0)": fg.posterior_mean(test_y, test_masks, noise).float(),
    }

    prior = _prior(config, (1, size, size), seed)
    lap_rows: list[tuple[str, torch.Tensor]] = [
        ("training slices", train[::max(1, len(train) // 8)])]

    def metric(lap: int, current: plausible.Denoiser, x: torch.Tensor | None) -> dict[str, Any]:
        was = current.training
        current.eval()
        samples = plausible.sample(current, 8, steps=config["eval"]["steps"],
                                   sampler=config["eval"]["sampler"], seed=seed + lap,
                                   progress=False)
        current.train(was)
        if x is not None:
            lap_rows.append((f"lap {lap} posterior", x[::max(1, len(x) // 8)]))
        lap_rows.append((f"lap {lap} prior", samples))
        print(f"  lap {lap} done", flush=True)
        return {}

    t0 = time.perf_counter()
    result = em.fit(prior, obs, laps=config["laps"], gaussian=gaussian,
                    sampling=config["sampling"], training=config["training"], metric=metric,
                    seed=seed, progress=progress)
    out["em"] = {"laps": [{k: v for k, v in r.items() if k != "log_likelihood"}
                          for r in result.laps], "seconds": time.perf_counter() - t0}
    save_model(prior, RESULTS / f"{tag}_models" / "em")

    # posterior reconstructions of the held-out slices with the EM prior (MMPS)
    t0 = time.perf_counter()
    ev = config["eval"]
    K = ev["samples"]
    test_obs = em.Observations(test_y.repeat(K, 1, 1, 1, 1),
                               em.FourierMasks(test_masks.repeat(K, 1, 1)), noise)
    prior.eval()
    samples = em.posterior_samples(prior, test_obs, steps=ev["steps"], sampler=ev["sampler"],
                                   maxiter=ev["maxiter"], batch_size=64, seed=seed + 7,
                                   progress=progress)
    samples = samples.reshape(K, len(test), 1, size, size)
    recon["EM prior, MMPS posterior mean"] = samples.mean(0)
    recon["EM prior, one MMPS sample"] = samples[0]
    out["eval_seconds"] = time.perf_counter() - t0
    out["reconstruction"] = {name: scores(x) for name, x in recon.items()}
    for name, s in out["reconstruction"].items():
        print(f"  {name:32s} PSNR {s['psnr']:.2f} dB  SSIM {s['ssim']:.3f}", flush=True)
    gain = (out["reconstruction"]["EM prior, MMPS posterior mean"]["psnr"]
            - out["reconstruction"]["zero-filled"]["psnr"])
    out["target"] = {"what": "posterior mean PSNR >= zero-filled PSNR + 5 dB",
                     "gain_db": gain, "met": bool(gain >= 5.0)}

    # figures
    path_laps = RESULTS / f"{tag}_laps.png"
    images, titles = _rows(lap_rows, 8)
    image_grid(images, nrow=8, path=path_laps, titles=titles, vmin=-1, vmax=1).clf()
    show = torch.linspace(0, len(test) - 1, 8).round().long()
    rows = [("truth", test[show])] + [(name, x[show]) for name, x in recon.items()]
    rows.append(("|error| x4, posterior mean",
                 (4 * (recon["EM prior, MMPS posterior mean"][show] - test[show]).abs() - 1)))
    images, titles = _rows(rows, 8)
    path_recon = RESULTS / f"{tag}_recon.png"
    image_grid(images, nrow=8, path=path_recon, titles=titles, vmin=-1, vmax=1).clf()
    out["figures"] = [str(p.relative_to(RESULTS.parent)) for p in (path_laps, path_recon)]
    out["seconds"] = time.perf_counter() - tick
    return out


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", choices=["mnist", "mri"], required=True)
    parser.add_argument("--quick", action="store_true", help="a tiny configuration (smoke test)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--deleted", type=float, nargs="+", default=None,
                        help="mnist: the deleted fractions to run (default: 0.75 0.5); the "
                             "output name gets their percentages when given")
    parser.add_argument("--laps", type=int, default=None,
                        help="EM laps (default: the configuration's; MNIST's clean prior gets "
                             "laps x steps training steps)")
    parser.add_argument("--sampling-steps", type=int, default=None,
                        help="steps of each lap's MMPS posterior sampling (the E-step; default: "
                             "the configuration's)")
    parser.add_argument("--maxiter", type=int, default=None,
                        help="GMRES iterations of the E-step's MMPS (default: the "
                             "configuration's)")
    parser.add_argument("--train-steps", type=int, default=None,
                        help="training steps per lap (default: the configuration's)")
    parser.add_argument("--tag", default=None, help="name of the outputs (default: derived "
                        "from the experiment and the options)")
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args(argv)
    info = setup(args.threads, args.seed)
    torch.set_flush_denormal(True)
    tag = f"em_{args.experiment}" + ("_quick" if args.quick else "") \
        + (f"_laps{args.laps}" if args.laps is not None else "")
    if args.experiment == "mnist":
        config = copy.deepcopy(MNIST_QUICK if args.quick else MNIST_CONFIG)
        if args.deleted:
            config["deleted"] = list(args.deleted)
            tag += "_" + "_".join(str(round(100 * d)) for d in args.deleted)
    else:
        config = copy.deepcopy(MRI_QUICK if args.quick else MRI_CONFIG)
    if args.laps is not None:
        config["laps"] = args.laps
    for key, value in (("steps", args.sampling_steps), ("maxiter", args.maxiter)):
        if value is not None:
            config["sampling"][key] = value
            tag += f"_e{key[0]}{value}"
    if args.train_steps is not None:
        config["training"]["steps"] = args.train_steps
        tag += f"_t{args.train_steps}"
    tag = args.tag or tag
    if args.experiment == "mnist":
        payload = mnist_experiment(config, args.seed, tag, args.progress)
    else:
        payload = mri_experiment(config, args.seed, tag, args.progress)
    payload["machine"] = info
    payload["machine"]["note"] = "shared 2-core machine: other jobs ran at the same time"
    payload["command"] = " ".join(["python", "benchmarks/em_images.py", *(argv or sys.argv[1:])])
    path = write_json(tag, payload)
    print(f"wrote {path} ({payload['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
