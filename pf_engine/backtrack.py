"""Backtracking training data from a search tree, as the method's authors describe it:
a step that died in resampling, a phrase that owns the mistake, then the path
that survived to the answer::

    root ─ s1 ─ s2 ─ s3 (answer)      chosen path
             └─ x2 (no children)      a dead branch at depth 1

    completion = s1 + x2 + PHRASE + s2 + s3
"""

from pf_engine.answers import is_correct

PHRASE = "Hold on! I made a mistake. Let me try again.\n\n"


def backtracking_examples(result, gold=None, phrase: str = PHRASE) -> list[dict]:
    """``{"prompt", "completion", "dead_step"}`` records, one per dead branch off the chosen path.

    A dead branch is a step that no later step follows and that no final particle ends with.

    With ``gold``, nothing is returned unless the result's answer matches it:
    only a verified answer is worth learning to backtrack towards.
    """
    if gold is not None and not is_correct(result.answer, gold):
        return []
    nodes = {node.node: node for node in result.tree}
    path = []
    node = result.leaves[result.chosen] if result.leaves else -1
    while node >= 0:
        path.append(nodes[node])
        node = nodes[node].parent
    path.reverse()
    ended = set(result.leaves) | {n.parent for n in result.tree}  # final steps, and steps something follows
    examples = []
    for depth, kept in enumerate(path):
        parent = path[depth - 1].node if depth else -1
        for dead in result.tree:
            if dead.parent == parent and dead.depth == depth and dead.node != kept.node and dead.node not in ended:
                completion = "".join(n.text for n in path[:depth]) + dead.text + phrase
                completion += "".join(n.text for n in path[depth:])
                examples.append({"prompt": result.question, "completion": completion, "dead_step": dead.node})
    return examples
