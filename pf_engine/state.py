"""What a search keeps, in two places, and the words the engine uses for it.

Glossary (one word per thing, everywhere in pf_engine)::

    problem    one question and its search (Problem)
    particle   one partial answer of a problem; it has a slot, and while placed a row
    slot       a particle's index within its problem, 0 .. num_particles - 1
    row        a placed particle's line in the row table (``problem.rows[slot]``)
    lane       a placed problem's small id in the row table (``RowTable.problem``)
    sequence   a token sequence in one model's KV pool (``seq`` ids, on a block manager)
    pool       one model's KV cache with its sequences (pf_engine.pool)
    step       one delimited piece of a particle's text, a node of the tree
    round      every live particle of a problem writing one step, then the end of the round
               (score, weigh, select, follow); numbered sweep * max_steps + step in the
               random streams
    sweep      particle Gibbs' pass over all steps (other algorithms run one)
    policy     the language model that writes the steps
    algorithm  the search (pf_engine.search): what happens to a problem after each round

    In code, ``rows`` is always an index array of rows and ``table`` (or ``r``) the RowTable.

    Problem   durable, at the start of its current round: the tree, each
              particle's newest node, finished flag, token count, running
              aggregate, budget-forcing state; enough to rebuild its particles
              from scratch
    RowTable  scratch of the round in flight, one row per placed particle, in
              arrays: sequence ids, the step's tokens, step-end automata,
              hidden state of the newest token (its logits come from it)

with the rules particles write steps by (StepRules, BudgetForcing) and the tree's nodes.
"""

from dataclasses import dataclass, field

import numpy as np
import torch

from pf_engine.sampling import SamplingParams


@dataclass
class TreeNode:
    """One step of one particle, alive or not: the search tree is the list of these."""

    node: int
    problem: int
    parent: int  # -1 for a first step
    depth: int  # 0 for a first step
    text: str
    num_tokens: int = 0  # the policy's tokens of the step
    reward: float | None = None
    weight: float | None = None
    num_children: int = 0  # copies that survived resampling; 0 for a dead branch, until the end
    finished: bool = False
    iteration: int = 0  # particle Gibbs: the sweep that wrote it
    reference: bool = False  # particle Gibbs: replayed from the reference path, not sampled
    forced: str | None = None  # budget forcing: the phrase the step starts with, forced ("wait" or "end")
    trim: int = 0  # a stop string ending in this step began this many characters before it: cut from the text
    temperature: float | None = None  # entropic particle filtering: the annealing temperature its round weighed at
    confidence: float | None = None  # weights from the policy: its confidence in the step (pf_engine.confidence)
    cancelled: bool = False  # early stopping: the vote settled while the particle was writing this step


@dataclass(frozen=True, slots=True)
class BudgetForcing:
    """s1's budget forcing over the step loop. While a thinking particle has fewer than
    ``min_tokens`` tokens or ``min_continuations`` wait phrases, an end (EOS, which is dropped,
    or a complete ``\\boxed{}``, which stays) does not finish it: its step ends there and its
    next step starts with ``wait_phrase``. Once it has ``max_tokens`` tokens, its step ends and
    the next starts with ``end_phrase``, after which it answers freely. Forced phrases are
    replayed tokens (no draws); the tree marks the steps they start (``TreeNode.forced``)."""

    min_continuations: int = 1
    min_tokens: int = 0
    max_tokens: int | None = None
    wait_phrase: str = " But wait,"
    end_phrase: str = " Final answer:"

    def __post_init__(self):
        for name in ("min_continuations", "min_tokens"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"budget_forcing.{name} must be an int >= 0, got {getattr(self, name)!r}")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise ValueError(f"budget_forcing.max_tokens must be None or an int >= 1, got {self.max_tokens!r}")
        for name in ("wait_phrase", "end_phrase"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"budget_forcing.{name} must be a non-empty string")


PHRASE_WAIT, PHRASE_END = 1, 2  # a particle's pending phrase (0: none)


@dataclass(frozen=True, slots=True)
class StepRules:
    """How particles write steps (from SearchConfig)."""

    sampling: SamplingParams
    seed: int
    max_steps: int
    max_step_tokens: int
    max_new_tokens: int
    stop_at_boxed: bool
    delimiter: str
    stop: tuple[str, ...] = ()
    budget: BudgetForcing | None = None
    signal: str | None = None  # the policy's confidence the writer measures per token (pf_engine.confidence)
    tail_tokens: int = 64  # tail_entropy: the step's last tokens it is taken over


def path_to(tree: list[TreeNode], node: int) -> list[int]:
    """Node ids from the first step down to ``node`` (empty for -1, the prompt)."""
    nodes = []
    while node >= 0:
        nodes.append(node)
        node = tree[node].parent
    return nodes[::-1]


def path_texts(tree: list[TreeNode], nodes: list[int]) -> list[str]:
    """The texts of a path's steps (``path_to``), with the start of a stop string that began before
    the last step (its ``trim``) cut from the steps before it."""
    texts = [tree[n].text for n in nodes]
    trim = tree[nodes[-1]].trim if nodes else 0
    for i in range(len(texts) - 2, -1, -1):
        if trim <= 0:
            break
        cut = min(trim, len(texts[i]))
        texts[i], trim = texts[i][:len(texts[i]) - cut], trim - cut
    return texts


# The per-particle arrays a Problem keeps between rounds: a round's rows start from them
# (begin_round), commit them back, a rollback restores them and resampling gathers them.
PARTICLE_STATE = ("finished", "capped", "num_tokens", "boxed", "continuations", "answering", "pending")


@dataclass(eq=False)
class Problem:
    """One problem's search. The arrays hold each particle (slot) as it was at the start of
    the current round; a preempted problem is rebuilt from them and its tree.

    NOTE: ``rows`` is None while the problem waits (never placed, or preempted);
    once placed, row ``rows[slot]`` of the engine's RowTable holds the slot's
    sequences and the round in flight, and the problem owns those sequences
    (and ``roots``, its prompt on each pool) until it is evicted or finishes.
    """

    index: int  # position in the call (its tree nodes carry it)
    key: int  # its name in the random streams
    question: str
    num_particles: int
    prompt_ids: list[int]
    prm_prompt_ids: list[int] | None
    rules: StepRules
    algorithm: object = None  # the search's Algorithm (pf_engine.search): what the scheduler does after a round
    lane: int = -1  # while placed: its small id in the row table (``RowTable.problem``), given by the scheduler
    sweep: int = 0
    step: int = 0  # round within the sweep
    tree: list[TreeNode] = field(default_factory=list)
    node_tokens: list[list[int]] = field(default_factory=list)  # policy token ids of each node
    node_values: list = field(default_factory=list)  # rules.signal: float32 [num_tokens] of each node, else None
    rows: np.ndarray | None = None
    roots: list = field(default_factory=lambda: [None, None])  # each pool's sequence of the prompt (pool.index)
    root_hidden: torch.Tensor | None = None  # hidden state of the prompt's last token
    num_writing: int = 0  # rows still writing this round's step
    forced: dict = field(default_factory=dict)  # particle Gibbs: slot -> (token ids, finishes) replayed this round
    committed: tuple | None = None  # (tree size, leaves, PARTICLE_STATE arrays) before the round being ended
    extra: dict = field(default_factory=dict)  # the algorithm's own state
    tokens_generated: int = 0
    prm_tokens: int = 0
    ancestor_tokens: int = 0
    recomputed_tokens: int = 0  # policy tokens prefilled again to rebuild after a preemption
    discarded_tokens: int = 0  # tokens drawn in rounds a preemption made it redo
    num_preemptions: int = 0
    stopped_early: bool = False  # early stopping: the vote settled; the round in flight is its last

    def __post_init__(self):
        self.new_sweep()

    def new_sweep(self) -> None:
        """Every particle back at the prompt (the first sweep, or particle Gibbs' next)."""
        n = self.num_particles
        self.step = 0
        self.leaf = np.full(n, -1, dtype=np.int64)
        self.finished = np.zeros(n, dtype=bool)
        self.capped = np.zeros(n, dtype=bool)  # finished by max_new_tokens alone (OpenAI's finish reason "length")
        self.continuations = np.zeros(n, dtype=np.int64)  # budget forcing: wait phrases so far
        self.answering = np.zeros(n, dtype=bool)  # budget forcing: the end phrase came; no more forcing
        self.pending = np.zeros(n, dtype=np.int8)  # budget forcing: the phrase its next step starts with
        self.num_tokens = np.zeros(n, dtype=np.int64)
        self.boxed = np.zeros((n, 2), dtype=np.int64)  # \\boxed{ tracker: (chars matched, open braces)
        self.aggregates = torch.zeros(n)
        self.num_steps = torch.zeros(n, dtype=torch.int32)
        self.weights = torch.full((n,), 1.0 / n)

    def round_(self, max_steps: int) -> int:
        """The round's number in the random streams."""
        return self.sweep * max_steps + self.step

    def path(self, slot: int) -> list[int]:
        """Node ids of a particle's steps, first to newest."""
        return path_to(self.tree, int(self.leaf[slot]))

    def steps(self, slot: int) -> list[str]:
        return path_texts(self.tree, self.path(slot))

    def step_ids(self, slot: int) -> list[list[int]]:
        return [self.node_tokens[n] for n in self.path(slot)]



@dataclass
class Round:
    """The batch the end of a round works on: problems whose live particles have all ended
    their step, with what each phase adds. Lists hold one entry per problem, in order; the
    PRM's tensors one row per particle, problem after problem."""

    problems: list[Problem]
    steps: list[list[tuple[int, list[int], str]]]  # (slot, token ids, text) of each live particle's step
    nodes: list[list[int]] = field(default_factory=list)  # the tree nodes those steps became
    done: list[bool] = field(default_factory=list)  # the problem ends its sweep
    prm_output: torch.Tensor | None = None  # float32 [num_problems * N] rewards or [num_problems * N, 2] logits
    live: torch.Tensor | None = None  # bool [num_problems * N]: the particle wrote a step
    reward_kind: str | None = None
    log_odds: torch.Tensor | None = None  # float64 [num_problems * N]: the policy's confidence in each step

    def drop(self, problem: Problem) -> None:
        """Take ``problem`` out of the batch, if it is in it (it was preempted and redoes the round later)."""
        if problem not in self.problems:
            return
        b, n = self.problems.index(problem), problem.num_particles
        for name in ("problems", "steps", "nodes", "done"):
            if getattr(self, name):
                del getattr(self, name)[b]
        if self.prm_output is not None:
            keep = torch.ones(self.live.shape[0], dtype=torch.bool)
            keep[b * n:(b + 1) * n] = False
            self.prm_output, self.live = self.prm_output[keep], self.live[keep]
        if self.log_odds is not None:
            self.log_odds = torch.cat([self.log_odds[:b * n], self.log_odds[(b + 1) * n:]])


class RowTable:
    """Generation state of every placed particle, one row each (grown on demand).

    Per-token work reads and writes these arrays for all writing rows at once.
    """

    def __init__(self, hidden_size: int, dtype, device, num_pools: int = 1):
        self.num_pools = num_pools  # seq_ids[row, pool.index]: the row's sequence on each pool
        self.max_step_tokens = 1  # the width of the step-token arrays: the widest placed problem's steps
        self.hidden_size, self.dtype, self.device = hidden_size, dtype, device
        self.capacity = 0
        self.free: list[int] = []
        self._grow(64)

    def widen(self, max_step_tokens: int) -> None:
        """Make room for steps of ``max_step_tokens`` tokens (problems of differing configs share the rows)."""
        if max_step_tokens <= self.max_step_tokens:
            return
        for name, dtype in (("tokens", np.int64), ("forced_tokens", np.int64), ("values", np.float32)):
            array = np.zeros((self.capacity, max_step_tokens), dtype=dtype)
            array[:, :self.max_step_tokens] = getattr(self, name)
            setattr(self, name, array)
        self.max_step_tokens = max_step_tokens

    def _grow(self, capacity: int) -> None:
        old = self.capacity

        def extend(name, shape, dtype, fill=0):
            array = np.full((capacity, *shape), fill, dtype=dtype)
            if old:
                array[:old] = getattr(self, name)
            setattr(self, name, array)

        extend("seq_ids", (self.num_pools,), np.int64)
        for name, dtype in (("key", np.int64),
                            ("slot", np.int64), ("round", np.int64), ("problem", np.int64),
                            ("step_len", np.int64), ("num_tokens", np.int64), ("delim", np.int16),
                            ("forced_len", np.int64), ("rule", np.int64), ("continuations", np.int64),
                            ("stop_trim", np.int64),
                            ("pending", np.int8)):
            extend(name, (), dtype)
        for name in ("placed", "writing", "finished", "capped", "forcing", "forced_finishes", "forced_prefix",
                     "answering"):
            extend(name, (), bool)
        extend("boxed", (2,), np.int64)
        extend("tokens", (self.max_step_tokens,), np.int64)
        extend("forced_tokens", (self.max_step_tokens,), np.int64)
        extend("values", (self.max_step_tokens,), np.float32)  # the policy's confidence per token of the step
        hidden = torch.zeros(capacity, self.hidden_size, dtype=self.dtype, device=self.device)
        if old:
            hidden[:old] = self.hidden
        self.hidden = hidden
        self.free.extend(range(capacity - 1, old - 1, -1))
        self.capacity = capacity

    def take(self, n: int) -> np.ndarray:
        if len(self.free) < n:
            self._grow(max(2 * self.capacity, self.capacity + n))
        taken = np.array([self.free.pop() for _ in range(n)], dtype=np.int64)
        self.placed[taken] = True
        return taken

    def give_back(self, rows: np.ndarray) -> None:
        self.writing[rows] = self.placed[rows] = False
        self.free.extend(rows.tolist())


@dataclass(frozen=True, slots=True)
class Ends:
    """How each drawn token ends things, one bool per row (arrays changed in place by budget forcing)."""

    forcing: np.ndarray  # the token was forced
    finished: np.ndarray  # the particle ends
    capped: np.ndarray  # ... by max_new_tokens alone
    step_done: np.ndarray  # the step ends
    feed: np.ndarray  # the token goes to the model
