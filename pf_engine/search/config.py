"""What a search does: one frozen, self-validating config."""

import types
import typing
from dataclasses import dataclass, fields

from pf_engine.confidence import SIGNALS, Weighting
from pf_engine.philox import MAX_ROUNDS, MAX_STEP_TOKENS
from pf_engine.resample import SCHEMES, ResampleParams
from pf_engine.sampling import SamplingParams
from pf_engine.search.registry import ALGORITHMS
from pf_engine.state import BudgetForcing, StepRules
from pf_engine.votes import CONFIDENCE_VOTES, DEFAULT_THRESHOLDS, EARLY_STOPS, VOTES

FINAL_ANSWERS = ("best", "sampled", "vote", "outcome")
# The step-end tables take (vocabulary x delimiter length) entries; a server takes these from requests.
MAX_DELIMITER_CHARS = 64
MAX_STOP_STRINGS = 16
MAX_PARTICLES = 1024  # of one problem (the random streams' slot field holds pf_engine.philox.MAX_SLOTS)


@dataclass(frozen=True, slots=True)
class SearchConfig:
    """A search over reasoning steps.

    Steps end at ``step_delimiter`` (found in the decoded text, also inside a
    token: the text that token carries after the delimiter stays in the step,
    since the KV cache holds whole tokens), at EOS, after ``max_step_tokens``
    tokens, or, with
    ``stop_at_boxed``, once a ``\\boxed{...}`` answer is complete (which also
    finishes the particle). A particle finishes at EOS, at a boxed answer, or
    after ``max_new_tokens`` tokens or ``max_steps`` steps. Weights are
    ``softmax(logit(aggregate) / weight_temperature)`` per problem (see
    pf_engine.resample). Beam search keeps the ``num_particles //
    beam_width`` best particles of a problem and extends each ``beam_width``
    ways; DVTS splits the particles into subtrees of ``beam_width`` and keeps
    the best of each subtree.

    Particle Gibbs runs ``iterations`` sweeps of particle filtering; from the
    second on, slot 0 of each problem replays a reference path drawn by weight
    from the previous sweep's final particles (conditional SMC), and the other
    particles draw their ancestors by multinomial resampling whatever
    ``scheme`` says (a draw that keeps the reference out must be independent
    per particle). With ``ancestor_sampling`` the reference's ancestor is
    redrawn after every step among the live particles, each weighed by its
    weight, the likelihood of the reference's remaining steps after its prefix
    and the weights those spliced steps would get (this costs a prefill of the
    reference's future per particle and step); it assumes resampling every step
    (``ess_threshold`` None), and the rounds a finished reference would still
    weigh in are left out. The answer comes from the last sweep.

    ``stop``: strings that end a particle where its text first holds one (OpenAI's ``stop``).
    They are looked for in each step's text when the step ends, together with the end
    of the particle's earlier steps (a string may span two steps), and the text is cut
    before the string; the tokens after it in that step are drawn and dropped. The tree
    keeps earlier steps whole: the node where the string ends says in ``trim`` how many
    of their characters ``Result.text`` and ``Result.steps_of`` leave out.

    ``budget_forcing`` (pf_engine.state.BudgetForcing, or a dict of its fields) makes thinking
    particles go on past an early end with a wait phrase, and end at a budget, for every
    algorithm (particle filtering with it is the authors' "Gibbs with But wait").

    ``system_prompt`` goes before the question as a system turn of the policy's chat template
    (``pf_engine.prompts.PROMPT_PRESETS`` holds the paper's).
    """

    algorithm: str = "particle_filter"
    """The search: particle_filter, entropic_particle_filter, particle_gibbs, best_of_n, beam_search, dvts or
    self_consistency."""
    num_particles: int = 8
    """Particles (partial answers) per problem."""
    max_steps: int = 32
    """A particle finishes after this many steps."""
    max_step_tokens: int = 256
    """A step ends after this many tokens."""
    max_new_tokens: int = 1024
    """A particle finishes after this many tokens."""
    step_delimiter: str = "\n\n"
    """The text that ends a step."""
    stop_at_boxed: bool = True
    """A complete \\boxed{...} answer ends its step and finishes the particle."""
    temperature: float = 0.8
    """The policy's sampling temperature."""
    top_p: float = 1.0
    """Nucleus sampling: draw from the smallest set of tokens holding this much probability."""
    top_k: int = 0
    """Draw from the k likeliest tokens only (0: all)."""
    aggregation: str = "last"
    """How a particle's step rewards make its score: last, min, product or mean."""
    scheme: str = "systematic"
    """Resampling: systematic, stratified, multinomial or residual."""
    weight_temperature: float = 1.0
    """Weights are softmax(logit(score) / weight_temperature) within a problem."""
    ess_threshold: float | None = None
    """Adaptive resampling: resample only when the effective sample size is below this fraction of the
    particles (None: after every step)."""
    final_answer: str = "best"
    """The answer: best (highest weight), sampled (drawn by weight), vote (weighted vote over answers) or outcome
    (the outcome reward model's best)."""
    beam_width: int = 4
    """beam_search: ways each kept beam is extended; dvts: particles per subtree."""
    iterations: int = 4
    """particle_gibbs: sweeps."""
    ancestor_sampling: bool = False
    """particle_gibbs: redraw the reference's ancestor after every step."""
    annealing: str = "ess"
    """entropic_particle_filter: the annealing temperature's schedule: ess, entropy or base."""
    annealing_threshold: float = 0.5
    """entropic_particle_filter: anneal a round whose effective sample size is below this fraction of the particles."""
    annealing_phase: float = 0.5
    """entropic_particle_filter: anneal only in this first fraction of max_steps."""
    annealing_max_temperature: float = 2.0
    """entropic_particle_filter: the base schedule's temperature at the start (it falls to 1 over the search)."""
    weights: str = "prm"
    """What a step's reward is: prm; the policy's own confidence in the step, self_certainty, mean_logprob or
    tail_entropy (no PRM needed); or prm*NAME, the PRM's weight times the confidence's (pf_engine.confidence)."""
    signal_exponent: float = 1.0
    """weights other than prm: the confidence's weight is raised to this power."""
    tail_tokens: int = 64
    """weights tail_entropy: the entropy is averaged over the step's last this many tokens."""
    vote: str = "majority"
    """self_consistency's answer: majority; weighted, each particle's vote weighing its confidence over its whole
    answer by weights (DeepConf-style); or confidence_selection, the most confident particle's (pf_engine.votes)."""
    early_stop: str = "none"
    """self_consistency and best_of_n: stop once the finished particles' answers agree, cancelling the others: adaptive
    (a supermajority of the first 2, 4, 8, ... particles) or beta (a Beta-posterior threshold) (pf_engine.votes)."""
    early_stop_threshold: float | None = None
    """early_stop: adaptive's supermajority share (None: 0.75) or beta's posterior probability (None: 0.95), in
    (0.5, 1]."""
    seed: int = 0
    """The random streams' seed: the same seed gives the same draws."""
    system_prompt: str | None = None
    """A system turn before each problem in the policy's prompt."""
    stop: tuple[str, ...] = ()
    """Strings that end a particle where its text holds one; the text is cut before it."""
    budget_forcing: BudgetForcing | None = None
    """Make thinking particles go on past an early end with a wait phrase, and end at a budget: the options of
    pf_engine.BudgetForcing (min_continuations, min_tokens, max_tokens, wait_phrase, end_phrase)."""

    def __post_init__(self):
        self._coerce()
        self._check_names()
        self._check_sizes()
        ALGORITHMS[self.algorithm].check(self)
        self._check_weights()
        self._check_votes()
        self._check_sweeps()
        self._check_texts()
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**62:
            raise ValueError(f"seed must be in [0, 2**62), got {self.seed}")
        _ = self.sampling  # validates top_p and top_k
        self.resample_params("reward")  # validates aggregation, scheme, weight_temperature, ess_threshold

    def _coerce(self) -> None:
        """Budget forcing given as a dict becomes BudgetForcing; every field has its annotated type."""
        if isinstance(self.budget_forcing, dict):
            unknown = sorted(set(self.budget_forcing) - set(BudgetForcing.__dataclass_fields__))
            if unknown:
                raise ValueError(f"budget_forcing: unknown option {unknown[0]!r}; the options are "
                                 f"{', '.join(BudgetForcing.__dataclass_fields__)}")
            object.__setattr__(self, "budget_forcing", BudgetForcing(**self.budget_forcing))
        for f in fields(self):
            _check_type(f.name, getattr(self, f.name), f.type)

    def _check_names(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"unknown algorithm {self.algorithm!r}; choose one of {', '.join(ALGORITHMS)}")
        if self.final_answer not in FINAL_ANSWERS:
            raise ValueError(f"unknown final_answer {self.final_answer!r}; choose one of {', '.join(FINAL_ANSWERS)}")

    def _check_sizes(self) -> None:
        if not isinstance(self.num_particles, int) or not 1 <= self.num_particles <= MAX_PARTICLES:
            raise ValueError(f"num_particles must be an int in [1, {MAX_PARTICLES}], got {self.num_particles!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 (particles must differ), got {self.temperature}")
        if not 1 <= self.max_step_tokens <= MAX_STEP_TOKENS:
            raise ValueError(f"max_step_tokens must be in [1, {MAX_STEP_TOKENS}], got {self.max_step_tokens}")
        for name in ("max_steps", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def _check_weights(self) -> None:
        weighting = self.weighting  # validates weights and signal_exponent
        if weighting.signal is None:
            return
        if not ALGORITHMS[self.algorithm].scores and self.vote not in CONFIDENCE_VOTES:
            raise ValueError(f"{self.algorithm} weighs no particle: weights {self.weights!r} needs an algorithm that "
                             f"scores steps, or vote {' or '.join(CONFIDENCE_VOTES)}")
        if self.algorithm == "particle_gibbs" and self.ancestor_sampling:
            raise ValueError("ancestor_sampling weighs spliced steps by the PRM alone: use weights 'prm' with it")
        if not isinstance(self.tail_tokens, int) or self.tail_tokens < 1:
            raise ValueError(f"tail_tokens must be an int >= 1, got {self.tail_tokens!r}")

    def _check_votes(self) -> None:
        algorithm = ALGORITHMS[self.algorithm]
        if self.vote not in VOTES:
            raise ValueError(f"unknown vote {self.vote!r}; choose one of {', '.join(VOTES)}")
        if self.early_stop not in EARLY_STOPS:
            raise ValueError(f"unknown early_stop {self.early_stop!r}; choose one of {', '.join(EARLY_STOPS)}")
        if self.vote in CONFIDENCE_VOTES and not algorithm.votes:
            raise ValueError(f"vote {self.vote!r} is self_consistency's, not {self.algorithm}'s")
        if self.vote in CONFIDENCE_VOTES and self.weighting.signal is None:
            raise ValueError(f"vote {self.vote!r} weighs each answer by the policy's confidence: set weights to one of "
                             f"{', '.join(SIGNALS)}")
        if self.early_stop != "none" and not algorithm.stops_early:
            raise ValueError(f"early_stop is for self_consistency and best_of_n, not {self.algorithm}")
        threshold = self.early_stop_threshold
        if threshold is not None and not (isinstance(threshold, int | float) and 0.5 < threshold <= 1):
            raise ValueError(f"early_stop_threshold must be in (0.5, 1], got {threshold!r}")

    @property
    def stop_threshold(self) -> float:
        """early_stop's threshold, the rule's default where none is set."""
        return DEFAULT_THRESHOLDS.get(self.early_stop, 1.0) if self.early_stop_threshold is None \
            else self.early_stop_threshold

    def _check_sweeps(self) -> None:
        if self.scheme not in SCHEMES:  # particle Gibbs does not pass it on, so check it here
            raise ValueError(f"unknown scheme {self.scheme!r}; choose one of {', '.join(SCHEMES)}")
        if not isinstance(self.iterations, int) or self.iterations < 1:
            raise ValueError(f"iterations must be an int >= 1, got {self.iterations!r}")
        if self.iterations * self.max_steps > MAX_ROUNDS:
            raise ValueError(f"iterations * max_steps must be <= {MAX_ROUNDS}, got {self.iterations * self.max_steps}")
        if self.ancestor_sampling and self.ess_threshold is not None:
            raise ValueError("ancestor_sampling assumes resampling after every step: leave ess_threshold None")

    def _check_texts(self) -> None:
        if not 1 <= len(self.step_delimiter) <= MAX_DELIMITER_CHARS:
            raise ValueError(f"step_delimiter must be a non-empty string of at most {MAX_DELIMITER_CHARS} characters")
        if self.system_prompt is not None and not isinstance(self.system_prompt, str):
            raise ValueError(f"system_prompt must be a string or None, got {type(self.system_prompt).__name__}")
        if isinstance(self.stop, str) or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be a list of non-empty strings, got {self.stop!r}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(f"stop may hold at most {MAX_STOP_STRINGS} strings, got {len(self.stop)}")
        object.__setattr__(self, "stop", tuple(self.stop))
        forcing = self.budget_forcing
        if forcing is not None and any(self.step_delimiter in phrase for phrase in (
                forcing.wait_phrase, *((forcing.end_phrase,) if forcing.max_tokens is not None else ()))):
            raise ValueError("budget_forcing: a forced phrase must not hold step_delimiter (it would end its step)")

    @property
    def weighting(self) -> Weighting:
        return Weighting.parse(self.weights, self.signal_exponent)

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)

    def resample_params(self, reward_kind: str) -> ResampleParams:
        scheme = ALGORITHMS[self.algorithm].scheme(self)
        return ResampleParams(reward=reward_kind, aggregation=self.aggregation, temperature=self.weight_temperature,
                              scheme=scheme, ess_threshold=self.ess_threshold)

    def step_rules(self, seed: int | None = None) -> StepRules:
        """How particles write their steps, as the engine takes it (drawing with ``seed``, default the config's)."""
        return StepRules(sampling=self.sampling, seed=self.seed if seed is None else seed, max_steps=self.max_steps,
                         max_step_tokens=self.max_step_tokens, max_new_tokens=self.max_new_tokens,
                         stop_at_boxed=self.stop_at_boxed, delimiter=self.step_delimiter, stop=self.stop,
                         budget=self.budget_forcing, signal=self.weighting.signal, tail_tokens=self.tail_tokens)



def field_docs(cls) -> dict[str, str]:
    """The docstring under each field of dataclass ``cls`` (the string literal that follows it), one line each."""
    import ast
    import inspect
    import textwrap

    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    return {field.target.id: " ".join(doc.value.value.split())
            for field, doc in zip(body, body[1:], strict=False)
            if isinstance(field, ast.AnnAssign) and isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant)
            and isinstance(doc.value.value, str)}


_TYPE_NAMES = {BudgetForcing: "an object of budget forcing options", int: "an int", float: "a number",
               str: "a string", bool: "true or false", tuple: "a list of strings", type(None): "null"}


def field_types(annotation) -> tuple[type, ...]:
    """The types a field's annotation allows: a union's members, a generic as its origin (``tuple``)."""
    allowed = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    return tuple(typing.get_origin(a) or a for a in allowed)


def _check_type(name: str, value, annotation) -> None:
    """ValueError unless ``value`` is of the field's annotated type (an int passes for a float, a list
    for a tuple; a bool passes only for a bool)."""
    allowed = field_types(annotation)
    if isinstance(value, bool) and bool not in allowed:
        ok = False
    else:
        ok = isinstance(value, allowed + ((int,) if float in allowed else ()) + ((list,) if tuple in allowed else ()))
    if not ok:
        names = " or ".join(_TYPE_NAMES.get(a, a.__name__) for a in allowed)
        raise ValueError(f"{name} must be {names}, got {value!r}")
