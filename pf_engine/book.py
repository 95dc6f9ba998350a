"""The round book: what the end of a round writes into a problem's durable state (its tree,
each particle's newest node and PARTICLE_STATE arrays), and how that is taken back.

NOTE: the invariants the scheduler relies on.

- The tree only grows: :func:`commit` appends one node per particle that wrote a step, and
  nothing but :func:`rollback` removes nodes; a node's fields never change after its round
  but its reward and weight (set once, right after) and ``num_children`` (counted by
  :func:`follow`).
- Between :func:`commit` and the next round's start (``StepWriter.begin_round``, which
  clears it), ``problem.committed`` holds the tree's size, the leaves and the particles'
  state as they were before the commit; :func:`rollback` restores exactly that, so a
  problem preempted while ending a round redoes the round as if it had never been ended.
  Once the next round has begun, rollback does nothing.
- :func:`follow` moves particles, never nodes: slot j takes slot ancestors[j]'s leaf and state.
"""

import numpy as np

from pf_engine.state import PARTICLE_STATE, Problem, RowTable, TreeNode


def commit(problem: Problem, table: RowTable, steps: list[tuple[int, list[int], str]]) -> list[int]:
    """The round's steps join the tree and the particles' durable state; returns their nodes."""
    r, placed = table, problem.rows
    problem.committed = (len(problem.tree), problem.leaf.copy(),
                         {name: getattr(problem, name) for name in PARTICLE_STATE})
    nodes = []
    for slot, ids, text in steps:
        row = placed[slot]
        parent = int(problem.leaf[slot])
        depth = problem.tree[parent].depth + 1 if parent >= 0 else 0
        node = TreeNode(node=len(problem.tree), problem=problem.index, parent=parent, depth=depth, text=text,
                        num_tokens=len(ids), finished=bool(r.finished[row]), iteration=problem.sweep,
                        reference=slot in problem.forced, forced=None if not r.forced_prefix[row]
                        else "wait" if r.continuations[row] > problem.continuations[slot] else "end",
                        trim=int(r.stop_trim[row]))
        problem.tree.append(node)
        problem.node_tokens.append(ids)
        problem.node_values.append(r.values[row, :len(ids)].copy() if problem.rules.signal else None)
        problem.leaf[slot] = node.node
        nodes.append(node.node)
    for name in PARTICLE_STATE:
        setattr(problem, name, getattr(r, name)[placed].copy())
    problem.forced = {}
    return nodes


def rollback(problem: Problem) -> None:
    """Take back the round :func:`commit` added, if the problem has not moved past it."""
    if problem.committed is None:
        return
    size, problem.leaf, arrays = problem.committed
    for name, array in arrays.items():
        setattr(problem, name, array)
    del problem.tree[size:], problem.node_tokens[size:], problem.node_values[size:]
    problem.committed = None


def follow(problem: Problem, ancestors: np.ndarray) -> None:
    """Slot j's leaf and state become slot ``ancestors[j]``'s; each chosen leaf counts its copies."""
    for node in problem.leaf[ancestors].tolist():
        problem.tree[node].num_children += 1
    for name in ("leaf", *PARTICLE_STATE):
        setattr(problem, name, getattr(problem, name)[ancestors])
