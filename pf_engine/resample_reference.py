"""The fused resampling step in plain torch: the test oracle.

Same arguments, math and draws as :func:`pf_engine.resample.resample` (whose
module docstring spells the math out). The Triton kernel's and the native
pass's weights match it to fp32 rounding; their ancestors match exactly this
reference's draw from their own weights (:func:`reference_ancestors`).
"""

import math

import torch

from pf_engine.philox import philox_uniform_reference
from pf_engine.resample import (
    Layout,
    ResampleOutput,
    ResampleParams,
    check_inputs,
    check_uniform_range,
    layout_of,
    raise_on_invalid,
)


def _draw(rows: Layout, w: torch.Tensor, do_resample: torch.Tensor, params: ResampleParams,
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
    rows = layout_of(seg_offsets, weights.device)
    w = rows.pad(rows.rows(weights, 0.0), 0.0)
    return _draw(rows, w, resampled, params, uniforms, seed, counter).int()


def _step_rewards(rows: Layout, prm_output: torch.Tensor, live: torch.Tensor, params: ResampleParams) -> torch.Tensor:
    """The step reward of every particle, flat; ValueError naming a live particle whose reward is unusable.

    One sum tells whether every value is usable; only if not is it worth finding out which
    (finished particles may hold anything)."""
    if params.reward == "reward":
        r = prm_output
        lowest, highest = (v.item() for v in torch.aminmax(r)) if r.numel() else (0.0, 0.0)
        usable = lowest >= 0 and highest <= 1

        def bad():
            return ~((r >= 0) & (r <= 1))

    else:
        diff = torch.diff(prm_output, dim=1).view(-1)  # x1 - x0
        r = torch.sigmoid(diff if params.reward == "class_logits" else diff.neg_())
        usable = math.isfinite(diff.sum().item())  # false too if the sum overflows

        def bad():
            return ~torch.isfinite(prm_output).all(dim=1)

    if not usable:
        raise_on_invalid(rows.per_problem_sum((bad() & live).int()), prm_output, live, params)
    return r


def _aggregate(r: torch.Tensor, prev: torch.Tensor, num_steps: torch.Tensor, params: ResampleParams) -> torch.Tensor:
    """The running aggregate with step reward ``r`` folded in (the caller keeps ``prev`` where not live)."""
    return {
        "last": lambda: r,
        "min": lambda: torch.where(num_steps == 0, r, torch.minimum(prev, r)),
        "product": lambda: torch.where(num_steps == 0, r, prev * r),
        "mean": lambda: prev + (r - prev) / (num_steps + 1),
    }[params.aggregation]()


def _weights(rows: Layout, agg: torch.Tensor, params: ResampleParams,
             temperatures: torch.Tensor | None) -> torch.Tensor:
    """Normalized weights per problem row, [num_problems, width] (padding lanes 0)."""
    logw = rows.rows(torch.logit(agg, eps=params.clip if params.clip > 0 else None), float("-inf"))
    if temperatures is not None:  # each problem's 1 / (temperature * t_b), in float32 as the implementations
        inv = torch.tensor(1.0 / params.temperature, dtype=torch.float32, device=agg.device) / temperatures
        logw = logw * inv[:, None]
    elif params.temperature != 1.0:
        logw = logw * (1.0 / params.temperature)
    if params.clip > 0:  # every log-weight is finite
        w = torch.softmax(logw, dim=1)
    else:
        top = logw.amax(dim=1, keepdim=True)
        neg_inf = torch.tensor(float("-inf"), device=agg.device)
        shifted = torch.where(
            top == float("inf"),
            torch.where(logw == top, 0.0, neg_inf),
            torch.where(top == float("-inf"), 0.0, logw - top),
        )
        w = torch.softmax(rows.pad(shifted, float("-inf")), dim=1)
    return rows.pad(w, 0.0)  # rows of empty problems are NaN


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
    temperatures: torch.Tensor | None = None,
) -> ResampleOutput:
    """Plain-torch :func:`pf_engine.resample.resample`: same arguments, same math, same draws."""
    rows = check_inputs(seg_offsets, prm_output, live, aggregates, num_steps, params, uniforms, seed, counter,
                        temperatures)
    check_uniform_range(uniforms)
    device = aggregates.device

    r = _step_rewards(rows, prm_output, live, params)
    agg = torch.where(live, _aggregate(r, aggregates, num_steps, params), aggregates)
    steps = num_steps + live
    w = _weights(rows, agg, params, temperatures)
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
