"""One model's KV pool as the engine sees it: the runner, its block manager, each placed
problem's prompt sequence (its root) and each row's sequence.

The engine holds a list of pools, the policy's first, then a model PRM's where there is one,
and does to every pool what it does to one::

    place     prefill the prompt once (the root), rebuild the live particles' paths from the
              tree (each shared node once, depth by depth), one fork per particle
    follow    slot j takes a fork of slot ancestors[j]'s sequence (resampling)
    restart   every particle a fresh fork of the root (particle Gibbs' next sweep)
    evict     free the problem's sequences and root

A pool differs from another only in what its model reads: the prompt, and a node's tokens
(the policy's own, or the PRM format's step and marker).

NOTE: a placed problem owns ``problem.roots[pool.index]`` and ``rows.seq_ids[problem.rows,
pool.index]`` on every pool until it is evicted; a waiting problem owns none.
"""

import numpy as np
import torch

from pf_engine.runner import ModelRunner
from pf_engine.state import Problem, RowTable


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class Pool:
    """The policy's pool (a subclass overrides what its model reads)."""

    name = "policy"

    def __init__(self, index: int, runner: ModelRunner):
        self.index, self.runner = index, runner

    @property
    def manager(self):
        return self.runner.manager

    # -- what the model reads ---------------------------------------------------------
    def prompt_ids(self, problem: Problem) -> list[int]:
        return problem.prompt_ids

    def node_ids(self, problem: Problem, node: int) -> list[int]:
        return problem.node_tokens[node]

    def node_tokens_estimate(self, problem: Problem, node: int) -> int:
        """About len(node_ids(...)), without tokenizing."""
        return len(problem.node_tokens[node])

    def tokens_read(self, policy_tokens: np.ndarray | int):
        """At most the tokens this model reads of a step of ``policy_tokens`` policy tokens."""
        return policy_tokens

    def to_write(self, max_step_tokens: np.ndarray, step_len: np.ndarray) -> np.ndarray:
        """Policy tokens of the steps in flight that are still to reach this pool: the rest of the
        step (the policy's pool takes each token as it is drawn)."""
        return max_step_tokens - step_len

    def count(self, problem: Problem, num_tokens: int, prompt: bool = False) -> None:
        """Add ``num_tokens`` prefilled on this pool to the problem's counts (a rebuild's, or its prompt's)."""
        if not prompt:
            problem.recomputed_tokens += num_tokens

    # -- blocks --------------------------------------------------------------------------
    def blocks_to_place(self, problem: Problem) -> int:
        """Blocks :meth:`place` takes (about): the prompt, each node the live particles' paths
        share, and one block per particle for its next tokens."""
        bs = self.manager.block_size
        live = [slot for slot in range(problem.num_particles) if not problem.finished[slot]]
        nodes = {node for slot in live for node in problem.path(slot)}
        return (blocks_for(len(self.prompt_ids(problem)), bs) + problem.num_particles
                + sum(blocks_for(self.node_tokens_estimate(problem, node), bs) + 1 for node in nodes))

    def blocks_to_write(self, policy_tokens: np.ndarray) -> int:
        """Blocks that steps of ``policy_tokens[i]`` more policy tokens take here, one sequence each."""
        return int(np.sum(blocks_for(np.asarray(self.tokens_read(policy_tokens)), self.manager.block_size)))

    # -- verbs ---------------------------------------------------------------------------
    def place(self, problem: Problem, created: list) -> tuple[list[int], list, torch.Tensor]:
        """Prefill the prompt as ``problem.roots[index]`` and rebuild every particle's sequence from
        the tree: ``(seqs, hiddens, root_hidden)``, a sequence and the hidden state of its last token
        per slot, and the prompt's. Sequences made are listed in ``created`` as (manager, seq) until
        they are owned."""
        bm = self.manager
        root = problem.roots[self.index] = bm.allocate(0)
        created.append((bm, root))
        prompt = self.prompt_ids(problem)
        hidden = self.runner.forward([root], [prompt])[-1]
        self.count(problem, len(prompt), prompt=True)
        return *self._rebuild(problem, root, hidden, created), hidden

    def _rebuild(self, problem: Problem, root: int, root_hidden, created: list):
        """The nodes of the particles' paths prefilled once per node (depth by depth, forks of their
        parents), then one fork per particle. A finished particle never reads its cache again and
        gets an empty sequence."""
        bm = self.manager
        paths = {slot: problem.path(slot) for slot in range(problem.num_particles) if not problem.finished[slot]}
        needed = sorted({node for path in paths.values() for node in path}, key=lambda n: problem.tree[n].depth)
        seq_of, hidden_of = {-1: root}, {-1: root_hidden}
        start = 0
        while start < len(needed):
            depth = problem.tree[needed[start]].depth
            end = start
            while end < len(needed) and problem.tree[needed[end]].depth == depth:
                end += 1
            level = needed[start:end]
            seqs = []
            for node in level:
                seqs.append(bm.fork(seq_of[problem.tree[node].parent]))
                created.append((bm, seqs[-1]))
            tokens = [self.node_ids(problem, node) for node in level]
            hidden = self.runner.forward(seqs, tokens)
            self.count(problem, sum(map(len, tokens)))
            last = ModelRunner.last_token_index(tokens)
            for i, node in enumerate(level):
                seq_of[node], hidden_of[node] = seqs[i], hidden[last[i]]
            start = end
        out_seqs, out_hidden = [], []
        for slot in range(problem.num_particles):
            top = paths[slot][-1] if paths.get(slot) else -1  # -1: the prompt (or a finished particle)
            out_seqs.append(bm.fork(seq_of[top]) if slot in paths else bm.allocate(0))
            created.append((bm, out_seqs[-1]))
            out_hidden.append(hidden_of[top])
        for node in needed:  # the particles hold what they need
            bm.free(seq_of[node])
            created.remove((bm, seq_of[node]))
        return out_seqs, out_hidden

    def follow(self, table: RowTable, problem: Problem, ancestors: np.ndarray) -> None:
        """Slot j's sequence becomes a fork of slot ``ancestors[j]``'s."""
        column = table.seq_ids[:, self.index]
        column[problem.rows] = self.manager.resample(column[problem.rows], ancestors)

    def restart(self, table: RowTable, problem: Problem) -> None:
        """Every particle a fresh fork of the prompt."""
        bm, column = self.manager, table.seq_ids[:, self.index]
        for row in problem.rows.tolist():
            bm.free(int(column[row]))
            column[row] = bm.fork(problem.roots[self.index])

    def evict(self, table: RowTable, problem: Problem) -> None:
        for seq in table.seq_ids[problem.rows, self.index].tolist():
            self.manager.free(seq)
        self.manager.free(problem.roots[self.index])
        problem.roots[self.index] = None

    def note_blocks(self, stats: dict, table: RowTable) -> None:
        """The peaks of blocks in use, and of the blocks the particles' sequences would hold if each
        had its own copy of every token (no sharing, no forks)."""
        key = "blocks" if self.index == 0 else f"{self.name}_blocks"
        used = self.manager.num_blocks - self.manager.num_free_blocks
        stats["peak_" + key] = max(stats["peak_" + key], used)
        unshared = self.manager.num_unshared_blocks(table.seq_ids[table.placed, self.index])
        stats["peak_unshared_" + key] = max(stats["peak_unshared_" + key], unshared)


class PRMPool(Pool):
    """A model PRM's pool: it reads the PRM format's prompt, and each step in the format with the marker."""

    name = "prm"

    def __init__(self, index: int, prm):
        super().__init__(index, prm.runner)
        self.prm = prm
        self._overhead = len(prm.step_ids(1, "")) + 1  # what the format adds to a step, the marker included

    def prompt_ids(self, problem: Problem) -> list[int]:
        return problem.prm_prompt_ids

    def node_ids(self, problem: Problem, node: int) -> list[int]:
        return self.prm.step_ids(problem.tree[node].depth, problem.tree[node].text) + [self.prm.marker_id]

    def node_tokens_estimate(self, problem: Problem, node: int) -> int:
        return len(problem.node_tokens[node]) + self._overhead

    def tokens_read(self, policy_tokens):
        return policy_tokens + self._overhead

    def to_write(self, max_step_tokens, step_len):
        return max_step_tokens  # the whole step, when it is scored

    def count(self, problem: Problem, num_tokens: int, prompt: bool = False) -> None:
        problem.prm_tokens += num_tokens
