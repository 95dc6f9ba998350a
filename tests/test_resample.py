"""pf_engine.resample: the Triton kernel and the native CPU step against the torch
reference, the math by hand, the statistics of every scheme, and the errors.

The Triton interpreter costs ~25 ms per program (one per problem): kernel runs
keep problems few; many-draw statistics also run on the native step and the
reference.
"""

import functools
import itertools
import math

import numpy as np
import pytest
import torch

from pf_engine.philox import philox_uniform, philox_uniform_reference
from pf_engine.resample import AGGREGATIONS, REWARD_KINDS, SCHEMES, ResampleOutput, ResampleParams, resample
from pf_engine.resample_reference import fused_resample_reference, reference_ancestors

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PARTICLE_COUNTS = [1, 7, 64, 1000]  # one problem of each size, in one launch
PROBLEM_COUNTS = [1, 3, 9]


def native(*args, **kwargs):
    """The native CPU step on the test's inputs, wherever they live; outputs on DEVICE."""

    def cpu(x):
        return x.cpu() if isinstance(x, torch.Tensor) else x

    out = resample(*map(cpu, args), **{k: cpu(v) for k, v in kwargs.items()}, impl="native")
    return ResampleOutput(*(t.to(DEVICE) for t in out))


fused_resample = functools.partial(resample, impl="triton")  # the Triton kernel, under the interpreter on a CPU
FUSED = [fused_resample, native]  # held to the reference
IMPLS = FUSED + [fused_resample_reference]


def make_inputs(counts, reward="class_logits", seed=0, finished=0.2):
    gen = torch.Generator().manual_seed(seed)
    seg = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    p = int(seg[-1])
    prm = torch.rand(p, generator=gen) if reward == "reward" else 3 * torch.randn(p, 2, generator=gen)
    live = torch.rand(p, generator=gen) >= finished
    aggregates = torch.rand(p, generator=gen)
    num_steps = torch.randint(0, 4, (p,), generator=gen, dtype=torch.int32)
    return seg, prm.to(DEVICE), live.to(DEVICE), aggregates.to(DEVICE), num_steps.to(DEVICE)


def assert_same(out, ref, inputs, params, **draws):
    """``out`` equals the reference ``ref`` of the same inputs: its weights to fp32
    rounding, its ancestors exactly as the reference draws them from those weights,
    and its next-step state exactly as gathered at its ancestors."""
    def exact(name, a, b):
        a, b = a.cpu(), b.cpu()
        diff = (a != b).nonzero().flatten()
        assert len(diff) == 0, f"{name}: {len(diff)} of {a.numel()} differ, first at {diff[:5].tolist()}"

    for name in ("resampled", "num_steps"):
        exact(name, getattr(out, name), getattr(ref, name))
    for name in ("rewards", "aggregates", "weights", "ess"):
        torch.testing.assert_close(getattr(out, name), getattr(ref, name), rtol=1e-5, atol=1e-6, equal_nan=True)
    exact("ancestors", out.ancestors, reference_ancestors(inputs[0], out.weights, out.resampled, params, **draws))
    src = out.ancestors.long()
    exact("next_aggregates", out.next_aggregates, out.aggregates[src])
    exact("next_num_steps", out.next_num_steps, out.num_steps[src])
    exact("next_live", out.next_live, inputs[2][src])


@pytest.mark.parametrize("impl", FUSED)
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_fused_equals_reference_every_scheme_and_aggregation(impl, scheme, aggregation):
    inputs = make_inputs(PARTICLE_COUNTS, seed=SCHEMES.index(scheme))
    params = ResampleParams(aggregation=aggregation, scheme=scheme, temperature=0.7)
    draws = dict(seed=11, counter=3)
    expected = fused_resample_reference(*inputs, params, **draws)
    assert_same(impl(*inputs, params, **draws), expected, inputs, params, **draws)


@pytest.mark.parametrize("impl", FUSED)
@pytest.mark.parametrize("reward", REWARD_KINDS)
@pytest.mark.parametrize("num_problems", PROBLEM_COUNTS)
def test_fused_equals_reference_every_reward_kind(impl, reward, num_problems):
    counts = np.random.default_rng(num_problems).integers(1, 40, size=num_problems)
    inputs = make_inputs(counts, reward=reward, seed=num_problems)
    params = ResampleParams(reward=reward, aggregation="product", scheme="residual")
    expected = fused_resample_reference(*inputs, params, seed=5)
    assert_same(impl(*inputs, params, seed=5), expected, inputs, params, seed=5)


# Many configurations at once, where it is cheap: the native step on every
# temperature, clip, threshold and layout (empty problems, equal sizes, 1 to 1000).
@pytest.mark.parametrize("temperature,clip,ess_threshold", [(1.0, 1e-6, None), (0.7, 0.0, 0.5), (2.5, 1e-3, 0.9)])
@pytest.mark.parametrize("counts", [[1, 7, 64, 1000], [64] * 8, [0, 3, 0, 5]])
def test_native_equals_reference_every_setting(temperature, clip, ess_threshold, counts):
    for reward, aggregation, scheme in itertools.product(REWARD_KINDS, AGGREGATIONS, SCHEMES):
        inputs = make_inputs(counts, reward=reward, seed=len(counts))
        params = ResampleParams(reward=reward, aggregation=aggregation, scheme=scheme, temperature=temperature,
                                clip=clip, ess_threshold=ess_threshold)
        draws = dict(seed=3, counter=SCHEMES.index(scheme))
        expected = fused_resample_reference(*inputs, params, **draws)
        assert_same(native(*inputs, params, **draws), expected, inputs, params, **draws)


@pytest.mark.parametrize("impl", FUSED)
@pytest.mark.parametrize("counts", [[1, 7, 64, 300], [16] * 4, [0, 3, 0, 5]])
def test_per_problem_temperatures_equal_the_reference(impl, counts):
    """Entropic particle filtering's annealing: each problem's weights at its own temperature,
    on top of params.temperature."""
    inputs = make_inputs(counts, seed=7)
    temperatures = torch.tensor([1.0, 3.5, 1.25, 8.0][:len(counts)], device=DEVICE)
    for scheme in SCHEMES:
        params = ResampleParams(scheme=scheme, temperature=0.7, ess_threshold=0.9)
        draws = dict(seed=2, counter=1)
        expected = fused_resample_reference(*inputs, params, **draws, temperatures=temperatures)
        assert_same(impl(*inputs, params, **draws, temperatures=temperatures), expected, inputs, params, **draws)
    # against the same problems weighed one by one at the product temperature
    for b in range(len(counts)):
        if counts[b] == 0:
            continue
        part = slice(int(inputs[0][b]), int(inputs[0][b + 1]))
        alone = impl([0, counts[b]], *(x[part] for x in inputs[1:]),
                     ResampleParams(temperature=0.7 * float(temperatures[b])))
        torch.testing.assert_close(expected.weights[part], alone.weights, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("impl", IMPLS)
def test_unit_temperatures_change_nothing_and_bad_ones_are_refused(impl):
    inputs = make_inputs([4, 6], seed=5)
    params = ResampleParams(temperature=0.7)
    plain = impl(*inputs, params, seed=3)
    ones = impl(*inputs, params, seed=3, temperatures=torch.ones(2, device=DEVICE))
    for a, b in zip(plain, ones, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    for bad, message in ((torch.ones(3), r"temperatures must be torch.float32 of shape \[2\]"),
                         (torch.tensor([1.0, 0.0]), "temperatures must be positive and finite"),
                         (torch.tensor([float("inf"), 1.0]), "temperatures must be positive and finite"),
                         (torch.tensor([1.0, float("nan")]), "temperatures must be positive and finite")):
        with pytest.raises(ValueError, match=message):
            impl(*inputs, params, temperatures=bad.to(DEVICE))


@pytest.mark.parametrize("impl", IMPLS)
def test_given_uniforms_are_used_exactly(impl):
    seg, prm, live, agg, steps = make_inputs([5, 9])
    params = ResampleParams(scheme="stratified")
    uniforms = torch.rand(14, device=DEVICE)
    out = impl(seg, prm, live, agg, steps, params, uniforms=uniforms)
    other = impl(seg, prm, live, agg, steps, params, uniforms=1 - uniforms)
    ref = fused_resample_reference(seg, prm, live, agg, steps, params, uniforms=uniforms)
    assert_same(out, ref, (seg, prm, live, agg, steps), params, uniforms=uniforms)
    # stratified point i of problem 0 is (i + u_i) / 5: recompute its ancestors by hand
    cdf = torch.cumsum(out.weights[:5].double().cpu(), 0)
    points = (torch.arange(5) + uniforms[:5].double().cpu()) / 5
    assert out.ancestors[:5].tolist() == torch.searchsorted(cdf, points, right=True).clamp(max=4).tolist()
    assert not torch.equal(out.ancestors, other.ancestors)


def test_philox_draws_are_reproducible_per_seed_and_counter():
    inputs = make_inputs([64, 64])
    params = ResampleParams(scheme="multinomial")
    a = fused_resample(*inputs, params, seed=7, counter=1)
    assert torch.equal(a.ancestors, fused_resample(*inputs, params, seed=7, counter=1).ancestors)
    assert not torch.equal(a.ancestors, fused_resample(*inputs, params, seed=7, counter=2).ancestors)
    assert not torch.equal(a.ancestors, fused_resample(*inputs, params, seed=8, counter=1).ancestors)
    u = philox_uniform(7, torch.arange(100_000) + (1 << 32))
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.005


def test_native_philox_equals_the_torch_replica_bit_for_bit():
    gen = torch.Generator().manual_seed(0)
    offsets = torch.cat([torch.arange(4096) + (5 << 32), torch.randint(-2**62, 2**62, (4096,), generator=gen),
                         torch.tensor([0, -1, 2**63 - 1, -2**63])])
    for seed in (0, 7, 2**40 + 3, 2**64 - 1):
        native, replica = philox_uniform(seed, offsets), philox_uniform_reference(seed, offsets)
        assert torch.equal(native, replica), f"seed {seed}: {(native != replica).sum()} differ"
    assert philox_uniform(3, offsets.view(2, -1)).shape == (2, 4098)


def test_hand_worked_example_of_four_particles():
    # Rewards 0.9, 0.5, 0.2, 0.5 with aggregation "last" and temperature 1:
    # exp(logit(r)) = r / (1 - r) = 9, 1, 0.25, 1; their sum is 11.25, so the
    # weights are 0.8, 0.0888..., 0.0222..., 0.0888...; ESS = 1 / sum(w^2)
    # = 11.25^2 / (81 + 1 + 0.0625 + 1) = 126.5625 / 83.0625 = 1.52370...
    # Systematic with u = 0.5: points 0.125, 0.375, 0.625, 0.875 against the
    # cdf 0.8, 0.8889, 0.9111, 1.0 -> ancestors 0, 0, 0, 1.
    # Residual: n*w = 3.2, 0.356, 0.089, 0.356 -> 3 fixed copies of particle 0,
    # then one draw over remainders 0.2, 0.356, 0.089, 0.356 (sum 1.0); with
    # u = 0.5 the point is 0.5: cdf 0.2, 0.556 -> particle 1.
    rewards = torch.tensor([0.9, 0.5, 0.2, 0.5], device=DEVICE)
    live = torch.ones(4, dtype=torch.bool, device=DEVICE)
    zeros = torch.zeros(4, device=DEVICE)
    steps = torch.zeros(4, dtype=torch.int32, device=DEVICE)
    uniforms = torch.full((4,), 0.5, device=DEVICE)
    for impl in IMPLS:
        out = impl([0, 4], rewards, live, zeros, steps, ResampleParams(reward="reward"), uniforms=uniforms)
        expected_w = torch.tensor([9, 1, 0.25, 1], device=DEVICE) / 11.25
        torch.testing.assert_close(out.weights, expected_w)
        assert out.ess.item() == pytest.approx(126.5625 / 83.0625, rel=1e-6)
        assert out.ancestors.tolist() == [0, 0, 0, 1]
        assert out.resampled.tolist() == [True]
        torch.testing.assert_close(out.aggregates, rewards)
        assert out.next_aggregates.tolist() == pytest.approx([0.9, 0.9, 0.9, 0.5])
        residual = ResampleParams(reward="reward", scheme="residual")
        res = impl([0, 4], rewards, live, zeros, steps, residual, uniforms=uniforms)
        assert res.ancestors.tolist() == [0, 0, 0, 1]
        # The same particles scored by a class head: logits [bad, good] with good - bad = logit(r).
        logits = torch.stack([torch.zeros(4, device=DEVICE), torch.log(rewards / (1 - rewards))], dim=1)
        head = impl([0, 4], logits, live, zeros, steps, ResampleParams(), uniforms=uniforms)
        torch.testing.assert_close(head.weights, expected_w)
        token_pair = ResampleParams(reward="token_logits")
        pair = impl([0, 4], logits.flip(1), live, zeros, steps, token_pair, uniforms=uniforms)
        torch.testing.assert_close(pair.weights, expected_w)


@pytest.mark.parametrize("impl", IMPLS)
def test_aggregations_by_hand(impl):
    # One particle, three steps with rewards 0.5, 0.8, 0.2.
    expected = {"last": 0.2, "min": 0.2, "product": 0.5 * 0.8 * 0.2, "mean": 0.5}
    live = torch.ones(1, dtype=torch.bool, device=DEVICE)
    for aggregation, value in expected.items():
        agg = torch.full((1,), 123.0, device=DEVICE)  # ignored before the first step
        steps = torch.zeros(1, dtype=torch.int32, device=DEVICE)
        for r in (0.5, 0.8, 0.2):
            out = impl([0, 1], torch.tensor([r], device=DEVICE), live, agg, steps,
                       ResampleParams(reward="reward", aggregation=aggregation))
            agg, steps = out.next_aggregates, out.next_num_steps
        assert agg.item() == pytest.approx(value, rel=1e-6), aggregation
        assert steps.item() == 3


@pytest.mark.parametrize("impl", IMPLS)
def test_finished_particles_keep_their_state_and_stay_resamplable(impl):
    rewards = torch.tensor([0.1, 0.99, 0.3], device=DEVICE)
    live = torch.tensor([True, False, True], device=DEVICE)
    agg = torch.tensor([0.5, 0.95, 0.5], device=DEVICE)
    steps = torch.tensor([2, 5, 2], dtype=torch.int32, device=DEVICE)
    uniforms = torch.full((3,), 0.5, device=DEVICE)
    out = impl([0, 3], rewards, live, agg, steps, ResampleParams(reward="reward", aggregation="min"), uniforms=uniforms)
    assert out.aggregates.tolist() == pytest.approx([0.1, 0.95, 0.3])
    assert out.num_steps.tolist() == [3, 5, 3]
    assert math.isnan(out.rewards[1].item()) and out.rewards[0].item() == pytest.approx(0.1)
    # The finished particle has by far the highest weight and is chosen for every slot.
    assert out.ancestors.tolist() == [1, 1, 1]
    assert out.next_live.tolist() == [False, False, False]
    assert out.next_num_steps.tolist() == [5, 5, 5]


@pytest.mark.parametrize("impl", IMPLS)
def test_adaptive_resampling_only_below_the_ess_threshold(impl):
    # Problem 0 has nearly equal weights (ESS ~ n), problem 1 one dominant particle.
    rewards = torch.tensor([0.50, 0.51, 0.49, 0.50, 0.999, 0.01, 0.01, 0.01], device=DEVICE)
    live = torch.ones(8, dtype=torch.bool, device=DEVICE)
    zeros, steps = torch.zeros(8, device=DEVICE), torch.zeros(8, dtype=torch.int32, device=DEVICE)
    out = impl([0, 4, 8], rewards, live, zeros, steps, ResampleParams(reward="reward", ess_threshold=0.5), seed=1)
    assert out.resampled.tolist() == [False, True]
    assert out.ess[0].item() > 0.5 * 4 > out.ess[1].item()
    assert out.ancestors[:4].tolist() == [0, 1, 2, 3]  # identity where not resampled
    assert out.ancestors[4:].tolist() == [4, 4, 4, 4]
    torch.testing.assert_close(out.next_aggregates[:4], rewards[:4])


@pytest.mark.parametrize("impl", IMPLS)
def test_all_zero_weights_fall_back_to_uniform(impl):
    # clip=0 lets a reward of exactly 0 give weight 0 and a reward of 1 infinite log-weight.
    params = ResampleParams(reward="reward", clip=0.0, scheme="systematic")
    live = torch.ones(7, dtype=torch.bool, device=DEVICE)
    zeros, steps = torch.zeros(7, device=DEVICE), torch.zeros(7, dtype=torch.int32, device=DEVICE)
    rewards = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0, 0.3, 1.0], device=DEVICE)
    out = impl([0, 4, 7], rewards, live, zeros, steps, params, seed=2)
    assert out.weights[:4].tolist() == [0.25] * 4
    assert out.weights[4:].tolist() == [0.5, 0.0, 0.5]
    assert set(out.ancestors[4:].tolist()) <= {4, 6}


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_problems_are_skipped(impl):
    seg, prm, live, agg, steps = make_inputs([0, 3, 0, 2, 0])
    params = ResampleParams()
    out = impl(seg, prm, live, agg, steps, params, seed=4)
    assert out.ess[[0, 2, 4]].tolist() == [0, 0, 0]
    assert out.resampled.tolist() == [True] * 5  # no threshold: every problem resamples
    assert out.ancestors[:3].max() < 3 and out.ancestors[3:].min() >= 3
    # the particles of the problems around the empty ones are weighed as if those were absent
    alone = [fused_resample_reference([0, n], prm[a:a + n], live[a:a + n], agg[a:a + n], steps[a:a + n], params)
             for a, n in ((0, 3), (3, 2))]
    torch.testing.assert_close(out.weights, torch.cat([r.weights for r in alone]), rtol=1e-5, atol=1e-6)
    assert_same(out, fused_resample_reference(seg, prm, live, agg, steps, params, seed=4), (seg, prm, live, agg, steps),
                params, seed=4)


# -- statistics --------------------------------------------------------------


def offspring(ancestors, seg):
    """[num_problems, n] offspring counts, for equal-size problems."""
    n = seg[1] - seg[0]
    local = ancestors.cpu().long() - torch.from_numpy(np.repeat(seg[:-1], np.diff(seg)))
    return torch.nn.functional.one_hot(local.view(-1, n), n).sum(dim=1)


def replicated(rewards, draws):
    """The same problem ``draws`` times: one launch, independent draws."""
    n = len(rewards)
    seg = np.arange(draws + 1) * n
    prm = torch.tensor(rewards, device=DEVICE).repeat(draws)
    live = torch.ones(n * draws, dtype=torch.bool, device=DEVICE)
    return seg, prm, live, torch.zeros_like(prm), torch.zeros(n * draws, dtype=torch.int32, device=DEVICE)


REWARDS = [0.95, 0.6, 0.6, 0.3, 0.1, 0.05, 0.5, 0.0]  # the last has weight exactly 0 with clip=0


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("impl,draws", [(fused_resample, 48), (native, 20000), (fused_resample_reference, 20000)])
def test_mean_offspring_is_n_times_weight(scheme, impl, draws):
    inputs = replicated(REWARDS, draws)
    out = impl(*inputs, ResampleParams(reward="reward", clip=0.0, scheme=scheme), seed=123)
    n = len(REWARDS)
    w = out.weights[:n].double().cpu()
    counts = offspring(out.ancestors, inputs[0]).double()
    assert (counts.sum(dim=1) == n).all()
    assert (counts[:, -1] == 0).all(), "a zero-weight particle was chosen"
    # Multinomial variance n w (1 - w) bounds every scheme's; 5 standard errors.
    tolerance = 5 * torch.sqrt(n * w * (1 - w) / draws) + 1e-9
    error = (counts.mean(dim=0) - n * w).abs()
    assert (error <= tolerance).all(), f"mean offspring {counts.mean(0).tolist()} vs n*w {(n * w).tolist()}"


# Systematic counts stay within [floor(n w), ceil(n w)]. Stratified counts can
# leave it by one: an interval of length n w = 1 that straddles two strata
# catches 0, 1 or 2 points (see the next test).
@pytest.mark.parametrize("scheme,slack", [("systematic", 0), ("stratified", 1)])
@pytest.mark.parametrize("impl,draws", [(fused_resample, 48), (native, 5000), (fused_resample_reference, 5000)])
def test_offspring_near_floor_and_ceil(scheme, slack, impl, draws):
    inputs = replicated(REWARDS, draws)
    out = impl(*inputs, ResampleParams(reward="reward", clip=0.0, scheme=scheme), seed=9)
    nw = len(REWARDS) * out.weights[: len(REWARDS)].double().cpu()
    counts = offspring(out.ancestors, inputs[0])
    assert ((counts >= torch.floor(nw - 1e-9) - slack) & (counts <= torch.ceil(nw + 1e-9) + slack)).all()
    assert (counts[:, -1] == 0).all(), "a zero-weight particle was chosen"


@pytest.mark.parametrize("impl", IMPLS)
def test_stratified_can_give_two_copies_where_systematic_gives_one(impl):
    # Weights 0.2, 1/3, 0.4667 (cdf 0.2, 0.533, 1): particle 1 has n w = 1.
    # Stratified with u = (0.9, 0.1, 0.9): points 0.3, 0.367, 0.967 -> 1, 1, 2,
    # two copies where floor/ceil allow one. Systematic with u = 0.9: points
    # 0.3, 0.633, 0.967 -> 1, 2, 2.
    rewards = torch.tensor([1 / 6, 1 / 4, 7 / 22], device=DEVICE)  # odds 1/5 : 1/3 : 7/15
    live = torch.ones(3, dtype=torch.bool, device=DEVICE)
    zeros, steps = torch.zeros(3, device=DEVICE), torch.zeros(3, dtype=torch.int32, device=DEVICE)
    uniforms = torch.tensor([0.9, 0.1, 0.9], device=DEVICE)
    stratified = impl([0, 3], rewards, live, zeros, steps, ResampleParams(reward="reward", scheme="stratified"),
                      uniforms=uniforms)
    assert 3 * stratified.weights[1].item() == pytest.approx(1.0, abs=1e-6)
    assert stratified.ancestors.tolist() == [1, 1, 2]
    systematic = impl([0, 3], rewards, live, zeros, steps, ResampleParams(reward="reward"), uniforms=uniforms)
    assert systematic.ancestors.tolist() == [1, 2, 2]


# -- errors --------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("bad_value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_prm_output_is_reported(impl, bad_value):
    seg, prm, live, agg, steps = make_inputs([4, 4], finished=0.0)
    prm[5, 1] = bad_value
    before = prm.clone()
    message = r"NaN or inf logits for 1 live particles of problems \[1\]; first at particle 5"
    with pytest.raises(ValueError, match=message):
        impl(seg, prm, live, agg, steps, ResampleParams())
    torch.testing.assert_close(prm, before, rtol=0, atol=0, equal_nan=True)
    live[5] = False  # a finished particle's output is never read
    impl(seg, prm, live, agg, steps, ResampleParams())


@pytest.mark.parametrize("impl", IMPLS)
def test_finite_logits_whose_difference_overflows_are_no_error(impl):
    logits = torch.tensor([[3e38, -3e38], [-3e38, 3e38]], device=DEVICE)
    live = torch.ones(2, dtype=torch.bool, device=DEVICE)
    out = impl([0, 2], logits, live, torch.zeros(2, device=DEVICE), torch.zeros(2, dtype=torch.int32, device=DEVICE),
               ResampleParams())
    assert out.rewards.tolist() == [0.0, 1.0]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("bad_value", [1.0, -0.25, float("nan")])
def test_uniforms_outside_the_unit_interval_are_refused(impl, bad_value):
    seg, prm, live, agg, steps = make_inputs([3, 2])
    uniforms = torch.full((5,), 0.5, device=DEVICE)
    uniforms[3] = bad_value
    with pytest.raises(ValueError, match=r"uniforms must lie in \[0, 1\)"):
        impl(seg, prm, live, agg, steps, ResampleParams(), uniforms=uniforms)


def test_native_sigmoid_is_within_two_ulp_over_the_float_range():
    # The native step computes exp with its own vectorized polynomial.
    d = torch.linspace(-87, 120, 4096 * 8)
    seg = np.arange(9) * 4096
    live = torch.ones(len(d), dtype=torch.bool)
    zeros, steps = torch.zeros(len(d)), torch.zeros(len(d), dtype=torch.int32)
    out = resample(seg, torch.stack([torch.zeros_like(d), d], dim=1), live, zeros, steps, ResampleParams())
    exact = torch.sigmoid(d.double())
    relative = ((out.rewards.double() - exact).abs() / exact).max().item()
    assert relative <= 2 * torch.finfo(torch.float32).eps, f"{relative / torch.finfo(torch.float32).eps:.2f} ulp"
    far = torch.tensor([[0.0, -1e30], [0.0, -100.0], [0.0, 100.0], [0.0, 1e30]])
    out = resample([0, 4], far, live[:4], zeros[:4], steps[:4], ResampleParams())
    assert out.rewards.tolist() == [0.0, torch.sigmoid(torch.tensor(-100.0)).item(), 1.0, 1.0]


@pytest.mark.parametrize("impl", IMPLS)
def test_rewards_outside_unit_interval_are_reported(impl):
    seg, _, live, agg, steps = make_inputs([3], finished=0.0)
    with pytest.raises(ValueError, match=r"reward outside \[0, 1\] or NaN .* first at particle 2"):
        impl(seg, torch.tensor([0.5, 0.2, 1.5], device=DEVICE), live, agg, steps, ResampleParams(reward="reward"))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"scheme": "bootstrap"}, "unknown scheme 'bootstrap'"),
        ({"aggregation": "max"}, "unknown aggregation"),
        ({"reward": "logits"}, "unknown reward"),
        ({"temperature": 0.0}, "temperature must be a positive"),
        ({"temperature": float("nan")}, "temperature must be a positive"),
        ({"clip": 0.5}, r"clip must be in \[0, 0.5\)"),
        ({"ess_threshold": 0.0}, "ess_threshold"),
        ({"ess_threshold": 1.5}, "ess_threshold"),
    ],
)
def test_params_validate_themselves(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ResampleParams(**kwargs)


@pytest.mark.parametrize("impl", IMPLS)
def test_malformed_inputs_are_refused(impl):
    seg, prm, live, agg, steps = make_inputs([3, 2])
    params = ResampleParams()
    for args, message in (
        (([0, 3, 2], prm, live, agg, steps), "never decrease"),
        (([1, 3, 5], prm, live, agg, steps), "start at 0"),
        ((seg, prm[:, 0], live, agg, steps), r"prm_output must be torch.float32 of shape \[5, 2\]"),
        ((seg, prm, live.int(), agg, steps), "live must be torch.bool"),
        ((seg, prm, live, agg.double(), steps), "aggregates must be torch.float32"),
        ((seg, prm, live, agg, steps.long()), "num_steps must be torch.int32"),
        (([0, 5000], torch.zeros(5000, 2), torch.ones(5000, dtype=torch.bool), torch.zeros(5000),
          torch.zeros(5000, dtype=torch.int32)), "at most 4096"),
    ):
        with pytest.raises(ValueError, match=message):
            impl(*args, params)


def test_resample_dispatches_by_device(monkeypatch):
    import pf_engine.kernels.resample as kernel
    import pf_engine.resample as op

    calls = []
    for module, name in ((op, "_native_step"), (kernel, "fused_resample")):
        original = getattr(module, name)

        def record(*args, _original=original, _name=name):
            calls.append(_name)
            return _original(*args)

        monkeypatch.setattr(module, name, record)
    inputs = make_inputs([5, 9], seed=3)
    params = ResampleParams(scheme="residual")
    resample(*inputs, params, seed=2)
    assert calls == ["fused_resample" if DEVICE == "cuda" else "_native_step"]
    cpu_inputs = [x.cpu() if isinstance(x, torch.Tensor) else x for x in inputs]
    resample(*cpu_inputs, params, seed=2, impl="triton")
    assert calls[-1] == "fused_resample"
    with pytest.raises(ValueError, match="unknown impl 'numpy'; choose one of auto, triton, native"):
        resample(*inputs, params, impl="numpy")
