"""The round in flight: every placed particle's row, the token each writing row draws next, and
when its step ends.

A round starts from the problem's durable state (:meth:`StepWriter.begin_round`), then each
iteration draws one token per writing row (:meth:`StepWriter.write`)::

    logits -> keyed draw -> forced token?  -> step-end automata -> budget forcing -> writing?
              (philox_key:   (budget forcing's   (delimiter, EOS,    (an early end is
               problem,       phrase, particle    \\boxed{}, token    turned into a wait
               round, slot,   Gibbs' reference    caps)               phrase; a budget
               token)         step)                                   into the end phrase)

and when every live particle of a problem has ended its step, :meth:`StepWriter.end_round`
gives the steps' texts (cut at a stop string).

RowTable of problems of differing step rules draw and stop by their own rules, from one LM-head call.
"""

import numpy as np
import torch

from pf_engine.confidence import step_log_odds, token_values
from pf_engine.philox import philox_key, philox_uniform
from pf_engine.sampling import sample
from pf_engine.state import (
    PARTICLE_STATE,
    PHRASE_END,
    PHRASE_WAIT,
    BudgetForcing,
    Ends,
    Problem,
    Round,
    RowTable,
    StepRules,
)
from pf_engine.step_end import StepEndTables, advance_boxed, token_texts

MAX_RULES = 256  # distinct step rules kept before those of no placed row are dropped


class StepWriter:
    """The row table and what particles write by: their step rules, step-end tables and phrases."""

    def __init__(self, tokenizer, eos_ids: set[int], vocab_size: int):
        self.tokenizer, self.eos_ids, self.vocab_size = tokenizer, eos_ids, vocab_size
        self.table: RowTable | None = None
        self.rules: list[StepRules] = []  # RowTable.rule indexes it: the step rules of every problem placed so far
        self._rule_ids: dict[StepRules, int] = {}
        self._texts: list[str] | None = None
        self._tables: dict[str, StepEndTables] = {}
        self._phrases: dict[str, list[int]] = {}

    def begin(self, hidden_size: int, dtype, device, num_pools: int) -> None:
        """A fresh row table, for a scheduler that starts with nothing placed."""
        self.table = RowTable(hidden_size, dtype, device, num_pools)

    def step_end_tables(self, delimiter: str) -> StepEndTables:
        """The per-token tables for ``delimiter``, built once per writer and delimiter."""
        if delimiter not in self._tables:
            if self._texts is None:
                self._texts = token_texts(self.tokenizer, self.vocab_size)
            self._tables[delimiter] = StepEndTables(self._texts, delimiter, self.eos_ids)
        return self._tables[delimiter]

    def phrase_ids(self, text: str) -> list[int]:
        """The policy's tokens of a forced phrase (cached)."""
        if text not in self._phrases:
            self._phrases[text] = self.tokenizer.encode(text, add_special_tokens=False)
        return self._phrases[text]

    # -- rows of a problem ---------------------------------------------------------
    def take(self, problem: Problem, seq_ids: list[list[int]], hiddens: list[torch.Tensor]) -> None:
        """Give ``problem`` its rows: ``seq_ids[pool][slot]``, ``hiddens[slot]`` (the state its next draw reads)."""
        r = self.table
        rows = r.take(problem.num_particles)
        problem.rows = rows
        r.widen(problem.rules.max_step_tokens)
        r.rule[rows] = self._rule_id(problem.rules)
        for index, seqs in enumerate(seq_ids):
            r.seq_ids[rows, index] = seqs
        r.key[rows] = problem.key
        r.slot[rows] = np.arange(problem.num_particles)
        r.problem[rows] = problem.lane
        r.hidden[torch.from_numpy(rows)] = torch.stack(hiddens)

    def give_back(self, problem: Problem) -> None:
        self.table.give_back(problem.rows)
        problem.rows = None

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
        r = self.table
        placed = np.flatnonzero(r.placed)
        used, r.rule[placed] = np.unique(r.rule[placed], return_inverse=True)
        self.rules = [self.rules[i] for i in used.tolist()]
        self._rule_ids = {rule: i for i, rule in enumerate(self.rules)}
        delimiters = {rule.delimiter for rule in self.rules}
        self._tables = {d: t for d, t in self._tables.items() if d in delimiters}

    def steps_in_flight(self) -> tuple[np.ndarray, np.ndarray]:
        """The steps the writing rows are writing: each one's max_step_tokens and its tokens so far."""
        r = self.table
        writing = np.flatnonzero(r.writing)
        max_step_tokens = np.array([rule.max_step_tokens for rule in self.rules])[r.rule[writing]]
        return max_step_tokens, r.step_len[writing]

    # -- a round ---------------------------------------------------------------------
    def begin_round(self, problem: Problem) -> None:
        """Every live particle of ``problem`` starts writing its next step."""
        problem.committed = None
        r, rows, rules = self.table, problem.rows, problem.rules
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
        r, rows = self.table, problem.rows
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

    def write(self, rows: np.ndarray, logits: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Draw the next token of every writing row from its logits and apply the step-end rules.

        Returns (tokens, feed, stopped): the rows' tokens, which rows go on to the
        model (all but those whose particle finished), and which stopped writing
        (step ended or particle finished).
        """
        rule_of = self.table.rule[rows]
        if (rule_of == rule_of[0]).all():
            return self._write(rows, logits, self.rules[rule_of[0]])
        tokens, feed, stopped = (np.empty(len(rows), dtype=np.int64), np.empty(len(rows), dtype=bool),
                                 np.empty(len(rows), dtype=bool))
        for rule_id in np.unique(rule_of).tolist():
            part = np.flatnonzero(rule_of == rule_id)
            tokens[part], feed[part], stopped[part] = self._write(
                rows[part], logits[torch.from_numpy(part).to(logits.device)], self.rules[rule_id])
        return tokens, feed, stopped

    def _write(self, rows: np.ndarray, logits: torch.Tensor, rules: StepRules):
        r, tables = self.table, self.step_end_tables(rules.delimiter)
        step_len = r.step_len[rows]
        keys = philox_key(r.key[rows], r.round[rows], r.slot[rows], step_len)
        uniforms = philox_uniform(rules.seed, keys)
        tokens = sample(logits, rules.sampling, uniforms=uniforms.to(logits.device)).cpu().numpy()
        forcing = r.forcing[rows]
        prefix = forcing & r.forced_prefix[rows]
        if prefix.any():  # a forced prefix (budget forcing's phrase) replayed whole: the step goes on drawing
            forcing &= ~prefix | (step_len < r.forced_len[rows])
        if forcing.any():
            forced_rows = rows[forcing]
            tokens[forcing] = r.forced_tokens[forced_rows, step_len[forcing]]
        r.tokens[rows, step_len] = tokens
        if rules.signal is not None:  # the policy's confidence in the token, from the logits it was drawn from
            r.values[rows, step_len] = token_values(logits, torch.from_numpy(tokens), rules.signal).cpu().numpy()
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

    def _budget(self, rows: np.ndarray, tokens: np.ndarray, rules: StepRules, ends: Ends) -> None:
        """Budget forcing on the newest token of each row: ``ends`` is changed in place."""
        r, budget = self.table, rules.budget
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

    # -- the end of a round ------------------------------------------------------------
    def end_round(self, problems: list[Problem]) -> Round:
        """The batch of ``problems`` ending a round, with the step each live particle wrote."""
        r = self.table
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
        return Round(problems, steps, log_odds=self._log_odds(problems, stepped))

    def _log_odds(self, problems: list[Problem], stepped: list[list[int]]) -> torch.Tensor | None:
        """float64 [num_problems * N]: the policy's confidence in each stepped particle's step as
        log-odds (pf_engine.confidence; 0 for the others), where the rules measure one."""
        rules = problems[0].rules  # problems of one algorithm measure the same signal
        if rules.signal is None:
            return None
        r, n = self.table, problems[0].num_particles
        out = torch.zeros(len(problems) * n, dtype=torch.float64)
        index = [b * n + s for b, slots in enumerate(stepped) for s in slots]
        if index:
            rows = np.concatenate([p.rows[slots] for p, slots in zip(problems, stepped, strict=True)])
            out[index] = torch.from_numpy(step_log_odds(r.values[rows], r.step_len[rows], rules.signal,
                                                        rules.tail_tokens, self.vocab_size))
        return out

    def _cut_at_stop(self, problem: Problem, slot: int, text: str) -> str:
        """A step's text up to the first of the rules' stop strings, which finishes the particle. A stop
        string may begin in the particle's earlier steps (their last characters are searched too): the
        step's text is then empty and ``rows.stop_trim`` says how much of the earlier text it cuts."""
        cut = self._stop_cut(problem, slot, text)
        if cut is None:
            return text
        row = problem.rows[slot]
        self.table.finished[row], self.table.capped[row] = True, False
        text, self.table.stop_trim[row] = cut
        return text

    @staticmethod
    def _stop_cut(problem: Problem, slot: int, text: str) -> tuple[str, int] | None:
        """Where the first stop string cuts the particle's step ``text``: the text before it and how
        many characters of the earlier steps it takes (None: no stop string)."""
        tail = ""
        node, want = int(problem.leaf[slot]), max(map(len, problem.rules.stop), default=0) - 1
        while node >= 0 and len(tail) < want:
            tail, node = problem.tree[node].text + tail, problem.tree[node].parent
        tail = tail[max(len(tail) - want, 0):] if want > 0 else ""
        searched = tail + text
        at = min((at for at in (searched.find(stop) for stop in problem.rules.stop) if at >= 0), default=-1)
        if at < 0:
            return None
        return text[:max(at - len(tail), 0)], max(len(tail) - at, 0)

    def text_so_far(self, problem: Problem, slot: int) -> str:
        """The particle's whole text with the step it is writing, as the round's end would cut it."""
        row = problem.rows[slot]
        before = "".join(problem.steps(slot))
        step = self.decode([self.table.tokens[row, :self.table.step_len[row]].tolist()])[0]
        cut = self._stop_cut(problem, slot, step) if problem.rules.stop else None
        if cut is None:
            return before + step
        step, trim = cut
        return before[:len(before) - trim] + step

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
