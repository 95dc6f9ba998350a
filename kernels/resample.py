"""Fused particle-filter step: PRM outputs -> step rewards -> aggregates -> weights
-> resampling decision -> ancestors, for every problem of a batch in one launch.

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
- log-weight ``logit(clip(a, clip, 1 - clip)) / temperature``, softmax within the
  problem (the paper's form: weights depend on the aggregate alone, so a problem
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

Uniforms are ``philox_uniform(seed, (counter << 32) + particle)`` (Triton's
``tl.rand``), so a (seed, counter) pair reproduces a call exactly, or are
passed in.

Three implementations, one signature:

- ``fused_resample``: the Triton kernel, one launch (GPU; the interpreter on CPU).
- ``fused_resample_cpu``: one pass of the native extension (csrc/resample.cpp),
  the CPU path: a vectorized torch step costs ~30 ops of microseconds each.
- ``fused_resample_reference``: plain torch, the test oracle. Weights of the
  others match it to rounding; their ancestors match exactly the reference's
  draw from their own weights (``reference_ancestors``).
"""

import functools
import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import triton
import triton.language as tl

from pf_engine._native import _C

REWARD_KINDS = ("class_logits", "token_logits", "reward")
AGGREGATIONS = ("last", "min", "product", "mean")
SCHEMES = ("systematic", "stratified", "multinomial", "residual")
MAX_PARTICLES = 4096


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


# ---------------------------------------------------------------------------
# Triton
# ---------------------------------------------------------------------------


@triton.jit
def _count_le(cdf_ptr, n, points, lane_mask, LOG2_BLOCK: tl.constexpr):
    """For each point, how many of the n non-decreasing values at cdf_ptr are <= it."""
    lo = tl.zeros(points.shape, tl.int32)
    hi = tl.zeros(points.shape, tl.int32) + n
    for _ in tl.static_range(LOG2_BLOCK + 1):
        active = lo < hi
        mid = (lo + hi) // 2
        c = tl.load(cdf_ptr + mid, mask=lane_mask & active, other=0.0)
        right = c <= points
        lo = tl.where(active & right, mid + 1, lo)
        hi = tl.where(active & (c > points), mid, hi)
    return lo


# grid: (num_problems,)
# seg_ptr:      [num_problems + 1] int32 segment offsets
# prm_ptr:      [num_particles, 2] float32 logits, or [num_particles] float32 rewards
# live_ptr:     [num_particles] int8
# agg_ptr:      [num_particles] float32    steps_ptr: [num_particles] int32
# uniforms_ptr: [num_particles] float32 (read when USE_UNIFORMS)
# scratch_ptr:  [num_particles] float64 (cdf for the binary search)
# outputs [num_particles]: reward, agg_out, steps_out, weight, ancestor (int32),
#   next_agg, next_steps, next_live (int8); [num_problems]: ess, resampled (int8), invalid (int32)
@triton.jit
def _fused_resample_kernel(
    seg_ptr, prm_ptr, live_ptr, agg_ptr, steps_ptr, uniforms_ptr, scratch_ptr,
    reward_ptr, agg_out_ptr, steps_out_ptr, weight_ptr, ancestor_ptr,
    next_agg_ptr, next_steps_ptr, next_live_ptr, ess_ptr, resampled_ptr, invalid_ptr,
    seed, rand_base, inv_temperature, clip, ess_threshold,
    REWARD_KIND: tl.constexpr,  # 0 class logits, 1 token-pair logits, 2 rewards
    AGGREGATION: tl.constexpr,  # 0 last, 1 min, 2 product, 3 mean
    SCHEME: tl.constexpr,  # 0 systematic, 1 stratified, 2 multinomial, 3 residual
    USE_UNIFORMS: tl.constexpr,
    BLOCK: tl.constexpr,
    LOG2_BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    start = tl.load(seg_ptr + pid)
    n = tl.load(seg_ptr + pid + 1) - start
    lane = tl.arange(0, BLOCK)
    mask = lane < n
    g = start + lane
    live = (tl.load(live_ptr + g, mask=mask, other=0) != 0) & mask

    # Step reward; a NaN, an inf or a reward outside [0, 1] is counted, never used.
    if REWARD_KIND == 2:
        r = tl.load(prm_ptr + g, mask=live, other=0.5)
        bad = live & ~((r >= 0.0) & (r <= 1.0))
    else:
        x0 = tl.load(prm_ptr + 2 * g, mask=live, other=0.0)
        x1 = tl.load(prm_ptr + 2 * g + 1, mask=live, other=0.0)
        bad = live & ~((tl.abs(x0) < float("inf")) & (tl.abs(x1) < float("inf")))
        if REWARD_KIND == 0:
            diff = x1 - x0
        else:
            diff = x0 - x1
        r = 1.0 / (1.0 + tl.exp(-diff))
    tl.store(invalid_ptr + pid, tl.sum(bad.to(tl.int32), axis=0))
    r = tl.where(bad, 0.5, r)
    tl.store(reward_ptr + g, tl.where(live, r, float("nan")), mask=mask)

    # Running aggregate.
    prev = tl.load(agg_ptr + g, mask=mask, other=0.0)
    steps = tl.load(steps_ptr + g, mask=mask, other=0)
    first = steps == 0
    if AGGREGATION == 0:
        new = r
    elif AGGREGATION == 1:
        new = tl.where(first, r, tl.minimum(prev, r))
    elif AGGREGATION == 2:
        new = tl.where(first, r, prev * r)
    else:
        new = prev + (r - prev) / (steps + 1).to(tl.float32)
    agg = tl.where(live, new, prev)
    steps = tl.where(live, steps + 1, steps)
    tl.store(agg_out_ptr + g, agg, mask=mask)
    tl.store(steps_out_ptr + g, steps, mask=mask)

    # Weights: softmax of logit(clip(agg)) / temperature within the problem.
    a = tl.minimum(tl.maximum(agg, clip), 1.0 - clip)
    logw = (tl.log(a) - tl.log(1.0 - a)) * inv_temperature
    logw = tl.where(mask, logw, float("-inf"))
    top = tl.max(logw, axis=0)
    if top == float("inf"):
        shifted = tl.where(logw == top, 0.0, float("-inf"))
    elif top == float("-inf"):
        shifted = tl.where(mask, 0.0, float("-inf"))
    else:
        shifted = logw - top
    e = tl.where(mask, tl.exp(shifted), 0.0)
    w = tl.where(mask, e / tl.sum(e, axis=0), 0.0)
    tl.store(weight_ptr + g, w, mask=mask)
    ess = tl.where(n > 0, 1.0 / tl.sum(w * w, axis=0), 0.0)
    tl.store(ess_ptr + pid, ess)
    # Without a threshold (inf) every problem resamples, empty ones too (inf * 0 is NaN).
    do_resample = (ess < ess_threshold * n.to(tl.float32)) | (ess_threshold == float("inf"))
    tl.store(resampled_ptr + pid, do_resample.to(tl.int8))

    # Points in [0, total) and the cdf they are searched in.
    if USE_UNIFORMS:
        u = tl.load(uniforms_ptr + g, mask=mask, other=0.0)
        u0 = tl.load(uniforms_ptr + start, mask=n > 0, other=0.0)
    else:
        u = tl.rand(seed, g.to(tl.int64) + rand_base)
        u0 = tl.rand(seed, start.to(tl.int64) + rand_base)
    # Points lie in [0, total), total the cdf's last value: with uniforms in
    # [0, 1) no point reaches it, so zero-weight particles are never chosen.
    if SCHEME == 3:
        nw = w * n.to(tl.float32)
        copies = tl.floor(nw)
        num_fixed = tl.sum(copies, axis=0)
        tl.store(scratch_ptr + g, tl.cumsum(copies.to(tl.float64), axis=0), mask=mask)
        tl.debug_barrier()
        fixed = _count_le(scratch_ptr + start, n, lane.to(tl.float64), mask, LOG2_BLOCK)
        tl.debug_barrier()
        cdf = tl.cumsum((nw - copies).to(tl.float64), axis=0)
        points = u.to(tl.float64) * tl.max(cdf, axis=0)
    else:
        cdf = tl.cumsum(w.to(tl.float64), axis=0)
        total = tl.max(cdf, axis=0)
        if SCHEME == 0:
            points = (lane.to(tl.float64) + u0.to(tl.float64)) * (total / n.to(tl.float64))
        elif SCHEME == 1:
            points = (lane.to(tl.float64) + u.to(tl.float64)) * (total / n.to(tl.float64))
        else:
            points = u.to(tl.float64) * total
    tl.store(scratch_ptr + g, cdf, mask=mask)
    tl.debug_barrier()
    chosen = tl.minimum(_count_le(scratch_ptr + start, n, points, mask, LOG2_BLOCK), n - 1)
    if SCHEME == 3:
        chosen = tl.where(lane.to(tl.float32) < num_fixed, fixed, chosen)
    chosen = tl.where(do_resample, chosen, lane)
    tl.store(ancestor_ptr + g, start + chosen, mask=mask)

    # The next step's state: this step's state of each slot's ancestor.
    tl.store(next_live_ptr + g, live.to(tl.int8), mask=mask)
    tl.debug_barrier()
    src = start + chosen
    tl.store(next_agg_ptr + g, tl.load(agg_out_ptr + src, mask=mask), mask=mask)
    tl.store(next_steps_ptr + g, tl.load(steps_out_ptr + src, mask=mask), mask=mask)
    next_live = tl.load(next_live_ptr + src, mask=mask)
    tl.debug_barrier()
    tl.store(next_live_ptr + g, next_live, mask=mask)


# ---------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------


class _Layout:
    """A validated ``seg_offsets`` and its problems seen as rows of a [num_problems, width] grid,
    on one device. Built once per distinct (offsets, device) and cached: a search calls with
    the same layout every step. Its tensors are read, never handed out or written.

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
def _layout(seg_bytes: bytes, device: torch.device) -> _Layout:
    return _Layout(np.frombuffer(seg_bytes, dtype=np.int64).copy(), device)


def _check_inputs(seg_offsets, prm_output, live, aggregates, num_steps, params, uniforms, seed, counter) -> _Layout:
    """Validates shapes, dtypes and devices (not the values); returns the layout of seg_offsets."""
    if not 0 <= seed < 2**63 or not 0 <= counter < 2**31:
        raise ValueError(f"seed must be in [0, 2**63) and counter in [0, 2**31), got {seed} and {counter}")
    seg = np.asarray(seg_offsets)
    if seg.ndim != 1 or seg.size < 1 or seg.dtype.kind not in "iu":
        raise ValueError(f"seg_offsets must be a 1-D integer array of num_problems + 1 offsets, got {seg.dtype} {seg.shape}")
    device = aggregates.device
    layout = _layout(seg.astype(np.int64, copy=False).tobytes(), device)
    num_particles = layout.num_particles
    expected_prm = (num_particles,) if params.reward == "reward" else (num_particles, 2)
    for name, t, shape, dtype in (
        ("prm_output", prm_output, expected_prm, torch.float32),
        ("live", live, (num_particles,), torch.bool),
        ("aggregates", aggregates, (num_particles,), torch.float32),
        ("num_steps", num_steps, (num_particles,), torch.int32),
        ("uniforms", uniforms, (num_particles,), torch.float32),
    ):
        if t is None:
            continue
        if t.shape != shape or t.dtype != dtype:
            raise ValueError(f"{name} must be {dtype} of shape {list(shape)}, got {t.dtype} {list(t.shape)}")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but aggregates is on {device}")
    return layout


def _check_uniform_range(uniforms: torch.Tensor | None) -> None:
    if uniforms is not None and uniforms.numel():
        lowest, highest = (v.item() for v in torch.aminmax(uniforms))
        if not (lowest >= 0 and highest < 1):
            raise ValueError(f"uniforms must lie in [0, 1), got values from {lowest} to {highest}")


def _raise_on_invalid(invalid, prm_output, live, params):
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


def _empty_output(num_particles, num_problems, device, flags=torch.int8):
    """Fresh outputs; ``flags`` is the dtype of resampled and next_live (the Triton kernel stores int8)."""
    f32 = lambda: torch.empty(num_particles, dtype=torch.float32, device=device)  # noqa: E731
    i32 = lambda: torch.empty(num_particles, dtype=torch.int32, device=device)  # noqa: E731
    return ResampleOutput(
        rewards=f32(), aggregates=f32(), num_steps=i32(), weights=f32(),
        ess=torch.empty(num_problems, dtype=torch.float32, device=device),
        resampled=torch.empty(num_problems, dtype=flags, device=device),
        ancestors=i32(), next_aggregates=f32(), next_num_steps=i32(),
        next_live=torch.empty(num_particles, dtype=flags, device=device),
    )


def fused_resample(
    seg_offsets,
    prm_output: torch.Tensor,
    live: torch.Tensor,
    aggregates: torch.Tensor,
    num_steps: torch.Tensor,
    params: ResampleParams,
    seed: int = 0,
    counter: int = 0,
    uniforms: torch.Tensor | None = None,
) -> ResampleOutput:
    """One particle-filter step for all problems in one Triton launch.

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

    Raises
    ------
    ValueError
        Malformed inputs, or NaN/inf logits (rewards outside [0, 1]) at a live particle.
    """
    layout = _check_inputs(seg_offsets, prm_output, live, aggregates, num_steps, params, uniforms, seed, counter)
    _check_uniform_range(uniforms)
    device = aggregates.device
    num_problems, num_particles = layout.num_problems, layout.num_particles
    out = _empty_output(num_particles, num_problems, device)
    if num_problems == 0:
        return out._replace(resampled=out.resampled.bool(), next_live=out.next_live.bool())
    block = max(16, triton.next_power_of_2(max(layout.width, 1)))
    scratch = torch.empty(max(num_particles, 1), dtype=torch.float64, device=device)
    threshold = float("inf") if params.ess_threshold is None else params.ess_threshold
    invalid = torch.empty(num_problems, dtype=torch.int32, device=device)
    _fused_resample_kernel[(num_problems,)](
        layout.seg_device, prm_output.contiguous(), live.to(torch.int8), aggregates.contiguous(), num_steps.contiguous(),
        aggregates if uniforms is None else uniforms,  # not read without uniforms
        scratch,
        out.rewards, out.aggregates, out.num_steps, out.weights, out.ancestors,
        out.next_aggregates, out.next_num_steps, out.next_live, out.ess, out.resampled, invalid,
        seed, counter << 32, 1.0 / params.temperature, params.clip, threshold,
        REWARD_KIND=REWARD_KINDS.index(params.reward),
        AGGREGATION=AGGREGATIONS.index(params.aggregation),
        SCHEME=SCHEMES.index(params.scheme),
        USE_UNIFORMS=uniforms is not None,
        BLOCK=block,
        LOG2_BLOCK=block.bit_length() - 1,
    )
    _raise_on_invalid(invalid, prm_output, live, params)
    return out._replace(resampled=out.resampled.bool(), next_live=out.next_live.bool())


def fused_resample_cpu(
    seg_offsets,
    prm_output: torch.Tensor,
    live: torch.Tensor,
    aggregates: torch.Tensor,
    num_steps: torch.Tensor,
    params: ResampleParams,
    seed: int = 0,
    counter: int = 0,
    uniforms: torch.Tensor | None = None,
) -> ResampleOutput:
    """:func:`fused_resample` for CPU tensors: one pass of the native extension over all problems.

    Same arguments, math and draws as the Triton kernel (csrc/resample.cpp); the CPU path.
    """
    layout = _check_inputs(seg_offsets, prm_output, live, aggregates, num_steps, params, uniforms, seed, counter)
    if aggregates.device.type != "cpu":
        raise ValueError(f"fused_resample_cpu takes CPU tensors, got {aggregates.device}; use fused_resample")
    out = _empty_output(layout.num_particles, layout.num_problems, aggregates.device, flags=torch.bool)
    invalid = torch.empty(layout.num_problems, dtype=torch.int32)
    prm_output, live, aggregates, num_steps = (t.contiguous() for t in (prm_output, live, aggregates, num_steps))
    threshold = float("inf") if params.ess_threshold is None else params.ess_threshold
    num_invalid = _C.fused_resample(
        layout.seg_address, layout.num_problems,
        prm_output.data_ptr(), live.data_ptr(), aggregates.data_ptr(), num_steps.data_ptr(),
        0 if uniforms is None else uniforms.contiguous().data_ptr(),
        *(t.data_ptr() for t in out), invalid.data_ptr(),
        seed, counter, REWARD_KINDS.index(params.reward), AGGREGATIONS.index(params.aggregation),
        SCHEMES.index(params.scheme), 1.0 / params.temperature, params.clip, threshold,
    )
    if num_invalid:
        _raise_on_invalid(invalid, prm_output, live, params)
    return out


# ---------------------------------------------------------------------------
# Torch reference
# ---------------------------------------------------------------------------

_M32 = 0xFFFFFFFF


def philox_uniform(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """Triton's ``tl.rand(seed, offsets)`` (Philox4x32-10), bit for bit: natively for CPU
    offsets (the torch replica costs ~100 small ops), else :func:`philox_uniform_reference`.

    offsets: int64 tensor; returns float32 in [0, 1) of the same shape.
    """
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    if offsets.device.type != "cpu":
        return philox_uniform_reference(seed, offsets)
    offsets = offsets.to(torch.int64).contiguous()
    out = torch.empty(offsets.shape, dtype=torch.float32)
    _C.philox_uniforms(seed, offsets.data_ptr(), offsets.numel(), out.data_ptr())
    return out


def philox_uniform_reference(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """Bit-exact torch replica of Triton's ``tl.rand(seed, offsets)`` (Philox4x32-10).

    offsets: int64 tensor; returns float32 in [0, 1) of the same shape.
    """
    c0, c1 = offsets & _M32, (offsets >> 32) & _M32
    c2, c3 = torch.zeros_like(c0), torch.zeros_like(c0)
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    for _ in range(10):
        # 32 x 32-bit products wrap in int64, but their low 64 bits stay exact.
        pa, pb = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = ((pb >> 32) & _M32) ^ c1 ^ k0, pb & _M32, ((pa >> 32) & _M32) ^ c3 ^ k1, pa & _M32
        k0, k1 = (k0 + 0x9E3779B9) & _M32, (k1 + 0xBB67AE85) & _M32
    x = torch.where(c0 >= 2**31, c0 - 2**32, c0)  # as int32
    x = torch.where(x < 0, ~x, x)
    return x.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32)


def _draw(rows: _Layout, w: torch.Tensor, do_resample: torch.Tensor, params: ResampleParams,
          uniforms: torch.Tensor | None, seed: int, counter: int) -> torch.Tensor:
    """int64 [num_particles] global ancestors drawn from the rows of normalized weights
    ``w`` (padding lanes 0); identity for problems that do not resample."""
    # Points in [0, total) searched in the cdf; see the kernel.
    if uniforms is None:
        uniforms = philox_uniform_reference(seed, torch.arange(rows.num_particles, device=w.device) + (counter << 32))
    if params.scheme == "residual":
        nw = w * rows.counts
        copies = torch.floor(nw)
        num_fixed = copies.sum(dim=1, keepdim=True)
        cumcopies = rows.pad(torch.cumsum(copies, dim=1, dtype=torch.float64), float("inf"))
        fixed = torch.searchsorted(cumcopies, rows.lane64.expand_as(cumcopies).contiguous(), right=True)
        cdf = torch.cumsum(nw - copies, dim=1, dtype=torch.float64)
        points = rows.rows(uniforms, 0.0) * cdf[:, -1:]
    else:
        cdf = torch.cumsum(w, dim=1, dtype=torch.float64)
        total = cdf[:, -1:]
        if params.scheme == "systematic":
            points = (rows.lane64 + rows.rows(uniforms, 0.0)[:, :1]) * (total / rows.counts)
        elif params.scheme == "stratified":
            points = (rows.lane64 + rows.rows(uniforms, 0.0)) * (total / rows.counts)
        else:
            points = rows.rows(uniforms, 0.0) * total
    chosen = torch.searchsorted(rows.pad(cdf, float("inf")), points, right=True)
    if params.scheme == "residual":
        chosen = torch.where(rows.lane < num_fixed, fixed, chosen)
    if params.ess_threshold is not None:
        chosen = torch.where(do_resample[:, None], chosen, rows.lane)
    return rows.flat(chosen + rows.starts)


def reference_ancestors(seg_offsets, weights: torch.Tensor, resampled: torch.Tensor, params: ResampleParams,
                        seed: int = 0, counter: int = 0, uniforms: torch.Tensor | None = None) -> torch.Tensor:
    """The reference's draw from given weights: int32 ancestors, as :func:`fused_resample_reference`
    draws them from its own weights.

    An implementation's weights equal the reference's only up to rounding, and a point
    that falls within that rounding of a cdf step may pick the neighbouring particle;
    so implementations are held to exactly these ancestors of their own weights.
    """
    rows = _layout(np.asarray(seg_offsets).astype(np.int64).tobytes(), weights.device)
    w = rows.pad(rows.rows(weights, 0.0), 0.0)
    return _draw(rows, w, resampled, params, uniforms, seed, counter).int()


def fused_resample_reference(
    seg_offsets,
    prm_output: torch.Tensor,
    live: torch.Tensor,
    aggregates: torch.Tensor,
    num_steps: torch.Tensor,
    params: ResampleParams,
    seed: int = 0,
    counter: int = 0,
    uniforms: torch.Tensor | None = None,
) -> ResampleOutput:
    """Plain-torch :func:`fused_resample`: same arguments, same math, same draws; the test oracle."""
    rows = _check_inputs(seg_offsets, prm_output, live, aggregates, num_steps, params, uniforms, seed, counter)
    _check_uniform_range(uniforms)
    device = aggregates.device

    # Step reward and running aggregate, flat. One sum tells whether every value is usable;
    # only if not is it worth finding out which (finished particles may hold anything).
    if params.reward == "reward":
        r = prm_output
        lowest, highest = (v.item() for v in torch.aminmax(r)) if r.numel() else (0.0, 0.0)
        usable = lowest >= 0 and highest <= 1
        bad = lambda: ~((r >= 0) & (r <= 1))  # noqa: E731
    else:
        diff = torch.diff(prm_output, dim=1).view(-1)  # x1 - x0
        r = torch.sigmoid(diff if params.reward == "class_logits" else diff.neg_())
        usable = math.isfinite(diff.sum().item())  # false too if the sum overflows
        bad = lambda: ~torch.isfinite(prm_output).all(dim=1)  # noqa: E731
    if not usable:
        _raise_on_invalid(rows.per_problem_sum((bad() & live).int()), prm_output, live, params)
    prev = aggregates
    new = {
        "last": lambda: r,
        "min": lambda: torch.where(num_steps == 0, r, torch.minimum(prev, r)),
        "product": lambda: torch.where(num_steps == 0, r, prev * r),
        "mean": lambda: prev + (r - prev) / (num_steps + 1),
    }[params.aggregation]()
    agg = torch.where(live, new, prev)
    steps = num_steps + live

    # Weights, per problem row.
    logw = torch.logit(agg, eps=params.clip if params.clip > 0 else None)
    if params.temperature != 1.0:
        logw = logw * (1.0 / params.temperature)
    logw = rows.rows(logw, float("-inf"))
    if params.clip > 0:  # every log-weight is finite
        w = torch.softmax(logw, dim=1)
    else:
        top = logw.amax(dim=1, keepdim=True)
        neg_inf = torch.tensor(float("-inf"), device=device)
        shifted = torch.where(
            top == float("inf"),
            torch.where(logw == top, 0.0, neg_inf),
            torch.where(top == float("-inf"), 0.0, logw - top),
        )
        w = torch.softmax(rows.pad(shifted, float("-inf")), dim=1)
    w = rows.pad(w, 0.0)  # rows of empty problems are NaN
    ess = torch.linalg.vecdot(w, w).reciprocal_()
    counts = rows.counts if rows.equal else rows.counts.flatten()
    if not rows.equal:
        ess = torch.where(counts > 0, ess, 0.0)
    if params.ess_threshold is None:
        do_resample = torch.ones(rows.num_problems, dtype=torch.bool, device=device)
    else:
        do_resample = ess < params.ess_threshold * counts

    ancestors = _draw(rows, w, do_resample, params, uniforms, seed, counter)

    return ResampleOutput(
        rewards=torch.where(live, r, float("nan")),
        aggregates=agg,
        num_steps=steps,
        weights=rows.flat(w),
        ess=ess,
        resampled=do_resample,
        ancestors=ancestors.int(),
        next_aggregates=agg.index_select(0, ancestors),
        next_num_steps=steps.index_select(0, ancestors),
        next_live=live.index_select(0, ancestors),
    )
