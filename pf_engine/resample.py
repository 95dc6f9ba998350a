"""The fused particle-filter step: PRM outputs -> step rewards -> aggregates -> weights
-> resampling decision -> ancestors, for every problem of a batch in one call.

Particles of all problems lie in one flat batch; problem ``b`` owns the
particles ``seg_offsets[b]:seg_offsets[b + 1]``::

    seg_offsets [0, 3, 3, 7]      problem 0    problem 1   problem 2
    particles                     p0 p1 p2     (none)      p3 p4 p5 p6

The math, per problem of ``n`` particles (``r`` the newest step's reward):

- reward: class-head logits ``[bad, good]`` -> ``softmax[1] = sigmoid(good - bad)``;
  token-pair logits ``[good, bad]`` -> ``softmax[0] = sigmoid(good - bad)``;
  or a reward in [0, 1] given as is.
- aggregate over the particle's steps, kept as O(1) running state:
  ``last`` r; ``min`` min(a, r); ``product`` a * r; ``mean`` a + (r - a) / (k + 1)
  after k steps. Particles that are not live (finished) keep their aggregate.
- log-weight ``logit(clip(a, clip, 1 - clip)) / (temperature * t_b)``, softmax within the
  problem, ``t_b`` the problem's own temperature where ``temperatures`` is given, else 1
  (the paper's form: weights depend on the aggregate alone, so a problem
  that does not resample carries its weights over through its aggregates). A
  problem whose particles all have zero weight (only possible with ``clip=0``)
  gets uniform weights; if some have infinite log-weight, those share the mass.
- ESS ``1 / sum(w^2)``; the problem resamples when ``ESS < ess_threshold * n``
  (always when ``ess_threshold`` is None); otherwise ancestors are the identity.
- ancestors: particle ``k`` is chosen for point ``p`` when ``cdf[k-1] <= p < cdf[k]``
  (zero-weight particles never are); points are ``(i + u) / n`` with one uniform
  per problem (systematic), ``(i + u_i) / n`` (stratified), ``u_i`` (multinomial),
  or ``floor(n w)`` deterministic copies followed by multinomial draws from the
  remainders (residual). Points are scaled by the cdf's last value rather than
  the cdf normalized, so rounding never lifts a point past the top; the cdf
  and points are float64.

Uniforms are given, or drawn as ``philox_uniform(seed, (counter << 32) + particle)``
(see pf_engine.philox), so a (seed, counter) pair reproduces a call exactly.

:func:`resample` is the one entry point: it validates its inputs once and runs
the Triton kernel (kernels/resample.py, one launch) on CUDA or the native pass
(csrc/resample.cpp) on the CPU. pf_engine.resample_reference holds the same
math in plain torch, the test oracle.
"""

import functools
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from pf_engine import _native
from pf_engine._native import _C

REWARD_KINDS = ("class_logits", "token_logits", "reward")
AGGREGATIONS = ("last", "min", "product", "mean")
SCHEMES = ("systematic", "stratified", "multinomial", "residual")
IMPLEMENTATIONS = ("auto", "triton", "native")
MAX_PARTICLES = 4096  # per problem: the kernel holds a problem in one program


@dataclass(frozen=True, slots=True)
class ResampleParams:
    """How PRM outputs become weights and ancestors (see the module docstring)."""

    reward: str = "class_logits"
    aggregation: str = "last"
    temperature: float = 1.0
    clip: float = 1e-6
    scheme: str = "systematic"
    ess_threshold: float | None = None

    def __post_init__(self):
        for name, value, allowed in (
            ("reward", self.reward, REWARD_KINDS),
            ("aggregation", self.aggregation, AGGREGATIONS),
            ("scheme", self.scheme, SCHEMES),
        ):
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(allowed)}")
        if not (self.temperature > 0 and np.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a positive finite number, got {self.temperature}")
        if not 0 <= self.clip < 0.5:
            raise ValueError(f"clip must be in [0, 0.5), got {self.clip}")
        if self.ess_threshold is not None and not 0 < self.ess_threshold <= 1:
            raise ValueError(f"ess_threshold must be in (0, 1] or None, got {self.ess_threshold}")

    @property
    def threshold(self) -> float:
        """The ESS threshold as the implementations take it: inf resamples always."""
        return float("inf") if self.ess_threshold is None else self.ess_threshold


class ResampleOutput(NamedTuple):
    """Per particle (flat, [num_particles]) unless marked [num_problems]."""

    rewards: torch.Tensor  # float32 newest step reward; NaN where not live
    aggregates: torch.Tensor  # float32 running aggregate after this step
    num_steps: torch.Tensor  # int32 steps folded into the aggregate
    weights: torch.Tensor  # float32 normalized within each problem (before resampling)
    ess: torch.Tensor  # [num_problems] float32
    resampled: torch.Tensor  # [num_problems] bool
    ancestors: torch.Tensor  # int32 global particle index each slot descends from
    next_aggregates: torch.Tensor  # aggregates[ancestors]: the state of the next step
    next_num_steps: torch.Tensor  # num_steps[ancestors]
    next_live: torch.Tensor  # live[ancestors]

    @classmethod
    def empty(cls, num_particles: int, num_problems: int, device, flags=torch.bool) -> "ResampleOutput":
        """Fresh outputs; ``flags`` is the dtype of resampled and next_live (the Triton kernel stores int8)."""

        def per_particle(dtype):
            return torch.empty(num_particles, dtype=dtype, device=device)

        return cls(
            rewards=per_particle(torch.float32), aggregates=per_particle(torch.float32),
            num_steps=per_particle(torch.int32), weights=per_particle(torch.float32),
            ess=torch.empty(num_problems, dtype=torch.float32, device=device),
            resampled=torch.empty(num_problems, dtype=flags, device=device),
            ancestors=per_particle(torch.int32), next_aggregates=per_particle(torch.float32),
            next_num_steps=per_particle(torch.int32), next_live=per_particle(flags),
        )


class ResampleInputs(NamedTuple):
    """One step's validated inputs, contiguous, on one device (see :func:`resample`)."""

    layout: "Layout"
    prm_output: torch.Tensor  # float32 [num_particles, 2] logits, or [num_particles] rewards
    live: torch.Tensor  # bool [num_particles]
    aggregates: torch.Tensor  # float32 [num_particles]
    num_steps: torch.Tensor  # int32 [num_particles]
    uniforms: torch.Tensor | None  # float32 [num_particles], or None: Philox draws
    seed: int
    counter: int
    temperatures: torch.Tensor | None = None  # float32 [num_problems], each problem's own, or None: all 1


class Layout:
    """A validated ``seg_offsets`` and its problems seen as rows of a [num_problems, width] grid,
    on one device. Built once per distinct (offsets, device) and cached (:func:`layout_of`): a
    search calls with the same layout every step. Its tensors are read, never handed out or written.

    Equal-size problems are a free view of the flat batch; ragged ones are gathered and padded.
    """

    def __init__(self, seg: np.ndarray, device: torch.device):
        sizes = np.diff(seg)
        if seg[0] != 0 or (sizes < 0).any():
            raise ValueError("seg_offsets must start at 0 and never decrease")
        if sizes.size and sizes.max() > MAX_PARTICLES:
            raise ValueError(f"a problem has {sizes.max()} particles; at most {MAX_PARTICLES} are supported")
        self.seg = seg
        self.seg_address = seg.ctypes.data  # for the native step; seg lives as long as the layout
        self.num_problems, self.num_particles = len(sizes), int(seg[-1])
        self.width = int(sizes.max(initial=0))
        self.equal = bool((sizes == self.width).all())
        self.seg_device = torch.from_numpy(seg.astype(np.int32)).to(device)
        self.lane = torch.arange(self.width, device=device)
        self.lane64 = self.lane.double()
        self.starts = torch.from_numpy(seg[:-1]).to(device)[:, None]
        if self.equal:
            self.counts = self.width  # [num_problems, 1] where ragged
        else:
            self.counts = torch.from_numpy(sizes).to(device)[:, None]
            self.mask = self.lane < self.counts
            self.index = (self.starts + self.lane).clamp(max=max(self.num_particles - 1, 0))
            self.problem_of = torch.repeat_interleave(torch.arange(self.num_problems, device=device), self.counts[:, 0])

    def rows(self, x: torch.Tensor, fill) -> torch.Tensor:
        if self.equal:
            return x.view(self.num_problems, self.width)
        return x[self.index].masked_fill_(~self.mask, fill)

    def flat(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1) if self.equal else x[self.mask]

    def pad(self, x: torch.Tensor, fill) -> torch.Tensor:
        """Sets the padding lanes of a rows tensor to fill (nothing to do for equal sizes)."""
        return x if self.equal else x.masked_fill_(~self.mask, fill)

    def per_problem_sum(self, x: torch.Tensor) -> torch.Tensor:
        """[num_particles] -> [num_problems] sums."""
        if self.equal:
            return x.view(self.num_problems, self.width).sum(dim=1)
        return torch.zeros(self.num_problems, dtype=x.dtype, device=x.device).index_add_(0, self.problem_of, x)


@functools.lru_cache(maxsize=32)
def _cached_layout(seg_bytes: bytes, device: torch.device) -> Layout:
    return Layout(np.frombuffer(seg_bytes, dtype=np.int64).copy(), device)


def layout_of(seg_offsets, device: torch.device) -> Layout:
    """The (cached) layout of ``seg_offsets`` on ``device``; ValueError if malformed."""
    seg = np.asarray(seg_offsets)
    if seg.ndim != 1 or seg.size < 1 or seg.dtype.kind not in "iu":
        raise ValueError(
            f"seg_offsets must be a 1-D integer array of num_problems + 1 offsets, got {seg.dtype} {seg.shape}")
    return _cached_layout(seg.astype(np.int64, copy=False).tobytes(), device)


def check_inputs(seg_offsets, prm_output, live, aggregates, num_steps, params, uniforms, seed, counter,
                 temperatures=None) -> Layout:
    """Validates shapes, dtypes and devices (of ``temperatures`` the values too); returns the layout
    of seg_offsets."""
    if not 0 <= seed < 2**63 or not 0 <= counter < 2**31:
        raise ValueError(f"seed must be in [0, 2**63) and counter in [0, 2**31), got {seed} and {counter}")
    device = aggregates.device
    layout = layout_of(seg_offsets, device)
    num_particles = layout.num_particles
    expected_prm = (num_particles,) if params.reward == "reward" else (num_particles, 2)
    for name, t, shape, dtype in (
        ("prm_output", prm_output, expected_prm, torch.float32),
        ("live", live, (num_particles,), torch.bool),
        ("aggregates", aggregates, (num_particles,), torch.float32),
        ("num_steps", num_steps, (num_particles,), torch.int32),
        ("uniforms", uniforms, (num_particles,), torch.float32),
        ("temperatures", temperatures, (layout.num_problems,), torch.float32),
    ):
        if t is None:
            continue
        if t.shape != shape or t.dtype != dtype:
            raise ValueError(f"{name} must be {dtype} of shape {list(shape)}, got {t.dtype} {list(t.shape)}")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but aggregates is on {device}")
    if temperatures is not None and temperatures.numel() and not bool(
            ((temperatures > 0) & (temperatures < float("inf"))).all()):
        raise ValueError(f"temperatures must be positive and finite, got {temperatures.tolist()[:10]}")
    return layout


def check_uniform_range(uniforms: torch.Tensor | None) -> None:
    """ValueError unless every uniform lies in [0, 1) (the native pass checks its own in C++)."""
    if uniforms is not None and uniforms.numel():
        lowest, highest = (v.item() for v in torch.aminmax(uniforms))
        if not (lowest >= 0 and highest < 1):
            raise ValueError(f"uniforms must lie in [0, 1), got values from {lowest} to {highest}")


def raise_on_invalid(invalid, prm_output, live, params) -> None:
    """Raises ValueError naming the problems and the first particle whose PRM output is unusable."""
    if not bool(invalid.any()):
        return
    if params.reward == "reward":
        bad = ~((prm_output >= 0) & (prm_output <= 1))
    else:
        bad = ~torch.isfinite(prm_output).all(dim=1)
    bad &= live
    first = int(bad.nonzero()[0, 0])
    problems = invalid.nonzero().flatten().tolist()
    what = "a reward outside [0, 1] or NaN" if params.reward == "reward" else "NaN or inf logits"
    raise ValueError(
        f"PRM output has {what} for {int(bad.sum())} live particles of problems {problems[:10]}; "
        f"first at particle {first}: {prm_output[first].tolist()}"
    )


def resample(
    seg_offsets,
    prm_output: torch.Tensor,
    live: torch.Tensor,
    aggregates: torch.Tensor,
    num_steps: torch.Tensor,
    params: ResampleParams,
    seed: int = 0,
    counter: int = 0,
    uniforms: torch.Tensor | None = None,
    impl: str = "auto",
    temperatures: torch.Tensor | None = None,
) -> ResampleOutput:
    """One particle-filter step for all problems in one call.

    Parameters
    ----------
    seg_offsets : host int array [num_problems + 1]
        Problem ``b`` owns particles ``seg_offsets[b]:seg_offsets[b + 1]`` (at most 4,096).
    prm_output : float32 [num_particles, 2] logits, or [num_particles] rewards
        As ``params.reward`` says; read only where ``live``.
    live : bool [num_particles]
        Particles still being extended; the others keep their aggregate.
    aggregates : float32 [num_particles]
        Running aggregate before this step (any value where ``num_steps`` is 0).
    num_steps : int32 [num_particles]
        Steps folded into ``aggregates``.
    params : ResampleParams
    seed, counter : int
        Philox key and call number; the same pair reproduces the same draws.
    uniforms : float32 [num_particles], optional
        Draws in [0, 1) to use instead of Philox (systematic reads each
        problem's first).
    temperatures : float32 [num_problems], optional
        Each problem's own weight temperature, on top of ``params.temperature`` (entropic
        particle filtering's annealing); positive and finite.
    impl : "auto", "triton" or "native"
        auto: the Triton kernel for CUDA tensors, the native pass for CPU ones.
        triton runs the kernel on any device (on the CPU only under
        ``TRITON_INTERPRET=1``); native takes CPU tensors.

    Raises
    ------
    ValueError
        Malformed inputs, or NaN/inf logits (rewards outside [0, 1]) at a live particle.
    """
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"unknown impl {impl!r}; choose one of {', '.join(IMPLEMENTATIONS)}")
    layout = check_inputs(seg_offsets, prm_output, live, aggregates, num_steps, params, uniforms, seed, counter,
                          temperatures)
    device = aggregates.device
    if impl == "auto":
        impl = _native.resample_impl(device)
    if impl == "native" and device.type != "cpu":
        raise ValueError(f"the native resampling pass takes CPU tensors, got {device}")
    inputs = ResampleInputs(layout, prm_output.contiguous(), live.contiguous(), aggregates.contiguous(),
                            num_steps.contiguous(), None if uniforms is None else uniforms.contiguous(), seed, counter,
                            None if temperatures is None else temperatures.contiguous())
    if impl == "native":
        return _native_step(inputs, params)
    from pf_engine.kernels.resample import fused_resample

    check_uniform_range(inputs.uniforms)
    out = ResampleOutput.empty(layout.num_particles, layout.num_problems, device, flags=torch.int8)
    invalid = torch.zeros(layout.num_problems, dtype=torch.int32, device=device)
    if layout.num_problems:
        fused_resample(inputs, params, out, invalid)
    raise_on_invalid(invalid, inputs.prm_output, inputs.live, params)
    return out._replace(resampled=out.resampled.bool(), next_live=out.next_live.bool())


def _native_step(inputs: ResampleInputs, params: ResampleParams) -> ResampleOutput:
    """The native CPU pass (csrc/resample.cpp) on validated, contiguous CPU tensors."""
    layout = inputs.layout
    out = ResampleOutput.empty(layout.num_particles, layout.num_problems, inputs.aggregates.device)
    invalid = torch.empty(layout.num_problems, dtype=torch.int32)
    num_invalid = _C.fused_resample(
        seg=layout.seg_address, num_problems=layout.num_problems, prm=inputs.prm_output.data_ptr(),
        live=inputs.live.data_ptr(), aggregates=inputs.aggregates.data_ptr(), num_steps=inputs.num_steps.data_ptr(),
        uniforms=0 if inputs.uniforms is None else inputs.uniforms.data_ptr(),
        temperatures=0 if inputs.temperatures is None else inputs.temperatures.data_ptr(), seed=inputs.seed,
        counter=inputs.counter, reward=getattr(_C.RewardKind, params.reward),
        aggregation=getattr(_C.Aggregation, params.aggregation), scheme=getattr(_C.Scheme, params.scheme),
        inv_temperature=1.0 / params.temperature, clip=params.clip, ess_threshold=params.threshold,
        rewards_out=out.rewards.data_ptr(), aggregates_out=out.aggregates.data_ptr(),
        num_steps_out=out.num_steps.data_ptr(), weights_out=out.weights.data_ptr(), ess_out=out.ess.data_ptr(),
        resampled_out=out.resampled.data_ptr(), ancestors_out=out.ancestors.data_ptr(),
        next_aggregates_out=out.next_aggregates.data_ptr(), next_num_steps_out=out.next_num_steps.data_ptr(),
        next_live_out=out.next_live.data_ptr(), invalid_out=invalid.data_ptr(),
    )
    if num_invalid:  # else every count is 0: nothing to look up
        raise_on_invalid(invalid, inputs.prm_output, inputs.live, params)
    return out
