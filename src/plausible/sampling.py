r"""Samplers of the reverse diffusion. A sampler only ever sees a
:class:`~plausible.denoisers.Denoiser` (a prior, a zero-shot posterior, a conditional
denoiser with its condition bound...) and its schedule.

All samplers start from :math:`x_1 \sim \mathcal{N}(0, \sigma_1^2 I)` and walk a decreasing
time grid :math:`1 = t_0 > \dots > t_N = 0`. With :math:`\hat{x} = d(x_t, t)` and
:math:`\hat\epsilon = (x_t - \alpha_t \hat{x}) / \sigma_t`:

- ``"ddpm"``: ancestral sampling, the exact Gaussian transition :math:`q(x_s \mid x_t, x =
  \hat{x})` (DDIM with :math:`\eta = 1`);
- ``"ddpm-cov"``: ancestral sampling with the moment-matched transition (Bao et al. 2022's
  optimal covariance, with Tweedie's full covariance as in Boys et al. 2023's moment
  projection): DDPM's step draws as though :math:`\hat{x}` were certain, and so loses the
  spread :math:`c_0^2\, \mathbb{V}[x \mid x_t]` at every step (it under-disperses, the more
  the narrower the distribution is on the grid); this step draws :math:`x_s \sim
  \mathcal{N}(\alpha_s \hat{x} + \sqrt{\sigma_s^2 - c^2}\,\hat\epsilon,\ c^2 I + c_0^2\,
  \mathbb{V}[x \mid x_t])`, :math:`c_0 = \alpha_s - \alpha_t \sqrt{\sigma_s^2 - c^2} /
  \sigma_t`, with Tweedie's covariance :math:`\mathbb{V}[x \mid x_t] = \frac{\sigma_t^2}
  {\alpha_t} \frac{J + J^\top}{2}` (eigenvalues clipped at 0), :math:`J = \partial d /
  \partial x_t` by forward differences (:math:`D` more calls on the batch). The transition is
  exact, at any number of steps, when :math:`p(x \mid x_t)` is Gaussian.
  :math:`D + 1` evaluations a step: for states of at most ``COV_MAX_DIM`` values (the
  parameters of simulation-based inference);
- ``"ddim"``: :math:`x_s = \alpha_s \hat{x} + \sqrt{\sigma_s^2 - c^2}\,\hat\epsilon + c z`,
  :math:`c = \eta\, \sigma_s \sqrt{1 - (\alpha_t \sigma_s / \alpha_s \sigma_t)^2}`
  (default :math:`\eta = 0`, the first-order exponential integrator of the probability-flow
  ODE);
- ``"heun"``: EDM's second-order Heun method on the probability-flow ODE in the
  variables :math:`x_t / \alpha_t` and :math:`\rho_t = \sigma_t / \alpha_t` (2 evaluations a
  step);
- ``"dpm++"``: multistep DPM-Solver++ (data prediction), order 1, 2 or 3, in
  :math:`\lambda_t = \log(\alpha_t / \sigma_t)`;
- ``"dpm"``: multistep DPM-Solver (noise prediction), order 1, 2 or 3;
- ``"unipc"``: UniPC (Zhao et al. 2023) in data prediction with :math:`B(h) = e^h - 1`:
  the multistep predictor of order ``order``, and after each new evaluation a corrector that
  raises the order by one at no extra evaluation;
- ``"pc"``: predictor-corrector: a DDIM predictor (of stochasticity ``eta``, default 0; with
  ``eta = 1`` the ancestral DDPM step) then ``corrections`` Langevin steps
  :math:`x \leftarrow x - \delta \sigma_s \hat\epsilon + \sqrt{2\delta}\, \sigma_s z` with
  SDA's step :math:`\delta = \tau / \overline{\hat\epsilon^2}` (one evaluation each).

Called without ``sampler``, :func:`sample` uses the denoiser's own defaults
(:attr:`~plausible.denoisers.Denoiser.sampling`): ``"ddpm"`` for priors and amortized
posteriors; for :class:`~plausible.posterior.MMPS`, ``"pc"`` with the ancestral predictor
(``eta = 1``), one Langevin correction of ``tau = 0.25`` after every step that ends above the
noise ratio ``correct_above = 0.2`` (about 2 evaluations a step), which at equal denoiser
evaluations is closer to the exact posterior than DDPM on Gaussian-mixture priors
(BENCHMARKS.md, section 2).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .denoisers import Denoiser
from .schedules import time_grid

__all__ = ["sample", "SAMPLERS", "COV_MAX_DIM", "evaluations"]

SAMPLERS = ("ddpm", "ddpm-cov", "ddim", "heun", "pc", "dpm", "dpm++", "unipc")
#: ``"ddpm-cov"`` forms the full Jacobian: states of at most this many values.
COV_MAX_DIM = 64
#: ``sample`` raises when a state exceeds this multiple of the initial noise's scale.
DIVERGED = 1e8


def evaluations(sampler: str, steps: int, corrections: int = 1, dim: int = 1) -> int:
    """Number of denoiser evaluations that :func:`sample` makes for one batch (for ``"pc"``
    with ``correct_above > 0``, an upper bound: the low-noise steps skip their corrections;
    for ``"ddpm-cov"``, ``steps * (dim + 1)`` for states of ``dim`` values, made as ``steps``
    calls on ``dim + 1`` times the batch)."""
    if sampler == "ddpm-cov":
        return steps * (dim + 1)
    if sampler == "heun":
        return 2 * steps
    if sampler == "pc":
        return steps * (1 + corrections)
    return steps


def _device_of(denoiser: Denoiser) -> torch.device:
    for tensor in list(denoiser.parameters()) + list(denoiser.buffers()):
        return tensor.device
    return torch.device("cpu")


@torch.no_grad()
def sample(
    denoiser: Denoiser,
    n: int,
    steps: int = 64,
    sampler: str | None = None,
    *,
    grid: str | Tensor | None = None,
    eta: float | None = None,
    order: int = 2,
    corrections: int | None = None,
    tau: float | None = None,
    correct_above: float | None = None,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    x_1: Tensor | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    **cond: Any,
) -> Tensor:
    r"""Draws ``n`` samples from a denoiser by reverse diffusion.

    Arguments:
        denoiser: Any :class:`~plausible.denoisers.Denoiser` with a known ``shape``.
        n: Number of samples.
        steps: Number of steps of the time grid.
        sampler: One of ``"ddpm"``, ``"ddpm-cov"``, ``"ddim"``, ``"heun"``, ``"pc"``,
            ``"dpm"``, ``"dpm++"``, ``"unipc"``; ``None`` (default): the denoiser's
            :attr:`~plausible.denoisers.Denoiser.sampling` (``"ddpm"`` unless the denoiser
            says otherwise; ``"pc"`` with ``eta = 1``, one correction, ``tau = 0.25``,
            ``correct_above = 0.2`` for :class:`~plausible.MMPS`), whose ``eta``,
            ``corrections``, ``tau`` and ``correct_above`` apply where these are not given.
        grid: ``"uniform"``, ``"logsnr"`` or ``"karras"`` (see
            :func:`~plausible.schedules.time_grid`) or a decreasing tensor of times from 1 to 0;
            ``None`` (default): the denoiser's ``sampling["grid"]`` if it names one (a log-SNR
            grid for amortized posteriors), else ``"uniform"``.
        eta: Stochasticity of the ``"ddim"`` step and of the ``"pc"`` predictor (default 0;
            ``"ddpm"`` is ``eta = 1``).
        order: Order of the ``"dpm"`` / ``"dpm++"`` / ``"unipc"`` multistep solvers (1, 2 or
            3).
        corrections: Langevin corrections per step of ``"pc"`` (default 1).
        tau: Langevin step factor of ``"pc"`` (default 0.25; SDA: 0.25 Lorenz, 0.5
            Kolmogorov).
        correct_above: ``"pc"`` corrects only after steps that end at a noise ratio
            :math:`\rho_s = \sigma_s / \alpha_s` above this (default 0: after every step).
            A Langevin step of finite size inflates the variance of the directions the
            posterior pins down below the noise level; skipping the last, low-noise
            corrections reduces that bias (it does not remove it; measured in BENCHMARKS.md,
            section 2).
        generator, seed: Random source (a ``torch.Generator``, or a seed for a new one).
        x_1: Initial noise ``(n, *S)`` (default :math:`\sigma_1 z`).
        dtype, device: Of the samples (default: torch's default dtype, the denoiser's device).
        progress: Show a tqdm progress bar.
        cond: Extra keyword arguments passed to every denoiser call.

    Raises:
        FloatingPointError: If a state becomes NaN, infinite, or larger than ``DIVERGED`` (1e8)
            times the scale of the initial noise (a diverged sampler, e.g. DPS with too large
            a ``zeta``).

    Returns:
        Samples of shape ``(n, *denoiser.shape)``; for a denoiser that defines ``decode`` (one
        that samples a transformed space, such as ``ConditionalDenoiser.given(y)`` with a
        bounded prior), ``denoiser.decode(x)``: samples of :math:`\theta`; for one that
        samples by rejection (``rejects``, e.g. ``ConditionalDenoiser(support="reject")`` with
        a box prior), its own ``sample``: ``n`` samples inside the support.
    """
    if not isinstance(denoiser, Denoiser):
        raise TypeError(f"sample expects a Denoiser, got {type(denoiser).__name__}")
    if denoiser.shape is None:
        raise ValueError("the denoiser's state shape is unknown: build it with shape=(...)")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if getattr(denoiser, "rejects", False):
        # a posterior restricted to its prior's support by rejection (an amortized posterior
        # with support="reject") draws in rounds; it calls back here for each round
        if x_1 is not None:
            raise ValueError("x_1 cannot be given for a posterior sampled by rejection (its "
                             "rounds need fresh noise)")
        return denoiser.sample(  # type: ignore[attr-defined]
            n, steps=steps, sampler=sampler, grid=grid, eta=eta, order=order,
            corrections=corrections, tau=tau, correct_above=correct_above,
            generator=generator, seed=seed, dtype=dtype, device=device, progress=progress,
            **cond)
    if sampler is None:  # the denoiser's own defaults, where the caller gives none
        defaults = dict(getattr(denoiser, "sampling", None) or {})
        sampler = defaults.pop("sampler", "ddpm")
        eta = defaults.get("eta") if eta is None else eta
        corrections = defaults.get("corrections") if corrections is None else corrections
        tau = defaults.get("tau") if tau is None else tau
        correct_above = defaults.get("correct_above") if correct_above is None else correct_above
    if grid is None:
        grid = (getattr(denoiser, "sampling", None) or {}).get("grid", "uniform")
    corrections = 1 if corrections is None else corrections
    tau = 0.25 if tau is None else tau
    correct_above = 0.0 if correct_above is None else float(correct_above)
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {SAMPLERS}")
    if order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3, got {order}")
    if not isinstance(corrections, int) or corrections < 0:
        raise ValueError(f"corrections must be an integer >= 0, got {corrections!r}")
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau!r}")
    if not correct_above >= 0:
        raise ValueError(f"correct_above must be >= 0, got {correct_above!r}")
    dim = math.prod(denoiser.shape)
    if sampler == "ddpm-cov" and dim > COV_MAX_DIM:
        raise ValueError(f"sampler 'ddpm-cov' forms the {dim} x {dim} Jacobian of the denoiser "
                         f"at every step: it is for states of at most {COV_MAX_DIM} values; "
                         "use 'ddpm' or another sampler")
    dtype = dtype or torch.get_default_dtype()
    device = torch.device(device) if device is not None else _device_of(denoiser)
    if generator is None and seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    schedule = denoiser.schedule

    if isinstance(grid, Tensor):
        ts = grid.to(torch.float64).flatten()
        if ts.numel() < 2 or not (ts[1:] < ts[:-1]).all():
            raise ValueError("a custom grid must be a decreasing tensor of at least 2 times")
    else:
        ts = time_grid(steps, grid, schedule)
    alphas, sigmas = schedule(ts)
    ts, alphas, sigmas = (a.to(dtype=dtype, device=device) for a in (ts, alphas, sigmas))
    steps = ts.numel() - 1

    shape = (n, *denoiser.shape)

    def randn() -> Tensor:
        return torch.randn(shape, generator=generator, dtype=dtype, device=device)

    if x_1 is None:
        x = sigmas[0] * randn()
    else:
        if tuple(x_1.shape) != shape:
            raise ValueError(f"x_1 must have shape {shape}, got {tuple(x_1.shape)}")
        x = x_1.to(dtype=dtype, device=device)
    # divergence guard: a state this far beyond the initial noise is never a sample
    limit = DIVERGED * max(1.0, float(sigmas[0]), float(x.abs().max()))

    def d(x_t: Tensor, i: int) -> Tensor:
        return denoiser(x_t, ts[i], **cond)

    if eta is None:
        eta = 1.0 if sampler == "ddpm" else 0.0
    history: list[tuple[Tensor, Tensor]] = []  # (lambda, prediction) of previous steps
    unipc_outputs: list[Tensor] = []  # data predictions at the previous grid points
    unipc_last: Tensor | None = None
    unipc_order = 1

    for i in tqdm(range(steps), desc=f"sampling ({sampler})", disable=not progress,
                  leave=False):
        a_t, s_t, a_s, s_s = alphas[i], sigmas[i], alphas[i + 1], sigmas[i + 1]
        if sampler == "ddpm-cov":
            x_hat, jac = _jacobian(lambda v: d(v, i), x)
            c2 = s_s**2 * (1 - (a_t * s_s / (a_s * s_t)) ** 2).clamp(min=0)
            k = torch.sqrt((s_s**2 - c2).clamp(min=0)) / s_t
            c0 = a_s - k * a_t
            cov = (s_t**2 / a_t) * (jac + jac.transpose(1, 2)) / 2  # V[x | x_t], (n, D, D)
            lam, vec = torch.linalg.eigh(cov)
            std = torch.sqrt(c2 + c0**2 * lam.clamp(min=0))
            noise = (vec @ (std * randn().reshape(n, dim))[..., None])[..., 0]
            x = a_s * x_hat + k * (x - a_t * x_hat) + noise.reshape(shape)
        elif sampler in ("ddpm", "ddim", "pc"):
            x_hat = d(x, i)
            eps = (x - a_t * x_hat) / s_t
            e = eta
            c2 = (e * s_s) ** 2 * (1 - (a_t * s_s / (a_s * s_t)) ** 2).clamp(min=0)
            x = a_s * x_hat + torch.sqrt((s_s**2 - c2).clamp(min=0)) * eps
            if e > 0:
                x = x + torch.sqrt(c2) * randn()
            if sampler == "pc" and float(s_s / a_s) > correct_above:
                for _ in range(corrections):
                    eps = (x - a_s * d(x, i + 1)) / s_s
                    delta = tau / eps.square().flatten(1).mean(1).clamp(min=1e-12)
                    delta = delta.reshape(-1, *([1] * (x.dim() - 1)))
                    x = x - delta * s_s * eps + torch.sqrt(2 * delta) * s_s * randn()
        elif sampler == "heun":
            rho_t, rho_s = s_t / a_t, s_s / a_s
            y = x / a_t
            d1 = (y - d(x, i)) / rho_t
            y_euler = y + (rho_s - rho_t) * d1
            d2 = (y_euler - d(a_s * y_euler, i + 1)) / rho_s
            x = a_s * (y + (rho_s - rho_t) * (d1 + d2) / 2)
        elif sampler == "unipc":
            x_hat = d(x, i)
            lam = torch.log(alphas / sigmas)
            if unipc_last is not None:  # corrector: refine the previous step with d(x, i)
                x = _unipc_update(unipc_last, unipc_outputs, x_hat, lam, alphas, sigmas, i - 1,
                                  unipc_order)
            unipc_outputs.append(x_hat)
            if len(unipc_outputs) > order:
                unipc_outputs.pop(0)
            unipc_order = min(order, len(unipc_outputs))
            unipc_last = x
            x = _unipc_update(x, unipc_outputs, None, lam, alphas, sigmas, i, unipc_order)
        else:  # multistep exponential integrators
            lam_t, lam_s = torch.log(a_t / s_t), torch.log(a_s / s_s)
            h = lam_s - lam_t
            x_hat = d(x, i)
            pred = x_hat if sampler == "dpm++" else (x - a_t * x_hat) / s_t
            x = _multistep(x, pred, history[-(order - 1):] if order > 1 else [], sampler,
                           lam_t, h, a_t, s_t, a_s, s_s)
            history.append((lam_t, pred))
            del history[:-2]
        size = float(x.abs().max())
        if not size <= limit:  # also catches NaN
            what = "NaN or infinity" if not math.isfinite(size) else \
                f"values of size {size:.3g} (more than {DIVERGED:g} x the initial noise)"
            raise FloatingPointError(
                f"sampling ({sampler}) produced {what} at step {i + 1}/{steps} "
                f"(t = {float(ts[i]):.4g}): it diverged; check the denoiser (for a DPS "
                "posterior, a smaller zeta) or use more steps"
            )
    # denoisers over a transformed space (e.g. an amortized posterior of bounded parameters,
    # sampled in logit space) map their samples back
    decode = getattr(denoiser, "decode", None)
    return decode(x) if callable(decode) else x



def _jacobian(f: Any, x: Tensor) -> tuple[Tensor, Tensor]:
    r"""``f(x)`` and its per-sample Jacobian by forward differences, in :math:`D + 1` calls of
    ``f`` on batches like ``x`` (so that per-sample keyword arguments still line up, and large
    batches stay in cache: one call on :math:`11 \times 10^4` states took twice as long as 11
    calls on :math:`10^4`): ``x`` ``(n, *S)`` with :math:`D = \prod S` values; returns ``f(x)``
    ``(n, *S)`` and :math:`J_{kij} = \partial f(x)_{ki} / \partial x_{kj}` ``(n, D, D)``. The
    step :math:`h = 4 \sqrt{\epsilon} \max(1, |x_k|_\infty)` per sample (machine epsilon of
    the dtype) balances truncation and rounding errors."""
    n, dim = x.shape[0], math.prod(x.shape[1:])
    flat = x.reshape(n, dim)
    h = 4 * math.sqrt(torch.finfo(x.dtype).eps) * flat.abs().amax(1).clamp(min=1.0)  # (n,)
    f_x = f(x).reshape(n, dim)
    jac = torch.empty(n, dim, dim, dtype=f_x.dtype, device=f_x.device)
    for j in range(dim):  # column j: (f(x + h e_j) - f(x)) / h
        shifted = flat.clone()
        shifted[:, j] += h
        step = (shifted[:, j] - flat[:, j])[:, None]  # h as represented in x's dtype
        jac[:, :, j] = (f(shifted.reshape(x.shape)).reshape(n, dim) - f_x) / step
    return f_x.reshape(x.shape), jac


def _exponential_step(x: Tensor, pred: Tensor, sampler: str, a_t: Tensor, s_t: Tensor,
                      a_s: Tensor, s_s: Tensor, h: Tensor, slope: Tensor | None = None,
                      curvature: Tensor | None = None) -> Tensor:
    r"""One exponential-integrator step over :math:`h = \lambda_s - \lambda_t` with the
    prediction expanded to second order in :math:`\lambda` (DPM-Solver++, Lu et al. 2022):

    data prediction (``"dpm++"``, :math:`\varphi_1 = e^{-h} - 1`):
    :math:`x_s = \frac{\sigma_s}{\sigma_t} x_t - \alpha_s \varphi_1 D_0
    + \alpha_s (\varphi_1 / h + 1) D_1 - \alpha_s ((\varphi_1 + h) / h^2 - 1/2) D_2`;
    noise prediction (``"dpm"``, :math:`\varphi_1 = e^{h} - 1`):
    :math:`x_s = \frac{\alpha_s}{\alpha_t} x_t - \sigma_s \varphi_1 D_0
    - \sigma_s (\varphi_1 / h - 1) D_1 - \sigma_s ((\varphi_1 - h) / h^2 - 1/2) D_2`,

    with :math:`D_0` the prediction at :math:`t`, :math:`D_1 \approx h\, dD/d\lambda` (``slope``)
    and :math:`D_2 \approx h^2 d^2D/d\lambda^2` (``curvature``). With ``slope`` only, the
    second-order rule of the papers, :math:`-\alpha_s \varphi_1 D_1 / 2` (resp.
    :math:`-\sigma_s \varphi_1 D_1 / 2`), is used.
    """
    if sampler == "dpm++":
        phi1 = torch.expm1(-h)
        x = (s_s / s_t) * x - a_s * phi1 * pred
        if slope is not None and curvature is None:
            x = x - 0.5 * a_s * phi1 * slope
        elif slope is not None:
            x = x + a_s * (phi1 / h + 1) * slope - a_s * ((phi1 + h) / h**2 - 0.5) * curvature
    else:
        phi1 = torch.expm1(h)
        x = (a_s / a_t) * x - s_s * phi1 * pred
        if slope is not None and curvature is None:
            x = x - 0.5 * s_s * phi1 * slope
        elif slope is not None:
            x = x - s_s * (phi1 / h - 1) * slope - s_s * ((phi1 - h) / h**2 - 0.5) * curvature
    return x


def _multistep(x: Tensor, pred: Tensor, history: list[tuple[Tensor, Tensor]], sampler: str,
               lam_t: Tensor, h: Tensor, a_t: Tensor, s_t: Tensor, a_s: Tensor,
               s_s: Tensor) -> Tensor:
    """One multistep DPM-Solver(++) step of order ``len(history) + 1`` (finite differences of
    the predictions at the previous log-SNRs ``history``, oldest first)."""
    if not history:
        return _exponential_step(x, pred, sampler, a_t, s_t, a_s, s_s, h)
    lam_1, p_1 = history[-1]
    r0 = (lam_t - lam_1) / h
    D1_0 = (pred - p_1) / r0
    if len(history) == 1:
        return _exponential_step(x, pred, sampler, a_t, s_t, a_s, s_s, h, slope=D1_0)
    lam_2, p_2 = history[-2]
    r1 = (lam_1 - lam_2) / h
    D1_1 = (p_1 - p_2) / r1
    D1 = D1_0 + r0 / (r0 + r1) * (D1_0 - D1_1)
    # D1_0 - D1_1 = (r0 + r1) h^2 D''/2 + O(h^3): D2 = h^2 D'' needs the factor 2. The
    # reference implementations (DPM-Solver's and diffusers' multistep third-order update)
    # omit it, which halves the second-order term and leaves an O(h^3) local error: their
    # "order 3" converges at order 2 (measured here: rate 2.1 before, 4.0 after, on an exact
    # Gaussian flow; tests/test_sampling_order.py)
    D2 = 2 * (D1_0 - D1_1) / (r0 + r1)
    return _exponential_step(x, pred, sampler, a_t, s_t, a_s, s_s, h, slope=D1, curvature=D2)


def _unipc_update(
    x: Tensor, outputs: list[Tensor], model_t: Tensor | None, lam: Tensor, alphas: Tensor,
    sigmas: Tensor, i: int, order: int,
) -> Tensor:
    r"""One UniPC update from grid point ``i`` to ``i + 1`` in data prediction (bh2).

    ``outputs`` holds the data predictions at points ``i - order + 1 .. i`` (last is at ``i``).
    With ``model_t = None`` it is the predictor UniP; with ``model_t`` (the prediction at
    ``i + 1``) it is the corrector UniC, which refines the point the predictor reached.
    """
    m0 = outputs[-1]
    h = lam[i + 1] - lam[i]
    hh = -h
    h_phi_1 = torch.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    B_h = torch.expm1(hh)
    rks, D1s = [], []
    for k in range(1, order):
        rk = (lam[i - k] - lam[i]) / h
        rks.append(rk)
        D1s.append((outputs[-(k + 1)] - m0) / rk)
    rks.append(torch.ones_like(h))
    rks_t = torch.stack(rks)
    R, b, factorial = [], [], 1
    for k in range(1, order + 1):
        R.append(rks_t ** (k - 1))
        b.append(h_phi_k * factorial / B_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    R_t, b_t = torch.stack(R), torch.stack(b)
    x_base = sigmas[i + 1] / sigmas[i] * x - alphas[i + 1] * h_phi_1 * m0
    if model_t is None:  # predictor
        if not D1s:
            return x_base
        rhos = torch.ones(1, dtype=x.dtype, device=x.device) * 0.5 if order == 2 else \
            torch.linalg.solve(R_t[:-1, :-1], b_t[:-1])
        res = sum(r * d for r, d in zip(rhos, D1s, strict=True))
        return x_base - alphas[i + 1] * B_h * res
    rhos = torch.ones(1, dtype=x.dtype, device=x.device) * 0.5 if order == 1 else \
        torch.linalg.solve(R_t, b_t)
    res = sum(r * d for r, d in zip(rhos[:-1], D1s, strict=True)) if D1s else 0.0
    return x_base - alphas[i + 1] * B_h * (res + rhos[-1] * (model_t - m0))
