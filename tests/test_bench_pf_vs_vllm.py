"""bench/bench_pf_vs_vllm.py end to end on a tiny model, without vLLM (its column says why).

vLLM lives in its own environment (bench/setup_vllm.sh), which CI does not build:
its part is exercised by running the benchmark, not here.
"""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from tiny import save_tiny_policy

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_pf_vs_vllm.py"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH.parent))  # the script's own path, as when it is run: its helpers (common.py)
    spec = importlib.util.spec_from_file_location("bench_pf_vs_vllm", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    folder = tmp_path_factory.mktemp("policy")
    save_tiny_policy(folder, seed=1)
    return folder


def test_runs_pf_engine_and_transformers_and_says_why_vllm_did_not(bench, policy, tmp_path):
    out = tmp_path / "out"
    assert bench.main(["--policy", str(policy), "--problems", "2", "--particles", "2", "4", "--steps", "1", "2",
                       "--fixed-steps", "2", "--fixed-particles", "2", "--max-step-tokens", "6",
                       "--vllm-python", str(tmp_path / "missing" / "python"), "--out", str(out)]) == 0
    report = (out / "results.md").read_text()
    assert "vllm: not run: no vLLM environment at" in report
    results = json.loads((out / "results.json").read_text())
    configs = [[2, 1], [2, 2], [4, 2]]
    for way in ("pf_engine", "transformers"):
        assert [[r["particles"], r["steps"]] for r in results[way]] == configs
        for r in results[way]:
            assert r["tokens_generated"] > 0 and r["prm_tokens"] > 0 and r["peak_kv_bytes"] > 0
            assert r["tokens_generated"] <= 2 * r["particles"] * r["steps"] * 6
    assert results["vllm"] is None
    # the baseline re-reads whole partial answers, pf_engine only new steps: more PRM tokens, more so with steps
    for ours, theirs in zip(results["pf_engine"], results["transformers"], strict=True):
        assert theirs["prm_tokens"] > ours["prm_tokens"]
        assert ours["prompt_tokens_resent"] == 0 < theirs["prompt_tokens_resent"]
    assert report.count("| pf_engine |") == 3 and report.count("| transformers |") == 3
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_baseline_prm_reads_the_reward_pf_engine_reads(bench, policy):
    """Same tokens in, same reward out: softmax over the (good, bad) logits at the tag, taken at good."""
    job, engine = bench.make_job(type("Args", (), dict(policy=policy, problems=1, kv_cache_mib=64, max_step_tokens=6,
                                                       seed=0, steps=[1], particles=[2], fixed_steps=1,
                                                       fixed_particles=2, device="cpu", dtype="float32"))())
    steps = [engine.core.prm.tokenizer.encode(s, add_special_tokens=False) for s in ("1+1=2\n\n", "so 2\n\n")]
    theirs = bench.HfBackend(job).prm([job["prm_prompts"][0] + steps[0] + [job["tag"]] + steps[1] + [job["tag"]]])
    prm = engine.core.prm
    seq = prm.runner.manager.allocate(0)
    prm.runner.forward([seq], [job["prm_prompts"][0]])
    prm.score_ids([seq], [steps[0]])
    good, bad = prm.score_ids([seq], [steps[1]])[0].tolist()
    assert theirs[0] == pytest.approx(1 / (1 + math.exp(bad - good)), abs=1e-5)
    assert 0.0 < theirs[0] < 1.0 and not torch.isnan(torch.tensor(theirs)).any()
