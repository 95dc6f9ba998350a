"""bench/bench_vs_its_hub.py's PRM adapter gives the reward pf_engine's verifier gives for the same steps.

its_hub's ParticleFiltering hands a PRM each particle's steps so far joined by the step delimiter
(StepGeneration._post_process with the stop strings left out of the steps); the adapter splits them
back. its_hub is not in the test environment (it lives in the bench venv with vLLM): the core
comparison feeds the adapter that joined text directly; the its_hub subclass is checked where its_hub
can be imported.
"""

import asyncio
import sys
from pathlib import Path

import pytest

from pf_engine.verifiers import arithmetic_verifier

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from bench_vs_its_hub import DELIMITER, its_hub_prm, rule_rewards  # noqa: E402

QUESTION = "Problem: A box holds 6 pencils. How many pencils are in 5 boxes?"
# steps as its_hub keeps them (the model's output up to the blank line, which vLLM leaves out)
STEP_LISTS = [
    ["A box holds 6 pencils.", "6 x 5 = 30", "The answer is \\boxed{30}."],  # claimless newest step: 0.5
    ["6 x 5 = 35", "The answer is \\boxed{35}."],  # a false claim before a claimless step: still 0.5
    ["6 x 5 = 35", "5 + 5 = 10"],  # true newest step after a false one: 0.95
    ["6 x 5 = 30", "30 - 1 = 28"],  # false newest step after a true one: 0.05
    ["Step 1: 6 * 5 = 30", "Step 2: 30 / 1 = 30 and 2 + 2 = 5"],  # one false claim of two
    ["6 x 5 = 30"],  # a single step
    ["6 x 5 = 30", ""],  # an empty step: the model wrote the blank line at once
    ["So 6 x", "5 = 30"],  # a claim across the delimiter is no claim of the newest step
    ["\nTotal: 6 + 6 + 6 + 6 + 6 = 30", "\n6 x 5 = 31\n"],  # newlines around steps
]


@pytest.mark.parametrize("steps", STEP_LISTS)
def test_the_adapter_gives_the_verifiers_reward_on_its_hubs_joined_steps(steps):
    joined = DELIMITER.join(steps)
    expected = arithmetic_verifier(QUESTION, steps)
    assert rule_rewards(arithmetic_verifier, QUESTION, joined) == expected


def test_one_call_scores_every_particle_in_order():
    expected = [arithmetic_verifier(QUESTION, steps) for steps in STEP_LISTS]
    assert len(set(expected)) == 3  # the cases reach all three rewards
    assert rule_rewards(arithmetic_verifier, QUESTION, [DELIMITER.join(s) for s in STEP_LISTS]) == expected


def test_the_its_hub_subclass_scores_what_step_generation_hands_it():
    try:
        from its_hub import StepGeneration
    except ImportError as exc:
        pytest.skip(f"its_hub's StepGeneration does not import here ({exc}); `pip install --no-deps its-hub==1.2.0 "
                    "&& pip install 'backoff>=2.2' aiohttp` runs this check (bench/setup_vllm.sh installs its_hub only "
                    "in bench/.vllm-venv)")
    sg = StepGeneration(max_steps=8, step_token=DELIMITER, stop_token="\\boxed{")
    prm = its_hub_prm(arithmetic_verifier)
    responses = [sg._post_process(steps, stopped=True) for steps in STEP_LISTS]  # what ParticleFiltering sends
    expected = [arithmetic_verifier(QUESTION, steps) for steps in STEP_LISTS]
    assert prm.score(QUESTION, responses) == expected
    assert asyncio.run(prm.ascore(QUESTION, responses)) == expected
