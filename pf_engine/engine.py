"""The engine's phases: place a problem's particles in the KV caches (from its prompt,
or rebuilt from its search tree after a preemption), decode one token for every
writing particle of every problem, end a problem's round (its steps' texts and
tree nodes), score the new steps, weigh, and follow the chosen ancestors.

The policy's and the PRM's sequences fork together. Every draw is keyed by
(problem, round, slot, token in step) as pf_engine.philox lays it out, so a
particle's tokens depend neither on batching nor on preemption.

The state it works on (Problem, Rows) is in pf_engine.state.
"""

import functools
import time

import numpy as np
import torch

from pf_engine.philox import (
    ROUND_BITS,
    SLOT_BITS,
    TOKEN_BITS,
    philox_uniform,
)
from pf_engine.prm import ModelPRM, RulePRM
from pf_engine.prm_format import PRMFormat
from pf_engine.resample import ResampleOutput, ResampleParams, resample
from pf_engine.runner import ModelRunner
from pf_engine.sampling import SamplingParams, filtered_logits, sample
from pf_engine.state import (
    PARTICLE_STATE,
    PHRASE_END,
    PHRASE_WAIT,
    BudgetForcing,
    Ends,
    Problem,
    Round,
    Rows,
    StepRules,
    TreeNode,
)
from pf_engine.step_end import StepEndTables, advance_boxed, token_texts

MAX_RULES = 256  # distinct step rules kept before those of no placed row are dropped
# Peaks of blocks in use and of the blocks the particles would hold unshared, for the policy's and a model
# PRM's pools (ParticleEngine.stats). Engine.stream resets them at the start of each call; a server's
# long-lived scheduler never does, so there they are the server's since start-up.
PEAK_STATS = ("peak_blocks", "peak_prm_blocks", "peak_unshared_blocks", "peak_unshared_prm_blocks")


def _timed(phase: str):
    """Adds the wall time of each call to ``self.stats["seconds_<phase>"]``."""

    def wrap(fn):
        @functools.wraps(fn)
        def timed(self, *args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(self, *args, **kwargs)
            finally:
                self.stats[f"seconds_{phase}"] += time.perf_counter() - start

        return timed

    return wrap


class ParticleEngine:
    """Runs the particles of many problems on a policy (and optional PRM) runner.

    prm: None, a RulePRM, or a ModelPRM (ClassHeadPRM, TokenPairPRM) on its own runner.
    """

    def __init__(self, policy: ModelRunner, tokenizer, prm=None, prm_tokenizer=None,
                 prm_format: PRMFormat | None = None):
        self.policy, self.tokenizer = policy, tokenizer
        self.prm, self.prm_tokenizer = prm, prm_tokenizer
        self.prm_format = prm_format or PRMFormat()
        self.prm_runner = prm.runner if isinstance(prm, ModelPRM) else None  # a model PRM's own cache
        self.eos_ids = set(_as_list(getattr(policy.model.config, "eos_token_id", None)))
        if tokenizer.eos_token_id is not None:
            self.eos_ids.add(tokenizer.eos_token_id)
        # peaks since they were last reset (PEAK_STATS); forwards and sequences fed for occupancy; seconds per phase
        self.stats = dict.fromkeys(PEAK_STATS, 0) | {
            "decode_forwards": 0, "decode_sequences": 0, "seconds_prefill": 0.0, "seconds_decode": 0.0,
            "seconds_score": 0.0, "seconds_resample": 0.0, "seconds_ancestors": 0.0}
        self._texts: list[str] | None = None
        self._tables: dict[str, StepEndTables] = {}
        self._phrases: dict[str, list[int]] = {}
        self.rows: Rows | None = None
        self.rules: list[StepRules] = []  # Rows.rule indexes it: the step rules of every problem placed so far
        self._rule_ids: dict[StepRules, int] = {}

    # -- set-up ----------------------------------------------------------------
    def prompt_ids(self, question: str, system_prompt: str | None = None) -> list[int]:
        """What the policy reads before its first step: the question as a user turn of its chat
        template, after a system turn where ``system_prompt`` is given."""
        return _chat_prompt(self.tokenizer, question, system_prompt)

    def prm_prompt_ids(self, question: str) -> list[int]:
        """What a model PRM reads before the first step."""
        return self.prm_format.prompt_ids(self.prm_tokenizer, question)

    def prm_step_ids(self, index: int, text: str) -> list[int]:
        """What a model PRM reads of a particle's step ``index`` (0 first), before its marker."""
        return self.prm_format.step_ids(self.prm_tokenizer, index, text)

    def step_end_tables(self, delimiter: str) -> StepEndTables:
        """The per-token tables for ``delimiter``, built once per engine and delimiter."""
        if delimiter not in self._tables:
            if self._texts is None:
                self._texts = token_texts(self.tokenizer, self.policy.vocab_size)
            self._tables[delimiter] = StepEndTables(self._texts, delimiter, self.eos_ids)
        return self._tables[delimiter]

    def begin(self) -> None:
        """Fresh rows, for a scheduler that starts with nothing placed."""
        hidden_size = self.policy.model.config.hidden_size
        self.rows = Rows(hidden_size, self.policy.kv_cache.kv.dtype, self.policy.device)

    def _rule_id(self, rules: StepRules) -> int:
        """The index of ``rules`` in :attr:`rules` (added where new)."""
        rule_id = self._rule_ids.get(rules)
        if rule_id is None:
            if len(self.rules) >= MAX_RULES:
                self._compact_rules()
            rule_id = self._rule_ids[rules] = len(self.rules)
            self.rules.append(rules)
        return rule_id

    def _compact_rules(self) -> None:
        """Keep only the rules (and step-end tables) of placed rows: a long-lived server sees a new
        seed, so new rules, with nearly every request."""
        r = self.rows
        placed = np.flatnonzero(r.placed)
        used, r.rule[placed] = np.unique(r.rule[placed], return_inverse=True)
        self.rules = [self.rules[i] for i in used.tolist()]
        self._rule_ids = {rule: i for i, rule in enumerate(self.rules)}
        delimiters = {rule.delimiter for rule in self.rules}
        self._tables = {d: t for d, t in self._tables.items() if d in delimiters}

    # -- placing and evicting problems -------------------------------------------
    @_timed("prefill")
    def place(self, problem: Problem) -> None:
        """Give ``problem`` rows and sequences: prefill its prompt and fork it, or, for a preempted
        problem, rebuild each particle from its tree (shared prefixes once, then forks).

        Raises OutOfBlocksError with nothing allocated when a pool is too small.
        """
        created: list[tuple[object, int]] = []  # (manager, seq) made here, freed again on failure
        try:
            self._place(problem, created)
        except BaseException:
            for manager, seq in reversed(created):
                manager.free(seq)
            problem.root = problem.prm_root = problem.root_hidden = None
            if problem.rows is not None:
                self.rows.give_back(problem.rows)
                problem.rows = None
            raise
        self.note_blocks()

    def _place(self, problem: Problem, created: list) -> None:
        bm = self.policy.manager
        problem.root = bm.allocate(0)
        created.append((bm, problem.root))
        hidden = self.policy.forward([problem.root], [problem.prompt_ids])
        problem.root_hidden = hidden[-1]
        seqs, hiddens = self._rebuild(self.policy, problem, problem.root, problem.root_hidden,
                                      lambda node: problem.node_tokens[node], created)
        prm_seqs = [None] * problem.num_particles
        if self.prm_runner is not None:
            pm = self.prm_runner.manager
            problem.prm_root = pm.allocate(0)
            created.append((pm, problem.prm_root))
            self.prm_runner.forward([problem.prm_root], [problem.prm_prompt_ids])
            problem.prm_tokens += len(problem.prm_prompt_ids)
            prm_seqs, _ = self._rebuild(self.prm_runner, problem, problem.prm_root, None,
                                        self._prm_node_tokens(problem), created)
        r = self.rows
        rows = r.take(problem.num_particles)
        problem.rows = rows
        r.widen(problem.rules.max_step_tokens)
        r.rule[rows] = self._rule_id(problem.rules)
        r.seq_id[rows] = seqs
        r.prm_seq_id[rows] = [-1 if s is None else s for s in prm_seqs]
        r.key[rows] = problem.key
        r.slot[rows] = np.arange(problem.num_particles)
        r.problem[rows] = problem.lane
        r.hidden[torch.from_numpy(rows)] = torch.stack(hiddens)

    def blocks_to_place(self, problem: Problem) -> int:
        """Policy blocks :meth:`place` takes (about): the prompt, each node the live particles'
        paths share, and one block per particle for its next tokens."""
        return self._blocks(problem, len(problem.prompt_ids), lambda node: len(problem.node_tokens[node]),
                            self.policy.manager.block_size)

    def prm_blocks_to_place(self, problem: Problem) -> int:
        """:meth:`blocks_to_place` for the PRM's pool (its step tokens estimated by the policy's, plus a marker)."""
        return self._blocks(problem, len(problem.prm_prompt_ids), lambda node: len(problem.node_tokens[node]) + 1,
                            self.prm_runner.manager.block_size)

    @staticmethod
    def _blocks(problem: Problem, prompt_tokens: int, node_tokens, block_size: int) -> int:
        live = [slot for slot in range(problem.num_particles) if not problem.finished[slot]]
        nodes = {node for slot in live for node in problem.path(slot)}
        return (-(-prompt_tokens // block_size) + problem.num_particles
                + sum(-(-node_tokens(node) // block_size) + 1 for node in nodes))

    def _prm_node_tokens(self, problem: Problem):
        marker = self.prm.marker_id
        return lambda node: self.prm_step_ids(problem.tree[node].depth, problem.tree[node].text) + [marker]

    def _rebuild(self, runner: ModelRunner, problem: Problem, root: int, root_hidden, node_tokens, created):
        """Each particle's sequence on ``runner``: the nodes of its path prefilled once per node
        (depth by depth, forks of their parents), then one fork per particle. A finished
        particle never reads its cache again and gets an empty sequence."""
        bm = runner.manager
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
            tokens = [node_tokens(node) for node in level]
            hidden = runner.forward(seqs, tokens)
            if runner is self.prm_runner:
                problem.prm_tokens += sum(map(len, tokens))
            else:
                problem.recomputed_tokens += sum(map(len, tokens))
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

    def evict(self, problem: Problem) -> None:
        """Free every sequence and row of a placed problem (preemption, or the end of its search)."""
        if problem.rows is None:
            return
        r = self.rows
        for seq in r.seq_id[problem.rows].tolist():
            self.policy.manager.free(seq)
        self.policy.manager.free(problem.root)
        if self.prm_runner is not None:
            for seq in r.prm_seq_id[problem.rows].tolist():
                self.prm_runner.manager.free(seq)
            self.prm_runner.manager.free(problem.prm_root)
        r.give_back(problem.rows)
        problem.rows = problem.root = problem.prm_root = problem.root_hidden = None
        problem.num_writing = 0

    def restart_sweep(self, problem: Problem) -> None:
        """Particle Gibbs' next sweep: every particle a fresh fork of the prompt."""
        bm = self.policy.manager
        r, rows = self.rows, problem.rows
        for row in rows.tolist():
            bm.free(int(r.seq_id[row]))
            r.seq_id[row] = bm.fork(problem.root)
            if self.prm_runner is not None:
                self.prm_runner.manager.free(int(r.prm_seq_id[row]))
                r.prm_seq_id[row] = self.prm_runner.manager.fork(problem.prm_root)
        r.hidden[torch.from_numpy(rows)] = problem.root_hidden
        problem.sweep += 1
        problem.new_sweep()

    # -- a round -----------------------------------------------------------------
    def begin_round(self, problem: Problem) -> None:
        """Every live particle of ``problem`` starts writing its next step."""
        problem.committed = None
        r, rows, rules = self.rows, problem.rows, problem.rules
        for name in PARTICLE_STATE:
            getattr(r, name)[rows] = getattr(problem, name)
        r.writing[rows] = ~problem.finished
        r.step_len[rows] = r.stop_trim[rows] = 0
        r.delim[rows] = 0
        r.round[rows] = problem.round_(rules.max_steps)
        r.forcing[rows] = r.forced_prefix[rows] = False
        for slot, (ids, finishes) in problem.forced.items():
            row = rows[slot]
            r.forcing[row], r.forced_finishes[row], r.forced_len[row] = True, finishes, len(ids)
            r.forced_tokens[row, :len(ids)] = ids
        if rules.budget is not None:
            self._force_phrases(problem, rules.budget)
        problem.num_writing = int((~problem.finished).sum())

    def _force_phrases(self, problem: Problem, budget: BudgetForcing) -> None:
        """Start the steps of particles with a pending phrase with it (a forced prefix; then they draw)."""
        r, rows = self.rows, problem.rows
        for slot in np.flatnonzero((problem.pending != 0) & ~problem.finished).tolist():
            if slot in problem.forced:  # particle Gibbs' reference replays its own phrases
                continue
            row, wait = rows[slot], problem.pending[slot] == PHRASE_WAIT
            ids = self.phrase_ids(budget.wait_phrase if wait else budget.end_phrase)
            if len(ids) >= problem.rules.max_step_tokens:
                raise ValueError(f"the budget forcing phrase {budget.wait_phrase if wait else budget.end_phrase!r} "
                                 f"is {len(ids)} tokens: max_step_tokens must be more")
            r.forcing[row] = r.forced_prefix[row] = True
            r.forced_finishes[row], r.forced_len[row], r.pending[row] = False, len(ids), 0
            r.forced_tokens[row, :len(ids)] = ids
            if wait:
                r.continuations[row] += 1
            else:
                r.answering[row] = True

    def phrase_ids(self, text: str) -> list[int]:
        """The policy's tokens of a forced phrase (cached)."""
        if text not in self._phrases:
            self._phrases[text] = self.tokenizer.encode(text, add_special_tokens=False)
        return self._phrases[text]

    @_timed("decode")
    def sample(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Draw the next token of every writing row and apply the step-end rules.

        Returns (tokens, feed, stopped): the rows' tokens, which rows go on to the
        model (all but those whose particle finished), and which stopped writing
        (step ended or particle finished). Rows of differing step rules draw and
        stop by their own, from one LM-head call.
        """
        r = self.rows
        logits = self.policy.logits(r.hidden[torch.from_numpy(rows)])
        rule_of = r.rule[rows]
        if (rule_of == rule_of[0]).all():
            return self._sample(rows, logits, self.rules[rule_of[0]])
        tokens, feed, stopped = (np.empty(len(rows), dtype=np.int64), np.empty(len(rows), dtype=bool),
                                 np.empty(len(rows), dtype=bool))
        for rule_id in np.unique(rule_of).tolist():
            part = np.flatnonzero(rule_of == rule_id)
            tokens[part], feed[part], stopped[part] = self._sample(
                rows[part], logits[torch.from_numpy(part).to(logits.device)], self.rules[rule_id])
        return tokens, feed, stopped

    def _sample(self, rows: np.ndarray, logits: torch.Tensor, rules: StepRules):
        r, tables = self.rows, self.step_end_tables(rules.delimiter)
        step_len = r.step_len[rows]
        keys = ((r.key[rows] << (ROUND_BITS + SLOT_BITS + TOKEN_BITS)) | (r.round[rows] << (SLOT_BITS + TOKEN_BITS))
                | (r.slot[rows] << TOKEN_BITS) | step_len)
        uniforms = philox_uniform(rules.seed, torch.from_numpy(keys))
        tokens = sample(logits, rules.sampling, uniforms=uniforms.to(logits.device)).cpu().numpy()
        forcing = r.forcing[rows]
        prefix = forcing & r.forced_prefix[rows]
        if prefix.any():  # a forced prefix (budget forcing's phrase) replayed whole: the step goes on drawing
            forcing &= ~prefix | (step_len < r.forced_len[rows])
        if forcing.any():
            forced_rows = rows[forcing]
            tokens[forcing] = r.forced_tokens[forced_rows, step_len[forcing]]
        r.tokens[rows, step_len] = tokens
        step_len += 1
        r.step_len[rows] = step_len
        num_tokens = r.num_tokens[rows] + 1
        r.num_tokens[rows] = num_tokens
        finished = tables.eos[tokens]
        if rules.stop_at_boxed:
            slow = tables.backslash[tokens] | (r.boxed[rows] != 0).any(axis=1)
            if slow.any():
                finished[slow] |= advance_boxed(tables.texts, tokens[slow], r.boxed[:, 0], r.boxed[:, 1], rows[slow])
        state = r.delim[rows]
        matched = tables.matched[tokens, state]
        r.delim[rows] = tables.next_state[tokens, state]
        step_done = matched | (step_len >= rules.max_step_tokens)
        capped = ~finished & ~forcing & (num_tokens >= rules.max_new_tokens)
        finished |= capped
        if forcing.any():
            replay = forcing & ~prefix  # a whole step replayed (particle Gibbs' reference)
            replayed = step_len[replay] == r.forced_len[rows[replay]]
            step_done[replay] = replayed
            finished[replay] |= replayed & r.forced_finishes[rows[replay]]
            step_done[forcing & prefix] = finished[forcing & prefix] = False  # nothing ends inside a phrase
        feed = ~finished
        if rules.budget is not None:
            self._budget(rows, tokens, rules, Ends(forcing, finished, capped, step_done, feed))
        r.finished[rows] = finished
        r.capped[rows] = capped
        stopped = finished | step_done
        r.writing[rows] = ~stopped
        return tokens, feed, stopped

    def _budget(self, rows: np.ndarray, tokens: np.ndarray, rules: StepRules, ends: "Ends") -> None:
        """Budget forcing on the newest token of each row: ``ends`` is changed in place."""
        r, budget = self.rows, rules.budget
        num_tokens = r.num_tokens[rows]
        thinking = ~ends.forcing & ~r.answering[rows]
        short = thinking & ends.finished & ~ends.capped & ((num_tokens < budget.min_tokens)
                                                           | (r.continuations[rows] < budget.min_continuations))
        if budget.max_tokens is not None:
            short &= num_tokens < budget.max_tokens
        if short.any():  # its end does not stand: the step ends, and the next starts with the wait phrase
            ends.finished[short], ends.step_done[short] = False, True
            r.pending[rows[short]] = PHRASE_WAIT
            dropped = short & self.step_end_tables(rules.delimiter).eos[tokens]
            if dropped.any():  # the EOS is neither kept nor fed
                r.step_len[rows[dropped]] -= 1
                r.num_tokens[rows[dropped]] -= 1
                num_tokens[dropped] -= 1
                ends.feed[dropped] = False
            ends.feed[short & ~dropped] = True
        if budget.max_tokens is not None:
            over = thinking & ~ends.finished & ~short & (num_tokens >= budget.max_tokens)
            ends.step_done[over] = True
            r.pending[rows[over]] = PHRASE_END

    @_timed("decode")
    def feed(self, rows: np.ndarray, tokens: np.ndarray) -> None:
        """Run the model on each row's newest token; keep its hidden state for the next draw."""
        if len(rows) == 0:
            return
        hidden = self.policy.run(self.rows.seq_id[rows], np.ones(len(rows), dtype=np.int64), tokens)
        self.rows.hidden[torch.from_numpy(rows)] = hidden
        self.stats["decode_forwards"] += 1
        self.stats["decode_sequences"] += len(rows)
        self.note_blocks()

    def end_round(self, problems: list[Problem]) -> Round:
        """The batch of ``problems`` ending a round, with the step each live particle wrote."""
        r = self.rows
        stepped = [[s for s in range(p.num_particles) if not p.finished[s]] for p in problems]
        ids = [r.tokens[p.rows[s], :r.step_len[p.rows[s]]].tolist() for p, slots in zip(problems, stepped,
                                                                                           strict=True)
               for s in slots]
        texts = self.decode(ids) if ids else []
        steps, i = [], 0
        for p, slots in zip(problems, stepped, strict=True):
            if p.rules.stop:
                steps.append([(s, ids[i + k], self._cut_at_stop(p, s, texts[i + k])) for k, s in enumerate(slots)])
            else:
                steps.append([(s, ids[i + k], texts[i + k]) for k, s in enumerate(slots)])
            i += len(slots)
        return Round(problems, steps)

    def _cut_at_stop(self, problem: Problem, slot: int, text: str) -> str:
        """A step's text up to the first of the rules' stop strings, which finishes the particle. A stop
        string may begin in the particle's earlier steps (their last characters are searched too): the
        step's text is then empty and ``rows.stop_trim`` says how much of the earlier text it cuts."""
        tail = ""
        node, want = int(problem.leaf[slot]), max(map(len, problem.rules.stop)) - 1
        while node >= 0 and len(tail) < want:
            tail, node = problem.tree[node].text + tail, problem.tree[node].parent
        tail = tail[max(len(tail) - want, 0):] if want else ""
        searched = tail + text
        at = min((at for at in (searched.find(stop) for stop in problem.rules.stop) if at >= 0), default=-1)
        if at < 0:
            return text
        row = problem.rows[slot]
        self.rows.finished[row], self.rows.capped[row] = True, False
        self.rows.stop_trim[row] = max(len(tail) - at, 0)
        return text[:max(at - len(tail), 0)]

    def decode(self, ids: list[list[int]]) -> list[str]:
        """Texts of token id lists, as ``tokenizer.decode(ids, skip_special_tokens=True)`` gives them;
        in one call of a fast tokenizer's backend (transformers' batch_decode inspects every id)."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None:
            return self.tokenizer.batch_decode(ids, skip_special_tokens=True)
        texts = backend.decode_batch(ids, skip_special_tokens=True)
        if getattr(self.tokenizer, "clean_up_tokenization_spaces", False):
            texts = [self.tokenizer.clean_up_tokenization(t) for t in texts]
        return texts

    def commit_round(self, problem: Problem, steps: list[tuple[int, list[int], str]]) -> list[int]:
        """The round's steps join the tree and the particles' durable state; returns their nodes."""
        r, rows = self.rows, problem.rows
        problem.committed = (len(problem.tree), problem.leaf.copy(),
                             {name: getattr(problem, name) for name in PARTICLE_STATE})
        nodes = []
        for slot, ids, text in steps:
            row = rows[slot]
            parent = int(problem.leaf[slot])
            depth = problem.tree[parent].depth + 1 if parent >= 0 else 0
            node = TreeNode(node=len(problem.tree), problem=problem.index, parent=parent, depth=depth, text=text,
                            num_tokens=len(ids), finished=bool(r.finished[row]), iteration=problem.sweep,
                            reference=slot in problem.forced, forced=None if not r.forced_prefix[row]
                            else "wait" if r.continuations[row] > problem.continuations[slot] else "end",
                            trim=int(r.stop_trim[row]))
            problem.tree.append(node)
            problem.node_tokens.append(ids)
            problem.leaf[slot] = node.node
            nodes.append(node.node)
        for name in PARTICLE_STATE:
            setattr(problem, name, getattr(r, name)[rows].copy())
        problem.forced = {}
        return nodes

    def rollback(self, problem: Problem) -> None:
        """Take back the round :meth:`commit_round` added, if the problem has not moved past it."""
        if problem.committed is None:
            return
        size, problem.leaf, arrays = problem.committed
        for name, array in arrays.items():
            setattr(problem, name, array)
        del problem.tree[size:], problem.node_tokens[size:]
        problem.committed = None

    @_timed("score")
    def score(self, batch: Round) -> None:
        """The PRM's output for the newest step of every particle that wrote one, into
        ``batch.prm_output`` (rows of the others hold zeros and are not read), ``live`` and
        ``reward_kind``. Model PRMs append each step and a marker to the particle's PRM
        sequence (all or nothing)."""
        problems, steps = batch.problems, batch.steps
        n = problems[0].num_particles
        flat = [(b, slot, ids, text) for b, stepped in enumerate(steps) for slot, ids, text in stepped]
        index = torch.tensor([b * n + slot for b, slot, _, _ in flat], dtype=torch.long)
        live = torch.zeros(len(problems) * n, dtype=torch.bool)
        live[index] = True
        if isinstance(self.prm, RulePRM):
            out = torch.zeros(len(problems) * n)
            rewards = [float(self.prm.fn(problems[b].question, problems[b].steps(slot) + [text]))
                       for b, slot, _, text in flat]
            out[index] = torch.tensor(rewards, dtype=torch.float32)
            batch.prm_output, batch.live, batch.reward_kind = out, live, "reward"
            return
        out = torch.zeros(len(problems) * n, *(() if self.prm.reward_kind == "reward" else (2,)))
        if flat:
            prm_ids = [self.prm_step_ids(len(problems[b].path(slot)), text) for b, slot, _, text in flat]
            seqs = [int(self.rows.prm_seq_id[problems[b].rows[slot]]) for b, slot, _, _ in flat]
            out[index] = self.prm.score(seqs, prm_ids).cpu()
            for (b, _, _, _), ids in zip(flat, prm_ids, strict=True):
                problems[b].prm_tokens += len(ids) + 1
            self.note_blocks()
        batch.prm_output, batch.live, batch.reward_kind = out, live, self.prm.reward_kind

    @_timed("resample")
    def weigh(self, batch: Round, params: ResampleParams, uniforms: torch.Tensor) -> ResampleOutput:
        """Rewards, weights, ESS and ancestors for every problem of a scored batch in one fused call."""
        n = batch.problems[0].num_particles
        seg = np.arange(len(batch.problems) + 1) * n
        aggregates = torch.cat([p.aggregates for p in batch.problems])
        num_steps = torch.cat([p.num_steps for p in batch.problems])
        device = self.policy.device
        return resample(seg, batch.prm_output.to(device), batch.live.to(device), aggregates.to(device),
                        num_steps.to(device), params, uniforms=uniforms.to(device))

    @_timed("resample")
    def follow(self, problem: Problem, ancestors: np.ndarray) -> None:
        """Slot ``j`` becomes a copy of slot ``ancestors[j]``: one resample per block manager; the
        particles' durable state and hidden rows are gathered the same way."""
        r, rows = self.rows, problem.rows
        r.seq_id[rows] = self.policy.manager.resample(r.seq_id[rows], ancestors)
        if self.prm_runner is not None:
            r.prm_seq_id[rows] = self.prm_runner.manager.resample(r.prm_seq_id[rows], ancestors)
        r.hidden[torch.from_numpy(rows)] = r.hidden[torch.from_numpy(rows[ancestors])]
        for node in problem.leaf[ancestors].tolist():
            problem.tree[node].num_children += 1
        for name in ("leaf", *PARTICLE_STATE):
            setattr(problem, name, getattr(problem, name)[ancestors])

    # -- particle Gibbs ----------------------------------------------------------
    @_timed("ancestors")
    def splice(self, problem_of: list[Problem], slots: list[int], futures: list[list[list[int]]],
               future_texts: list[list[str]], sampling: SamplingParams) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """How each candidate prefix (``problem_of[i]``'s particle ``slots[i]``) would carry a
        reference path's future (ancestor sampling).

        ``futures[i]`` / ``future_texts[i]``: token ids / texts of the steps that
        follow candidate ``i``'s prefix on the reference path (at least one). Returns

        - the log-likelihood of each future under the sampling distribution given
          its candidate's prefix: float64 [num_candidates];
        - for k = 0, 1, ...: the PRM output of the k-th future step of the
          candidates whose future has one (rows in candidate order): rewards [m]
          for a rule PRM, logits [m, 2] for a model PRM.

        The candidates' sequences are forked, extended and freed: nothing stays.
        """
        r = self.rows
        rows = np.array([p.rows[s] for p, s in zip(problem_of, slots, strict=True)], dtype=np.int64)
        loglik = torch.zeros(len(rows), dtype=torch.float64)
        tokens = [[t for step in future for t in step] for future in futures]
        bm = self.policy.manager
        forks = []
        try:
            for seq in r.seq_id[rows].tolist():
                forks.append(bm.fork(seq))
            hidden = self.policy.forward(forks, tokens)
            for p, ids in zip(problem_of, tokens, strict=True):
                p.ancestor_tokens += len(ids)
            self.note_blocks()
            first = self.policy.logits(r.hidden[torch.from_numpy(rows)])
            start = 0
            for i, ids in enumerate(tokens):
                within = hidden[start:start + len(ids) - 1]  # the last token predicts nothing we need
                start += len(ids)
                logits = torch.cat([first[i:i + 1], self.policy.logits(within)])
                logp = torch.log_softmax(filtered_logits(logits, sampling), dim=-1)
                loglik[i] = logp.gather(1, torch.tensor(ids, device=logp.device)[:, None]).double().sum()
        finally:
            for seq in forks:
                bm.free(seq)
        return loglik, self._splice_prm(problem_of, slots, rows, future_texts)

    def _splice_prm(self, problem_of, slots, rows, future_texts) -> list[torch.Tensor]:
        depth = max(map(len, future_texts))
        if isinstance(self.prm, RulePRM):
            return [torch.tensor([float(self.prm.fn(p.question, p.steps(s) + texts[:k + 1]))
                                  for p, s, texts in zip(problem_of, slots, future_texts, strict=True)
                                  if len(texts) > k], dtype=torch.float32) for k in range(depth)]
        pm = self.prm_runner.manager
        forks = []
        try:
            for seq in self.rows.prm_seq_id[rows].tolist():
                forks.append(pm.fork(seq))
            outputs = []
            for k in range(depth):
                chosen = [i for i, texts in enumerate(future_texts) if len(texts) > k]
                steps = [self.prm_step_ids(len(problem_of[i].path(slots[i])) + k, future_texts[i][k]) for i in chosen]
                outputs.append(self.prm.score([forks[i] for i in chosen], steps).cpu())
                for i, ids in zip(chosen, steps, strict=True):
                    problem_of[i].prm_tokens += len(ids) + 1
            return outputs
        finally:
            for seq in forks:
                pm.free(seq)

    def note_blocks(self) -> None:
        """The peaks of blocks in use, and of the blocks the particles' sequences would hold if each
        had its own copy of every token (no sharing, no forks)."""
        r = self.rows
        for key, runner, seq_id in (("blocks", self.policy, r.seq_id),
                                    ("prm_blocks", self.prm_runner, r.prm_seq_id)):
            if runner is not None:
                used = runner.manager.num_blocks - runner.manager.num_free_blocks
                self.stats["peak_" + key] = max(self.stats["peak_" + key], used)
                unshared = runner.manager.num_unshared_blocks(seq_id[r.placed])
                self.stats["peak_unshared_" + key] = max(self.stats["peak_unshared_" + key], unshared)


def _as_list(x) -> list:
    return [] if x is None else list(x) if isinstance(x, (list, tuple)) else [x]


def _chat_prompt(tokenizer, question: str, system_prompt: str | None = None) -> list[int]:
    """The question as a user turn of the tokenizer's chat template (plain text where it has none)."""
    turns = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
    return chat_ids(tokenizer, turns + [{"role": "user", "content": question}])


def chat_ids(tokenizer, turns: list[dict]) -> list[int]:
    """A conversation as the tokenizer's chat template renders it, ready for the assistant's turn; without a
    template, the turns' texts a blank line apart."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(turns, add_generation_prompt=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    return tokenizer.encode("\n\n".join(t["content"] for t in turns) + "\n", add_special_tokens=True)
