"""The random-stream contract (pf_engine.philox), pinned: draws taken before the resampling
step and the streams moved to modules of their own must stay bit-identical."""

import numpy as np
import pytest
import torch

from pf_engine.philox import (
    ANCESTOR_TOKEN,
    MAX_ROUNDS,
    MAX_STEP_TOKENS,
    REFERENCE_TOKEN,
    RESAMPLE_TOKEN,
    philox_key,
    philox_uniform,
    philox_uniform_reference,
    search_uniforms,
)
from pf_engine.resample import SCHEMES, ResampleParams, resample
from pf_engine.sampling import SamplingParams, sample

KEYS = philox_key([0, 3, 1023], 5, [0, 7, 63], [0, 11, 4091])
# (problem, round, slot, token) -> problem << 43 | round << 23 | slot << 12 | token
PINNED_KEYS = [41943040, 26388321038347, 8998403203923963]
PINNED_TOKEN_UNIFORMS = [0.7221264243125916, 0.24324798583984375, 0.49315643310546875]
PINNED_RESAMPLE_UNIFORMS = [0.7037466168403625, 0.008215163834393024, 0.950020968914032]
REWARDS = [0.49625658988952637, 0.7682217955589294, 0.08847743272781372, 0.13203048706054688,
           0.30742281675338745, 0.6340786814689636, 0.4900934100151062, 0.8964447379112244,
           0.455627977848053, 0.6323062777519226, 0.3488934636116028, 0.40171730518341064]
PINNED_ANCESTORS = {  # seed 99, counter 4, Philox draws inside the step
    "systematic": [0, 1, 1, 1, 4, 5, 7, 7, 7, 7, 8, 10],
    "stratified": [0, 1, 1, 1, 4, 5, 7, 7, 7, 7, 9, 9],
    "multinomial": [1, 4, 1, 4, 4, 7, 9, 7, 7, 9, 9, 7],
    "residual": [1, 1, 1, 4, 4, 7, 7, 7, 7, 11, 10, 6],
}


def test_keys_follow_the_documented_bit_layout():
    assert KEYS.tolist() == PINNED_KEYS
    assert KEYS.tolist() == [(p << 43) | (5 << 23) | (s << 12) | t for p, s, t in ((0, 0, 0), (3, 7, 11),
                                                                                (1023, 63, 4091))]
    # the reserved token fields lie above every step's tokens, and rounds fill their 20 bits
    assert MAX_STEP_TOKENS < REFERENCE_TOKEN < ANCESTOR_TOKEN < RESAMPLE_TOKEN < 4096
    assert philox_key(0, MAX_ROUNDS - 1, 0, 0).item() < 1 << 43


def test_token_and_search_draws_are_pinned():
    assert philox_uniform(12345, KEYS).tolist() == PINNED_TOKEN_UNIFORMS
    assert philox_uniform_reference(12345, KEYS).tolist() == PINNED_TOKEN_UNIFORMS
    assert search_uniforms(7, [0, 1, 2], 3, [0, 1, 2], RESAMPLE_TOKEN).tolist() == PINNED_RESAMPLE_UNIFORMS
    assert search_uniforms(7, [4], 9, 0, ANCESTOR_TOKEN).tolist() == [0.8454195857048035]
    assert search_uniforms(7, [4], 9, 0, REFERENCE_TOKEN).tolist() == [0.24952304363250732]
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0]] * 3)
    cdf = torch.softmax(logits / 0.8, dim=-1).double().cumsum(-1)
    expected = [int(torch.searchsorted(cdf[0], u * cdf[0, -1], right=True)) for u in PINNED_TOKEN_UNIFORMS]
    assert sample(logits, SamplingParams(temperature=0.8), uniforms=philox_uniform(12345, KEYS)).tolist() == expected


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("impl", ["native", "triton"])
def test_resampling_draws_are_pinned(scheme, impl):
    live = torch.ones(12, dtype=torch.bool)
    out = resample(np.array([0, 5, 12]), torch.tensor(REWARDS), live, torch.zeros(12),
                   torch.zeros(12, dtype=torch.int32), ResampleParams(reward="reward", scheme=scheme),
                   seed=99, counter=4, impl=impl)
    assert out.ancestors.tolist() == PINNED_ANCESTORS[scheme]
