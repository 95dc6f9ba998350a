"""The demo's savings are counts of the run itself: each figure equals what the engine's calls,
KV caches and block manager show when they are watched while the search runs."""

import numpy as np
import pytest

from pf_engine import Engine, SearchConfig
from pf_engine.savings import count_savings

QUESTIONS = ["What is 2+2?", "Add 3 and 4.", "Is 9 odd?"]
CONFIG = SearchConfig(num_particles=4, max_steps=4, max_step_tokens=6, max_new_tokens=20, stop_at_boxed=False)


@pytest.mark.parametrize("kv_blocks", [2048, 16])  # roomy; tight enough to preempt
def test_the_savings_equal_what_the_run_did(policy, kv_blocks):
    engine = Engine(policy=policy, prm=policy, prm_step_tag="=", prm_good="+", prm_bad="-",
                    kv_cache_memory=kv_blocks * 2 * 2 * 2 * 2 * 8 * 4 * 16)  # both caches' blocks
    core = engine.core
    seen = {"prefill": 0, "reread": 0}

    def watch(obj, name, after):
        real = getattr(obj, name)

        def watched(*args, **kwargs):
            out = real(*args, **kwargs)
            after(out, *args, **kwargs)
            return out

        setattr(obj, name, watched)

    # every prefill of the policy (prompts, rebuilds after preemption, splices)
    watch(engine.policy, "forward", lambda out, seqs, tokens: seen.__setitem__(
        "prefill", seen["prefill"] + sum(map(len, tokens))))
    # a resubmission loop sends the prompt once for every particle that writes a step
    watch(core, "end_round", lambda batch, problems: seen.__setitem__(
        "particle_steps_by_prompt", seen.get("particle_steps_by_prompt", 0)
        + sum(len(p.prompt_ids) * len(s) for p, s in zip(batch.problems, batch.steps, strict=True))))

    # re-reading the whole partial answer reads what the particle's PRM sequence holds once it is scored
    def reread(out, batch, weighting):
        pm = core.prm.runner.manager
        seen["reread"] += sum(pm.num_tokens(int(core.table.seq_ids[p.rows[slot], 1]))
                              for p, stepped in zip(batch.problems, batch.steps, strict=True)
                              for slot, _, _ in stepped)
    watch(core, "score", reread)

    # each particle with its own copy: its sequences' own block counts, summed, at every point blocks are
    # noted; the peak of each pool (policy, PRM), as the peaks in use are taken
    def unshared(out):
        r, bs = core.table, engine.block_size
        placed = np.setdiff1d(np.arange(r.capacity), r.free)
        for pool, runner, column in (("policy", engine.policy, r.seq_ids[:, 0]), ("prm", core.prm.runner,
                                                                                 r.seq_ids[:, 1])):
            total = sum(-(-runner.manager.num_tokens(int(seq)) // bs) for seq in column[placed])
            seen[pool] = max(seen.get(pool, 0), total)
    watch(core, "note_blocks", unshared)

    results = engine.solve(QUESTIONS, CONFIG)
    saved = count_savings(engine, results)
    preempted = sum(r.stats["preemptions"] for r in results)
    assert (preempted > 0) == (kv_blocks == 16)
    other = sum(r.stats["recomputed_tokens"] + r.stats["ancestor_tokens"] for r in results)
    assert saved.prompt_tokens == seen["prefill"] - other
    if not preempted:  # a redone round's steps never reach the tree
        assert saved.prompt_tokens_resubmitted == seen["particle_steps_by_prompt"]
        assert saved.prm_tokens_reread == seen["reread"]
    assert saved.prompt_tokens_resubmitted == sum(r.stats["prompt_tokens"] * len(r.tree) for r in results)
    assert saved.prm_tokens == sum(r.stats["prm_tokens"] for r in results) > 0
    # (prompts of a few characters share no full block here: the demo's long prompts are where sharing pays)
    assert saved.peak_unshared_blocks == seen["policy"] + seen["prm"] and saved.peak_blocks > 0
    assert saved.prompt_tokens < saved.prompt_tokens_resubmitted and saved.prm_tokens < saved.prm_tokens_reread
