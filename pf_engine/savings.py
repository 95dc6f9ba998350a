"""What sharing, forking and incremental scoring saved in a run, counted from the run itself.

Each figure of pf_engine's stands beside what the same search tree costs without
them: a resubmission loop (the way libraries drive a vLLM server today) sends each
live particle's prompt and steps so far back every step, and has the PRM re-read
each whole partial answer; without block sharing every particle holds its own copy
of every token it has read.

    pf_engine                                resubmission / unshared
    prompt prefilled once per problem        once per live particle per step (a tree node)
    (again after a preemption)
    the PRM reads each new step once         the PRM prompt and every step so far, per node
    peak blocks in use                       peak of the particles' own block counts, summed
"""

from dataclasses import dataclass

from pf_engine.api import Engine, Result


@dataclass(frozen=True)
class Savings:
    prompt_tokens: int  # prompt tokens the policy prefilled
    prompt_tokens_resubmitted: int
    prm_tokens: int  # tokens a model PRM read (0 for a rule verifier, which reads text)
    prm_tokens_reread: int
    peak_blocks: int  # policy and model PRM pools together
    peak_unshared_blocks: int


def count_savings(engine: Engine, results: list[Result]) -> Savings:
    """The savings of one ``engine.solve`` call's ``results`` (the peaks are the call's)."""
    reread = 0
    if len(engine.core.pools) > 1:  # a model PRM's pool: what it would reread if every step resent the path
        for r in results:
            path_tokens = {-1: r.stats["prm_prompt_tokens"]}  # node -> PRM tokens of the prompt and the path to it
            for node in r.tree:  # parents come before their children
                read = len(engine.core.prm.step_ids(node.depth, node.text)) + 1  # the step and its marker
                path_tokens[node.node] = path_tokens[node.parent] + read
                reread += path_tokens[node.node]
    peak = max(r.stats["peak_blocks"] + r.stats["peak_prm_blocks"] for r in results)
    unshared = max(r.stats["peak_unshared_blocks"] + r.stats["peak_unshared_prm_blocks"] for r in results)
    return Savings(
        prompt_tokens=sum(r.stats["prompt_tokens"] * (1 + r.stats["preemptions"]) for r in results),
        prompt_tokens_resubmitted=sum(r.stats["prompt_tokens"] * len(r.tree) for r in results),
        prm_tokens=sum(r.stats["prm_tokens"] for r in results), prm_tokens_reread=reread,
        peak_blocks=peak, peak_unshared_blocks=unshared)
