r"""Trajectory denoisers composed from a local window denoiser (score-based data assimilation,
Rozet & Louppe 2023).

A trajectory :math:`x_{0:L-1}` of a Markov chain of order :math:`k` has a local structure: the
state :math:`x_i` depends on the rest of the trajectory only through its Markov blanket
:math:`x_{i-k:i+k}`. A denoiser :math:`d_W` trained on windows of :math:`W = 2k + 1`
consecutive states is therefore composed into a denoiser of trajectories of any length
:math:`L \geq W`: every window of the trajectory is denoised (in one batched call) and each
state is read from one window (or averaged over the windows that contain it),

.. math:: d(x_t, t)_i = d_W\big(x_{t,\, s_w : s_w + W}, t\big)_{i - s_w}, \qquad
    w = w(i) \text{ a window that contains } i.

How exact is it? At :math:`t \to 0` the window conditional :math:`p(x_i \mid x_{t}
\text{ of the window})` is the full conditional when the window holds the Markov blanket of
:math:`x_i` (order ``k`` at least the chain's order). Under noise, the marginal of
:math:`x_t` is *not* Markov (every noisy state carries information about the whole
trajectory), so the composition is an approximation. For a Gaussian chain of order
:math:`p` (tested on AR chains, ``tests/test_trajectories.py``):

- it is exact when one window covers the trajectory (:math:`L = W`) and for independent
  states, at every :math:`t`;
- at small noise, with :math:`\rho = \sigma_t / \alpha_t`, :math:`E[x \mid x_t] = m +
  (I - \rho^2 P + \rho^4 P^2 - \dots)(x_t / \alpha_t - m)` with the precision :math:`P`
  banded of width :math:`p`, so the error is :math:`O(\rho^{2 \lceil (k+1)/p \rceil})`
  (measured slopes match; at :math:`t = 0` of the VP schedule, :math:`\rho = 10^{-3}`);
- it is largest at intermediate noise (:math:`t \approx 0.5`-:math:`0.7`), bounded, and
  decreases as the window order grows; slowly mixing chains need windows longer than their
  correlation length (figures in ``docs/assimilation.md``).

:class:`TrajectoryDenoiser` implements SDA's rule (stride 1) and the blanket variants
(stride > 1, as in latent data assimilation) with three stitching rules.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .denoisers import Denoiser, expand_t

__all__ = ["TrajectoryDenoiser", "STITCHINGS"]

STITCHINGS = ("symmetric", "causal", "average")


def _integer(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int,)) and not (
        isinstance(value, float) and value.is_integer()
    ):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")
    return value


class TrajectoryDenoiser(Denoiser):
    r"""Denoiser of trajectories ``(B, L, *S)`` composed from a denoiser of windows of
    :math:`W = 2k + 1` consecutive states.

    **Windows.** With ``stride = s``, windows start at :math:`0, s, 2s, \dots` while they fit
    in the trajectory, and a last window is aligned to the end (start :math:`L - W`) when the
    regular ones miss it: :math:`n = \lceil (L - W) / s \rceil + 1` windows, overlapping by
    :math:`W - s` states. All :math:`B n` windows are denoised by one batched call of the
    window denoiser (or calls of ``max_batch`` windows each); ``t`` of shape ``()`` or
    ``(B,)`` is given to every window of its trajectory.

    **Stitching** (state :math:`i`, at position :math:`p = i - s_w` of window :math:`w`):

    - ``"symmetric"``: from the window in which :math:`i` is most central, minimising
      :math:`|p - k|`; ties (possible when ``stride > 1``) go to the earlier window. With
      ``stride=1`` this is SDA's rule: the first :math:`k` states from the first window,
      state :math:`i` from the centre of the window centred on :math:`i`
      (:math:`k \le i < L - k`), the last :math:`k` from the last window.
    - ``"causal"``: from the window in which :math:`i` has the most past context, maximising
      :math:`p` (the earliest-starting window that contains :math:`i`). With ``stride=1``:
      state :math:`i \geq W - 1` is the last state of the window ending at :math:`i` (its
      estimate sees :math:`W - 1` past states and no future one), the first :math:`W - 1`
      states come from the first window.
    - ``"average"``: the mean over all windows that contain :math:`i`.

    Time and memory per call are linear in :math:`L`: the windows are a strided view of
    ``x_t`` (one copy of :math:`n W` states for the batched call), and the stitching is a
    gather or a scatter-add with ``O(L)`` indices (cached per length).

    **Window layout.** The window denoiser takes windows ``(W, *S)``, or flattened
    ``(W * S[0], *S[1:])`` (time merged into the first state axis, time-major, as
    :class:`plausible.data.Windows` ``(..., flatten=True)``; e.g. fields ``(C, H, W)``
    become ``W * C`` channels). The layout and ``S`` are read from ``window_denoiser.shape``:
    ``(W, *R)`` means unflattened states ``S = R`` (unless ``flatten=True``:
    ``S = (1, *R)``); a first axis that is another multiple of ``W`` means flattened,
    ``S = (shape[0] / W, *shape[1:])``. ``state_shape`` (and ``flatten``) settle the
    layout explicitly and are checked against the window shape. A window denoiser of
    unknown shape takes states of the shape read from ``x_t`` (unflattened by default).

    Arguments:
        window_denoiser: A :class:`~plausible.denoisers.Denoiser` of windows of ``2k+1``
            states. Its schedule is this denoiser's schedule.
        order: :math:`k \geq 0`, the half-width of the windows.
        length: Trajectory length ``L``, which sets :attr:`shape` ``(L, *S)`` (needed by
            samplers and zero-shot posteriors; :meth:`with_length` makes a copy for another
            length). The forward pass reads ``L`` from ``x_t`` and accepts any
            ``L >= 2k + 1``.
        stride: Distance ``s`` between window starts, ``1 <= s <= W``.
        stitching: ``"symmetric"``, ``"causal"`` or ``"average"`` (see above).
        max_batch: At most this many windows per call of the window denoiser (bounds
            memory), or ``None`` for one call.
        flatten: Whether the windows are flattened (``None``: inferred, see above).
        state_shape: The state shape ``S`` (``None``: inferred).

    Conditioning keyword arguments of :meth:`forward` are passed to the window denoiser:
    a tensor whose first axis has size ``B`` is repeated for each window of its trajectory;
    anything else is passed unchanged to every call.

    Shapes: ``x_t`` ``(B, L, *S)``, ``t`` ``()`` or ``(B,)``; returns ``(B, L, *S)``.
    The composition is differentiable end to end (zero-shot posteriors take vector-Jacobian
    products through it).

    Raises:
        ValueError: On ``L < 2k + 1``, a state shape that does not match, a stride outside
            ``[1, W]``, an unknown stitching, or a window shape that is not a window of
            ``2k + 1`` states.
        TypeError: If ``window_denoiser`` is not a Denoiser or ``x_t`` not a floating tensor.

    Example:
        >>> from plausible.tasks import ARChain
        >>> chain = ARChain(torch.tensor([0.9], dtype=torch.float64), 0.19)
        >>> traj = TrajectoryDenoiser(chain.window_denoiser(order=2), order=2, length=100)
        >>> traj.shape, traj.evaluations(100)
        ((100, 1), 96)
    """

    def __init__(
        self,
        window_denoiser: Denoiser,
        order: int,
        length: int | None = None,
        stride: int = 1,
        stitching: str = "symmetric",
        max_batch: int | None = None,
        *,
        flatten: bool | None = None,
        state_shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(window_denoiser, Denoiser):
            raise TypeError(
                f"window_denoiser must be a plausible Denoiser, got "
                f"{type(window_denoiser).__name__}"
            )
        self.window_denoiser = window_denoiser
        self.schedule = window_denoiser.schedule
        self.order = _integer(order, "order", 0)
        self.window = W = 2 * self.order + 1
        self.stride = _integer(stride, "stride", 1)
        if self.stride > W:
            raise ValueError(
                f"stride must be in [1, 2k + 1] = [1, {W}] (windows must cover the "
                f"trajectory), got {self.stride}"
            )
        if stitching not in STITCHINGS:
            raise ValueError(f"stitching must be one of {STITCHINGS}, got {stitching!r}")
        self.stitching = stitching
        self.max_batch = None if max_batch is None else _integer(max_batch, "max_batch", 1)
        if flatten is not None and not isinstance(flatten, bool):
            raise TypeError(f"flatten must be a bool or None, got {flatten!r}")
        self.flatten, self.state_shape = self._layout(window_denoiser.shape, flatten, state_shape)
        self.length = None if length is None else _integer(length, "length", W)
        self.shape = (
            (self.length, *self.state_shape)
            if self.length is not None and self.state_shape is not None
            else None
        )
        self._plans: dict[tuple[int, str], tuple[Tensor, Tensor, Tensor]] = {}

    def _layout(
        self,
        window_shape: tuple[int, ...] | None,
        flatten: bool | None,
        state_shape: Sequence[int] | None,
    ) -> tuple[bool, tuple[int, ...] | None]:
        """Resolves (flatten, S) from the window shape and the explicit arguments."""
        W = self.window
        S = None if state_shape is None else tuple(int(s) for s in state_shape)
        if S is not None and any(s < 1 for s in S):
            raise ValueError(f"state_shape must hold positive sizes, got {S}")
        if window_shape is None:
            return bool(flatten), S
        ws = tuple(int(s) for s in window_shape)

        def layout_of(S: tuple[int, ...], flat: bool) -> tuple[int, ...]:
            if flat and S:
                return (W * S[0], *S[1:])
            return (W, *S)

        if S is not None:
            options = [False, True] if flatten is None else [flatten]
            for flat in options:
                if layout_of(S, flat) == ws:
                    return flat, S
            expected = " or ".join(str(layout_of(S, f)) for f in options)
            raise ValueError(
                f"the window denoiser's shape {ws} is not a window of 2k + 1 = {W} states of "
                f"shape {S} (expected {expected})"
            )
        if not ws or ws[0] % W != 0:
            raise ValueError(
                f"the window denoiser's shape {ws} is not a window of 2k + 1 = {W} states: "
                f"its first axis must be {W} (windows (W, *S)) or a multiple of {W} "
                f"(flattened windows (W * S[0], *S[1:]))"
            )
        if ws == (W,):  # scalar states: both layouts are the same
            return bool(flatten), ()
        if ws[0] == W and not flatten:
            return False, ws[1:]
        if flatten is False:
            raise ValueError(
                f"the window denoiser's shape {ws} is not an unflattened window (W, *S) with "
                f"W = {W}; pass flatten=True for flattened windows"
            )
        return True, (ws[0] // W, *ws[1:])

    def with_length(self, length: int) -> TrajectoryDenoiser:
        """A copy for trajectories of another length (sharing the window denoiser)."""
        return TrajectoryDenoiser(
            self.window_denoiser, self.order, length, self.stride, self.stitching,
            self.max_batch, flatten=self.flatten, state_shape=self.state_shape,
        )

    def window_starts(self, L: int) -> Tensor:
        """The start of each window of a trajectory of ``L`` states, ``(n,)`` int64."""
        L = self._check_length(L)
        W, s = self.window, self.stride
        starts = list(range(0, L - W + 1, s))
        if starts[-1] != L - W:
            starts.append(L - W)
        return torch.tensor(starts, dtype=torch.int64)

    def evaluations(self, L: int) -> int:
        """Window evaluations per trajectory of ``L`` states (the number of windows)."""
        return int(self.window_starts(L).numel())

    def source(self, L: int) -> tuple[Tensor, Tensor]:
        """The window and the position in it from which each state is read, two ``(L,)``
        int64 tensors (``"symmetric"`` and ``"causal"`` stitching)."""
        if self.stitching == "average":
            raise ValueError("with stitching='average' every state is a mean over windows")
        flat = self._plan(self._check_length(L), torch.device("cpu"))[0]
        return flat // self.window, flat % self.window

    def _check_length(self, L: int) -> int:
        L = int(L)
        if L < self.window:
            raise ValueError(
                f"trajectories must have at least 2k + 1 = {self.window} states for windows of "
                f"order k = {self.order}, got L = {L}"
            )
        return L

    def _plan(self, L: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """Index map of length ``L``: (gather index into the ``n W`` window outputs ``(L,)``
        for symmetric/causal, or the state of each window output ``(n W,)`` and the count of
        windows per state ``(L,)`` for average)."""
        key = (L, str(device))
        if key in self._plans:
            return self._plans[key]
        W, k = self.window, self.order
        starts = self.window_starts(L)
        n = starts.numel()
        p = torch.arange(W)
        state = (starts[:, None] + p).reshape(-1)  # (n W,) the state of each window output
        if self.stitching == "average":
            counts = torch.bincount(state, minlength=L)
            plan = (state.to(device), counts.to(device), starts.to(device))
        else:
            score = (p - k).abs() if self.stitching == "symmetric" else (W - 1 - p)
            flat_index = torch.arange(n * W)
            # lexicographic (score, window): the smallest score, then the earliest window
            key_ = score.repeat(n) * (n * W) + flat_index
            best = torch.full((L,), torch.iinfo(torch.int64).max, dtype=torch.int64)
            best = best.scatter_reduce(0, state, key_, reduce="amin")
            plan = ((best % (n * W)).to(device), starts.to(device), starts.to(device))
        if len(self._plans) > 16:
            self._plans.clear()
        self._plans[key] = plan
        return plan

    def _states(self, x_t: Tensor) -> tuple[int, ...]:
        if not isinstance(x_t, Tensor) or not x_t.is_floating_point():
            raise TypeError(
                "x_t must be a floating-point tensor of shape (B, L, *S), got "
                + (f"dtype {x_t.dtype}" if isinstance(x_t, Tensor) else type(x_t).__name__)
            )
        if x_t.dim() < 2:
            raise ValueError(f"x_t must have shape (B, L, *S), got {tuple(x_t.shape)}")
        S = tuple(x_t.shape[2:])
        if self.state_shape is not None and S != self.state_shape:
            raise ValueError(
                f"x_t must have shape (B, L, {', '.join(map(str, self.state_shape))}) for "
                f"states of shape {self.state_shape}, got {tuple(x_t.shape)}"
            )
        return S

    def check(self, x_t: Tensor, t: Tensor | float) -> Tensor:
        """Validates ``x_t`` ``(B, L, *S)`` with ``L >= 2k + 1`` and ``t``; returns ``t``
        as ``(B,)``."""
        self._states(x_t)
        self._check_length(x_t.shape[1])
        return expand_t(t, x_t)

    def forward(self, x_t: Tensor, t: Tensor | float, **cond: Any) -> Tensor:
        S = self._states(x_t)
        B, L = x_t.shape[:2]
        self._check_length(L)
        t = expand_t(t, x_t)
        W = self.window
        index, aux, starts = self._plan(L, x_t.device)
        n = starts.numel()
        # windows as a strided view (B, n_regular, *S, W), plus the end-aligned one
        view = x_t.unfold(1, W, self.stride).movedim(-1, 2)
        if view.shape[1] < n:
            view = torch.cat([view, x_t[:, L - W:].unsqueeze(1)], dim=1)
        windows = view.reshape(B * n, W, *S)
        if self.flatten and S:
            windows = windows.reshape(B * n, W * S[0], *S[1:])
        t_w = t.repeat_interleave(n)
        batched = {
            key: value.repeat_interleave(n, dim=0)
            for key, value in cond.items()
            if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == B
        }
        chunk = B * n if self.max_batch is None else self.max_batch
        outs = []
        for lo in range(0, B * n, chunk):
            hi = min(lo + chunk, B * n)
            sub = {**cond, **{key: value[lo:hi] for key, value in batched.items()}}
            outs.append(self.window_denoiser(windows[lo:hi], t_w[lo:hi], **sub))
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)
        out = out.reshape(B, n * W, *S)
        if self.stitching == "average":
            total = x_t.new_zeros(B, L, *S).index_add(1, index, out.to(x_t.dtype))
            counts = aux.to(x_t.dtype).reshape(L, *(1,) * len(S))
            return total / counts
        return out.index_select(1, index)

    def extra_repr(self) -> str:
        return (
            f"order={self.order}, window={self.window}, length={self.length}, "
            f"stride={self.stride}, stitching={self.stitching!r}, flatten={self.flatten}, "
            f"state_shape={self.state_shape}, max_batch={self.max_batch}"
        )
