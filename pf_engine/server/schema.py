"""The server's OpenAPI schema: pydantic models of the response and chunk bodies (the server builds them
as dicts in pf_engine.server.protocol; these say their shape), the error statuses each endpoint
answers, and FastAPI's schema post-processed to say what the server does."""

from typing import Literal

from pydantic import BaseModel, Field
from pydantic.json_schema import models_json_schema

from pf_engine.server.protocol import Limits, bounds

REFS = "#/components/schemas/"
ERRORS = {400: "the request is refused: the message says why, param names the field",
          401: "no valid API key (pf-engine serve --api-key): Authorization: Bearer KEY",
          404: "the model named is not the one served", 429: "the queue is full (--max-queue): try again later",
          500: "the engine failed on this request (a PRM callable that raised); the server goes on"}


class ErrorDetail(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error, authentication_error, rate_limit_error or server_error")
    param: str | None = Field(description="the request field at fault, as a dotted path")
    code: str | None


class ErrorResponse(BaseModel):
    """OpenAI's error body, which every refusal carries."""

    error: ErrorDetail


class EngineUsage(BaseModel):
    """This request's own search. The KV pool is shared by every request in flight: its block counts
    and peaks are the server's, on /metrics."""

    generated_tokens: int = Field(description="tokens drawn, every particle's")
    prm_tokens: int = Field(description="tokens a model PRM read")
    particles: int
    steps: int = Field(description="the chosen answer's steps")
    seed: int = Field(description="the seed drawn with: the same request and seed give the same answer")
    answer: str | None = Field(description="the chosen answer's final answer (last \\boxed{...}, else last number)")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = Field(description="the tokens of the choices returned")
    total_tokens: int
    pf_engine: EngineUsage


class Tree(BaseModel):
    tree: list[dict] = Field(description="every step of every particle (Result.tree_records)")
    leaves: list[int]
    chosen: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class _Choice(BaseModel):
    index: int
    finish_reason: Literal["stop", "length"]
    logprobs: None


class ChatChoice(_Choice):
    message: AssistantMessage


class CompletionChoice(_Choice):
    text: str


class _Answer(BaseModel):
    id: str
    created: int
    model: str
    usage: Usage
    pf_engine: Tree | None = Field(None, description="with return_tree")


class ChatCompletion(_Answer):
    """The answer (stream: false); with stream: true, server-sent events of chat.completion.chunk bodies."""

    object: Literal["chat.completion"]
    choices: list[ChatChoice]


class Completion(_Answer):
    """The answer (stream: false); with stream: true, server-sent events of text_completion bodies."""

    object: Literal["text_completion"]
    choices: list[CompletionChoice]


class Progress(BaseModel):
    state: Literal["waiting", "running"]
    step: int
    sweep: int
    live_particles: int


class StreamExtra(BaseModel):
    progress: Progress | None = Field(None, description="sent while the search runs")
    tree: list[dict] | None = Field(None, description="with return_tree, after the choices")


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    finish_reason: Literal["stop", "length"] | None
    logprobs: None


class CompletionChunkChoice(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length"] | None
    logprobs: None


class _Chunk(BaseModel):
    id: str
    created: int
    model: str
    usage: Usage | None = Field(None, description="with stream_options.include_usage, in a chunk of no choices")
    pf_engine: StreamExtra | None = None


class ChatChunk(_Chunk):
    object: Literal["chat.completion.chunk"]
    choices: list[ChatChunkChoice]


class CompletionChunk(_Chunk):
    object: Literal["text_completion"]
    choices: list[CompletionChunkChoice]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok"]


def errors(*statuses: int) -> dict:
    return {status: {"model": ErrorResponse, "description": ERRORS[status]} for status in statuses}


def event_stream(chunk) -> dict:
    """A streamed answer (stream: true): server-sent events, each a ``chunk`` as JSON (or an error, where
    the engine fails), then [DONE]."""
    data = {"type": "string", "contentMediaType": "application/json", "contentSchema": {"anyOf": [
        {"$ref": f"{REFS}{chunk.__name__}"}, {"$ref": f"{REFS}ErrorResponse"}]}}
    return {"text/event-stream": {"itemSchema": {"type": "object", "required": ["data"],
                                                 "properties": {"data": {"anyOf": [{"const": "[DONE]"}, data]}}}}}


def document(schema: dict, limits: Limits, keyed: bool) -> None:
    """FastAPI's schema made to say what the server does: no 422 (a body it cannot read is a 400, in
    OpenAI's shape), the bounds each request field is checked against, and the API key where one is asked."""
    components = schema["components"]
    for name in ("HTTPValidationError", "ValidationError"):
        components["schemas"].pop(name, None)
    _, chunks = models_json_schema([(ChatChunk, "serialization"), (CompletionChunk, "serialization")],
                                   ref_template=REFS + "{model}")
    components["schemas"] |= chunks["$defs"]
    for model in ("ChatRequest", "CompletionRequest"):
        properties = components["schemas"][model]["properties"]
        for name, bound in bounds(limits).items():
            if name in properties:
                field = properties[name]
                nullable = {"type": "null"} in field.get("anyOf", ())
                properties[name] = {k: field[k] for k in ("title", "description", "default") if k in field} | (
                    {"anyOf": [bound, {"type": "null"}]} if nullable else bound)
    for path, operations in schema["paths"].items():
        for operation in operations.values():
            operation["responses"].pop("422", None)
            if keyed and path != "/health":
                operation["security"] = [{"api_key": []}]
    if keyed:
        components["securitySchemes"] = {"api_key": {"type": "http", "scheme": "bearer"}}
