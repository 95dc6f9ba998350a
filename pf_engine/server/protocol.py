"""OpenAI's wire format for pf_engine: request bodies (pydantic, so FastAPI serves their schema), their
checks against the server's limits, and the response and chunk bodies built from a Result (their
pydantic models, for the schema alone, are in pf_engine.server.schema).

A request's search is the server's default SearchConfig with the body's ``search`` fields over it,
then the standard fields (``temperature``, ``top_p``, ``max_tokens``, ``seed``, ``stop``) and its_hub's
``budget`` (the number of particles; also the ``X-ITS-Budget`` header). A field given two ways with two
values is refused rather than one silently winning.
"""

import re
import secrets
import time
import uuid
from dataclasses import dataclass, fields, replace
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from pf_engine.api import Result
from pf_engine.search import SearchConfig
from pf_engine.search.config import MAX_STOP_STRINGS

SEARCH_FIELDS = {f.name for f in fields(SearchConfig)}
# OpenAI fields pf_engine cannot honour: refused when set to anything but their neutral value
UNSUPPORTED = {"logprobs": (None, False), "top_logprobs": (None, 0), "tools": (None, []), "tool_choice": (None, "none"),
               "response_format": (None, {"type": "text"}), "presence_penalty": (None, 0, 0.0),
               "frequency_penalty": (None, 0, 0.0), "logit_bias": (None, {}), "echo": (None, False),
               "best_of": (None, 1), "suffix": (None, "")}


class RequestError(Exception):
    """A request the server refuses, in OpenAI's error shape."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.kind = message, param, status, kind
        self.code = code or {400: "invalid_value", 401: "invalid_api_key", 404: "model_not_found",
                             429: "queue_full"}.get(status, "internal_error")

    def body(self) -> dict:
        return error_body(self.message, self.kind, self.param, self.code)


def error_body(message: str, kind: str, param: str | None, code: str | None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# strict: a value of another JSON type than the schema's is refused, not converted ("2" for 2, 1 for true)
STRICT = ConfigDict(strict=True)


class StreamOptions(BaseModel):
    model_config = STRICT

    include_usage: bool = False


class _Request(BaseModel):
    model_config = STRICT | ConfigDict(extra="allow")  # other OpenAI fields are read (UNSUPPORTED) or ignored

    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    budget: int | None = Field(None, description="its_hub: the number of particles")
    search: dict | None = Field(None, description="SearchConfig fields, e.g. {\"algorithm\": \"particle_filter\", "
                                                  "\"num_particles\": 16}")
    return_tree: bool = Field(False, description="add the search tree (every step of every particle) to the answer")


class ChatMessage(BaseModel):
    model_config = STRICT

    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(_Request):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"messages": [{"role": "user", "content": "What is 2+3?"}], "seed": 1, "n": 2},
        {"messages": [{"role": "user", "content": "Add 4 and 5."}], "stream": True, "return_tree": True,
         "stream_options": {"include_usage": True}}]})

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None


class CompletionRequest(_Request):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"prompt": "2+2=", "max_tokens": 20, "return_tree": True},
        {"prompt": "2+2=", "stream": True, "stream_options": {"include_usage": True}}]})

    prompt: str | list[str]


@dataclass(frozen=True)
class Limits:
    """What the server accepts (``pf-engine serve`` flags)."""

    model_name: str
    defaults: SearchConfig
    max_particles: int
    max_model_len: int


@dataclass
class Job:
    """A checked request, ready for the engine."""

    item: dict  # the problem as Engine.problem takes it: {"messages": ...} or {"prompt": ...}
    config: SearchConfig
    n: int
    stream: bool
    include_usage: bool
    return_tree: bool
    chat: bool
    id: str
    created: int


def parse(request: _Request, limits: Limits, budget_header: str | None) -> Job:
    """The job a request asks for; RequestError naming the field for anything wrong."""
    _check_supported(request, limits)
    search = _search_fields(request)
    chat = isinstance(request, ChatRequest)
    standard = _standard_fields(request, chat, budget_header)
    config = _config(search, standard, limits)
    if not 1 <= request.n <= config.num_particles:
        raise RequestError(f"n must be in [1, num_particles = {config.num_particles}], got {request.n}", "n")
    return Job(item=_item(request, chat), config=config, n=request.n, stream=request.stream,
               include_usage=bool(request.stream_options and request.stream_options.include_usage),
               return_tree=request.return_tree, chat=chat,
               id=("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex, created=int(time.time()))


def _check_supported(request: _Request, limits: Limits) -> None:
    """Refuses OpenAI's fields pf_engine cannot honour, and a model other than the one served (404)."""
    for name, neutral in UNSUPPORTED.items():
        if (request.model_extra or {}).get(name) not in neutral:
            raise RequestError(f"{name} is not supported by pf_engine", name)
    if request.model is not None and request.model != limits.model_name:
        raise RequestError(f"the model `{request.model}` does not exist: this server serves `{limits.model_name}`",
                           "model", status=404)


def _search_fields(request: _Request) -> dict:
    """The body's ``search`` object, once each of its keys is a SearchConfig field."""
    search = dict(request.search or {})
    unknown = sorted(set(search) - SEARCH_FIELDS)
    if unknown:
        raise RequestError(f"unknown search option {unknown[0]!r}; the options are {', '.join(sorted(SEARCH_FIELDS))}",
                           f"search.{unknown[0]}")
    return search


def _standard_fields(request: _Request, chat: bool, budget_header: str | None) -> dict[str, tuple]:
    """SearchConfig field -> (the request field that sets it, its value or None) for the standard fields
    and its_hub's budget; a field given two ways (max_completion_tokens, X-ITS-Budget) must agree."""
    max_tokens = request.max_tokens
    if chat and request.max_completion_tokens is not None:
        max_tokens = _same("max_completion_tokens", request.max_completion_tokens, "max_tokens", max_tokens)
    budget = request.budget
    if budget_header is not None:
        if not re.fullmatch(r"-?[0-9]+", budget_header):  # int() would also take " 8", "+8" and "8_0"
            raise RequestError(f"X-ITS-Budget must be an int, got {budget_header!r}", "X-ITS-Budget")
        budget = _same("X-ITS-Budget", int(budget_header), "budget", budget)
    stop = [request.stop] if isinstance(request.stop, str) else request.stop
    return {"temperature": ("temperature", request.temperature), "top_p": ("top_p", request.top_p),
            "max_new_tokens": ("max_tokens", max_tokens), "seed": ("seed", request.seed),
            "stop": ("stop", None if stop is None else tuple(stop)),
            "num_particles": ("budget", budget)}


def _config(search: dict, standard: dict[str, tuple], limits: Limits) -> SearchConfig:
    """The server's default SearchConfig with the ``search`` fields, then the standard ones, over it."""
    for option, (name, value) in standard.items():
        if value is not None:
            search[option] = _same(name, value, f"search.{option}", search.get(option))
    if "seed" not in search:  # as OpenAI: no seed, a new draw each time (usage.pf_engine.seed tells it)
        search["seed"] = secrets.randbits(62)
    try:
        config = replace(limits.defaults, **search)
    except ValueError as exc:
        raise RequestError(str(exc), _param(str(exc), standard)) from None
    if config.num_particles > limits.max_particles:
        raise RequestError(f"num_particles {config.num_particles} is above this server's maximum of "
                           f"{limits.max_particles} (pf-engine serve --max-particles)",
                           "budget" if standard["num_particles"][1] is not None else "search.num_particles")
    return config


def _item(request: _Request, chat: bool) -> dict:
    """The problem as Engine.problem takes it: {"messages": ...} or {"prompt": ...} (one prompt)."""
    if chat:
        return {"messages": [m.model_dump() for m in request.messages]}
    prompts = [request.prompt] if isinstance(request.prompt, str) else request.prompt
    if len(prompts) != 1:
        raise RequestError(f"prompt must be one string per request, got a list of {len(prompts)}", "prompt")
    return {"prompt": prompts[0]}


def check_length(job: Job, prompt_tokens: int, limits: Limits) -> None:
    if prompt_tokens + job.config.max_new_tokens > limits.max_model_len:
        param = "messages" if job.chat else "prompt"
        if prompt_tokens < limits.max_model_len:
            param = "max_tokens"
        raise RequestError(f"this model's maximum context length is {limits.max_model_len} tokens; the prompt has "
                           f"{prompt_tokens} and max_tokens asks for {job.config.max_new_tokens} more", param)


def bounds(limits: Limits) -> dict[str, dict]:
    """What the checks here, SearchConfig's and Engine.problem's refuse, as JSON Schema of each request
    field they bound (the server's OpenAPI schema shows it). A body within them may still be refused:
    a prompt too long for max_tokens, n above the particles, a conversation with no user turn."""
    particles = {"type": "integer", "minimum": 1, "maximum": limits.max_particles}
    tokens = {"type": "integer", "minimum": 1, "maximum": limits.max_model_len - 1}  # a prompt has a token
    text = {"type": "string", "pattern": r"\S"}  # Engine.problem refuses a prompt of whitespace alone
    return {"model": {"type": "string", "enum": [limits.model_name]},  # any other is a 404
            "temperature": {"type": "number", "exclusiveMinimum": 0},
            "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
            "max_tokens": tokens, "max_completion_tokens": tokens, "n": particles, "budget": particles,
            "seed": {"type": "integer", "minimum": 0, "maximum": 2**62 - 1},
            "stop": {"anyOf": [{"type": "string", "minLength": 1},
                               {"type": "array", "items": {"type": "string", "minLength": 1},
                                "maxItems": MAX_STOP_STRINGS}]},
            "prompt": {"anyOf": [text, {"type": "array", "items": text, "minItems": 1, "maxItems": 1}]}}


def _same(name: str, value, other: str, other_value):
    if other_value is not None and other_value != value:
        raise RequestError(f"{name} ({value!r}) and {other} ({other_value!r}) disagree: give one", name)
    return value


def _param(message: str, standard: dict) -> str:
    """The request field a SearchConfig error names (the config's errors start with the option)."""
    option = next((w for w in re.findall(r"\w+", message) if w in SEARCH_FIELDS), None)
    if option in standard:
        return standard[option][0]
    return "search" if option is None else f"search.{option}"


def choices(result: Result, n: int) -> list[int]:
    """The particles returned: the chosen answer first, then the others by weight."""
    order = sorted(range(len(result.particles)), key=lambda i: (i != result.chosen, -result.weights[i], i))
    return order[:n]


def usage(job: Job, result: Result, prompt_tokens: int) -> dict:
    completion = sum(result.num_tokens[i] for i in choices(result, job.n))
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion,
            "pf_engine": {"generated_tokens": result.stats["tokens_generated"],
                          "prm_tokens": result.stats["prm_tokens"], "particles": len(result.particles),
                          "steps": len(result.steps), "seed": job.config.seed, "answer": result.answer}}


def response(job: Job, result: Result, prompt_tokens: int, model: str) -> dict:
    body = {"id": job.id, "object": "chat.completion" if job.chat else "text_completion", "created": job.created,
            "model": model, "choices": [], "usage": usage(job, result, prompt_tokens)}
    for index, particle in enumerate(choices(result, job.n)):
        text, reason = result.particles[particle], result.finish_reasons[particle]
        if job.chat:
            body["choices"].append({"index": index, "message": {"role": "assistant", "content": text},
                                    "finish_reason": reason, "logprobs": None})
        else:
            body["choices"].append({"index": index, "text": text, "finish_reason": reason, "logprobs": None})
    if job.return_tree:
        body["pf_engine"] = {"tree": result.tree_records(), "leaves": result.leaves, "chosen": result.chosen}
    return body


def chunk(job: Job, model: str, index: int | None = None, text: str | None = None, reason: str | None = None,
          **extra) -> dict:
    """One streamed chunk: a piece of choice ``index``'s text, its end (``reason``), or (``index`` None) a
    chunk with no choices (usage)."""
    body = {"id": job.id, "object": "chat.completion.chunk" if job.chat else "text_completion",
            "created": job.created, "model": model, "choices": []}
    if index is not None:
        if job.chat:
            body["choices"].append({"index": index, "delta": {} if text is None else {"content": text},
                                    "finish_reason": reason, "logprobs": None})
        else:
            body["choices"].append({"index": index, "text": text or "", "finish_reason": reason, "logprobs": None})
    return body | extra
