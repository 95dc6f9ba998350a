"""The fused particle-filter step as one Triton launch for all problems (grid: one program
per problem). The math, the layout and the one entry point that validates and
dispatches are in pf_engine/resample.py; call :func:`pf_engine.resample.resample`.
"""

import torch
import triton
import triton.language as tl

# Modes, as pf_engine.resample names them (and the native pass numbers them).
_REWARD_CLASS_LOGITS = tl.constexpr(0)  # [bad, good] logits
_REWARD_TOKEN_LOGITS = tl.constexpr(1)  # [good, bad] logits
_REWARD_GIVEN = tl.constexpr(2)  # a reward in [0, 1]
_AGGREGATION_LAST = tl.constexpr(0)
_AGGREGATION_MIN = tl.constexpr(1)
_AGGREGATION_PRODUCT = tl.constexpr(2)
_AGGREGATION_MEAN = tl.constexpr(3)
_SCHEME_SYSTEMATIC = tl.constexpr(0)
_SCHEME_STRATIFIED = tl.constexpr(1)
_SCHEME_MULTINOMIAL = tl.constexpr(2)
_SCHEME_RESIDUAL = tl.constexpr(3)
REWARD_CODES = {"class_logits": _REWARD_CLASS_LOGITS, "token_logits": _REWARD_TOKEN_LOGITS, "reward": _REWARD_GIVEN}
AGGREGATION_CODES = {"last": _AGGREGATION_LAST, "min": _AGGREGATION_MIN, "product": _AGGREGATION_PRODUCT,
                     "mean": _AGGREGATION_MEAN}
SCHEME_CODES = {"systematic": _SCHEME_SYSTEMATIC, "stratified": _SCHEME_STRATIFIED,
                "multinomial": _SCHEME_MULTINOMIAL, "residual": _SCHEME_RESIDUAL}
# Programs have at least 16 lanes, so problems of 1 to 16 particles share one compiled kernel.
_MIN_BLOCK = 16


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
# temp_ptr:     [num_problems] float32 each problem's own weight temperature (read when USE_TEMPERATURES)
# scratch_ptr:  [num_particles] float64 (cdf for the binary search)
# outputs [num_particles]: reward, agg_out, steps_out, weight, ancestor (int32),
#   next_agg, next_steps, next_live (int8); [num_problems]: ess, resampled (int8), invalid (int32)
@triton.jit
def _fused_resample_kernel(
    seg_ptr, prm_ptr, live_ptr, agg_ptr, steps_ptr, uniforms_ptr, temp_ptr, scratch_ptr,
    reward_ptr, agg_out_ptr, steps_out_ptr, weight_ptr, ancestor_ptr,
    next_agg_ptr, next_steps_ptr, next_live_ptr, ess_ptr, resampled_ptr, invalid_ptr,
    seed, rand_base, inv_temperature, clip, ess_threshold,
    REWARD_KIND: tl.constexpr,  # _REWARD_*
    AGGREGATION: tl.constexpr,  # _AGGREGATION_*
    SCHEME: tl.constexpr,  # _SCHEME_*
    USE_UNIFORMS: tl.constexpr,
    USE_TEMPERATURES: tl.constexpr,
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
    if REWARD_KIND == _REWARD_GIVEN:
        r = tl.load(prm_ptr + g, mask=live, other=0.5)
        bad = live & ~((r >= 0.0) & (r <= 1.0))
    else:
        x0 = tl.load(prm_ptr + 2 * g, mask=live, other=0.0)
        x1 = tl.load(prm_ptr + 2 * g + 1, mask=live, other=0.0)
        bad = live & ~((tl.abs(x0) < float("inf")) & (tl.abs(x1) < float("inf")))
        if REWARD_KIND == _REWARD_CLASS_LOGITS:
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
    if AGGREGATION == _AGGREGATION_LAST:
        new = r
    elif AGGREGATION == _AGGREGATION_MIN:
        new = tl.where(first, r, tl.minimum(prev, r))
    elif AGGREGATION == _AGGREGATION_PRODUCT:
        new = tl.where(first, r, prev * r)
    else:
        new = prev + (r - prev) / (steps + 1).to(tl.float32)
    agg = tl.where(live, new, prev)
    steps = tl.where(live, steps + 1, steps)
    tl.store(agg_out_ptr + g, agg, mask=mask)
    tl.store(steps_out_ptr + g, steps, mask=mask)

    # Weights: softmax of logit(clip(agg)) / temperature within the problem.
    if USE_TEMPERATURES:
        inv_temperature = inv_temperature / tl.load(temp_ptr + pid)
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
    if SCHEME == _SCHEME_RESIDUAL:
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
        if SCHEME == _SCHEME_SYSTEMATIC:
            points = (lane.to(tl.float64) + u0.to(tl.float64)) * (total / n.to(tl.float64))
        elif SCHEME == _SCHEME_STRATIFIED:
            points = (lane.to(tl.float64) + u.to(tl.float64)) * (total / n.to(tl.float64))
        else:
            points = u.to(tl.float64) * total
    tl.store(scratch_ptr + g, cdf, mask=mask)
    tl.debug_barrier()
    chosen = tl.minimum(_count_le(scratch_ptr + start, n, points, mask, LOG2_BLOCK), n - 1)
    if SCHEME == _SCHEME_RESIDUAL:
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


def fused_resample(inputs, params, out, invalid) -> None:
    """Launch the kernel on validated inputs (``pf_engine.resample.ResampleInputs``), writing
    ``out`` (a ``ResampleOutput`` with int8 flags) and ``invalid`` (int32 [num_problems]).

    Checks what the launch itself relies on: every tensor on one device and contiguous.
    """
    layout = inputs.layout
    tensors = [inputs.prm_output, inputs.live, inputs.aggregates, inputs.num_steps, *out, invalid]
    tensors += [t for t in (inputs.uniforms, inputs.temperatures) if t is not None]
    device = inputs.aggregates.device
    for t in tensors:
        if t.device != device or not t.is_contiguous():
            raise ValueError(f"fused_resample needs contiguous tensors on {device}, got one on {t.device}")
    if out.resampled.dtype != torch.int8 or out.next_live.dtype != torch.int8:
        raise ValueError("fused_resample stores resampled and next_live as int8")
    block = max(_MIN_BLOCK, triton.next_power_of_2(max(layout.width, 1)))
    scratch = inputs.aggregates.new_empty(max(layout.num_particles, 1), dtype=torch.float64)
    _fused_resample_kernel[(layout.num_problems,)](
        layout.seg_device, inputs.prm_output, inputs.live.view(torch.int8), inputs.aggregates, inputs.num_steps,
        inputs.aggregates if inputs.uniforms is None else inputs.uniforms,  # not read without uniforms
        inputs.aggregates if inputs.temperatures is None else inputs.temperatures,  # nor this without temperatures
        scratch,
        out.rewards, out.aggregates, out.num_steps, out.weights, out.ancestors,
        out.next_aggregates, out.next_num_steps, out.next_live, out.ess, out.resampled, invalid,
        inputs.seed, inputs.counter << 32, 1.0 / params.temperature, params.clip, params.threshold,
        REWARD_KIND=REWARD_CODES[params.reward].value,
        AGGREGATION=AGGREGATION_CODES[params.aggregation].value,
        SCHEME=SCHEME_CODES[params.scheme].value,
        USE_UNIFORMS=inputs.uniforms is not None,
        USE_TEMPERATURES=inputs.temperatures is not None,
        BLOCK=block,
        LOG2_BLOCK=block.bit_length() - 1,
    )
