"""``pf-engine serve`` holds to its OpenAPI schema and survives its clients, over loopback sockets:
schemathesis fuzzes every operation against the schema the server serves, and a bounded crowd of
clients, some of them malformed and a third of them leaving mid-request, finds no 5xx, every block
back in the pool and the answers its seeds give."""

import asyncio
import json
import re
import subprocess
import sys
import time

import httpx2 as httpx
import pytest
from conftest import VARYING_VERIFIER
from test_serve import FLAGS, KEY, metric, start_server, stop_server, user

AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_PARTICLES, MAX_MODEL_LEN = 4, 128  # the fuzzed server's limits: no fuzzed body can ask for much work
CHECKS = ["not_a_server_error", "status_code_conformance", "content_type_conformance",
          "response_schema_conformance", "negative_data_rejection", "unsupported_method"]
SEARCHES = ("/v1/chat/completions", "/v1/completions")


@pytest.fixture(scope="module")
def server(policy):
    process, url = start_server(policy, "--verifier", VARYING_VERIFIER, "--api-key", KEY, "--max-particles",
                                str(MAX_PARTICLES), "--max-model-len", str(MAX_MODEL_LEN), *FLAGS)
    yield url
    stop_server(process)


def requests_answered(url: str) -> dict[tuple[str, str], float]:
    """pf_engine_requests_total by (path, status)."""
    text = httpx.get(url + "/metrics", headers=AUTH).text
    return {(path, status): float(value) for path, status, value in
            re.findall(r'^pf_engine_requests_total\{path="([^"]*)",status="(\d+)"\} (\S+)$', text, re.M)}


def wait_until_idle(url: str, seconds: float = 60) -> None:
    """Until the server holds no block and runs and queues no request (cancellations land a moment
    after the client leaves); the caller asserts the state it ends in."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and (metric(url, "pf_engine_kv_blocks_in_use") > 0
                                           or metric(url, "pf_engine_running_requests") > 0
                                           or metric(url, "pf_engine_queue_length") > 0):
        time.sleep(0.05)


def test_the_schema_names_every_status_and_bound(server):
    schema = httpx.get(server + "/openapi.json", headers=AUTH).json()
    for path in SEARCHES:
        responses = schema["paths"][path]["post"]["responses"]
        assert set(responses) == {"200", "400", "401", "404", "429", "500"}, (path, sorted(responses))
        for status in ("400", "401", "404", "429", "500"):
            assert responses[status]["content"] == {
                "application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}, (path, status)
        assert set(responses["200"]["content"]) == {"application/json", "text/event-stream"}, path
    assert set(schema["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}
    assert "422" not in json.dumps(schema) and "HTTPValidationError" not in schema["components"]["schemas"]
    fields = schema["components"]["schemas"]
    assert fields["ChatRequest"]["properties"]["messages"]["minItems"] == 1
    assert fields["ChatRequest"]["properties"]["budget"]["anyOf"][0]["maximum"] == MAX_PARTICLES
    assert fields["CompletionRequest"]["properties"]["max_tokens"]["anyOf"][0]["maximum"] == MAX_MODEL_LEN - 1
    assert fields["CompletionRequest"]["properties"]["prompt"]["anyOf"][0] == {"type": "string", "pattern": r"\S"}


def test_a_wrong_method_is_a_405_naming_the_allowed_ones_and_a_wrong_path_a_404(server):
    answer = httpx.put(server + "/v1/models", headers=AUTH)
    assert answer.status_code == 405 and answer.headers.get("allow") == "GET", (answer.status_code, answer.headers)
    assert answer.json()["error"]["code"] == "405"
    before = requests_answered(server).get(("other", "404"), 0)
    answer = httpx.get(server + "/v1/no-such-path", headers=AUTH)
    assert answer.status_code == 404 and answer.json()["error"]["code"] == "404", answer.text
    answered = requests_answered(server)  # counted under one label, however many paths clients make up
    assert answered[("other", "404")] == before + 1 and not [path for path, _ in answered if "no-such" in path]


def test_schemathesis_finds_the_server_as_its_schema_says(server, tmp_path):
    """Every operation fuzzed, within the schema and outside it (a bounded number of examples, one
    seed): no 5xx, only documented statuses and content types, bodies as documented, every body
    the schema forbids refused, and a 405 with Allow for an undocumented method."""
    command = [sys.executable, "-m", "schemathesis.cli", "run", server + "/openapi.json", "--header",
               f"Authorization: Bearer {KEY}", "--checks", ",".join(CHECKS), "--max-examples", "25", "--seed", "1",
               "--generation-database", "none", "--request-timeout", "60", "--workers", "1", "--no-color"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)  # its cache goes there
    assert run.returncode == 0, f"schemathesis found the server off its schema:\n{run.stdout[-6000:]}{run.stderr}"
    answered = requests_answered(server)
    assert sum(n for (path, status), n in answered.items() if path in SEARCHES and status == "200") > 0, \
        f"no fuzzed search was answered, so no answer was checked against the schema: {answered}"
    wait_until_idle(server)
    assert metric(server, "pf_engine_kv_blocks_in_use") == 0


# -- chaos: a bounded crowd of clients, some malformed, a third leaving mid-request ------------------------
NUM_CLIENTS, REQUESTS_PER_CLIENT = 24, 4
MALFORMED = [b'{"messages": [', b'[1, 2]', json.dumps({"messages": "hi"}).encode(),
             json.dumps({"messages": user("1+1"), "budget": 99}).encode(),
             json.dumps({"messages": [{"role": "robot", "content": "1+1"}]}).encode(),
             json.dumps({"messages": user("1+1"), "search": {"particles": 2}}).encode(),
             json.dumps({"messages": user("1+1"), "stream": 1}).encode()]


@pytest.fixture(scope="module")
def endless_server(tmp_path_factory):
    """A policy that never ends a text: a request runs to its max_tokens, and one without lasts far
    longer than the test (20,000 tokens a particle), so a client that leaves always leaves mid-flight."""
    from tiny import save_tiny_policy

    folder = tmp_path_factory.mktemp("endless")
    save_tiny_policy(folder, eos=False)
    process, url = start_server(folder, "--verifier", VARYING_VERIFIER, "--api-key", KEY, "--particles", "2",
                                "--max-particles", "4", "--max-steps", "400", "--max-step-tokens", "16",
                                "--max-new-tokens", "20000", "--max-model-len", "100000",
                                "--progress-interval", "0.05")
    yield url
    stop_server(process)


def answer_text(path: str, body: dict, answer: httpx.Response) -> str:
    """The first choice's text of a JSON or a streamed answer."""
    if not body.get("stream"):
        choice = answer.json()["choices"][0]
        return choice["message"]["content"] if path.endswith("chat/completions") else choice["text"]
    text = ""
    for line in answer.text.splitlines():
        if line.startswith("data: {"):
            for choice in json.loads(line[6:])["choices"]:
                if choice["index"] == 0:
                    text += choice.get("text") or choice.get("delta", {}).get("content") or ""
    return text


async def leave_mid_flight(url: str, path: str, body: dict) -> None:
    """Send a request over a bare socket and close it while the server works on it: a streamed one
    once its first progress event came, another after a moment."""
    port = int(url.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    data = json.dumps(body).encode()
    writer.write(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
                 f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
    await writer.drain()
    if body["stream"]:
        seen = b""
        while b'"progress"' not in seen:
            seen = await reader.readline()
            assert seen, f"the stream of {body} ended before its first progress event"
    else:
        await asyncio.sleep(0.3)
    writer.close()
    await writer.wait_closed()


def test_a_crowd_of_clients_some_leaving_some_malformed(endless_server):
    """96 requests from 24 clients at once; a third of the clients leave each request mid-flight
    (streamed and not), others send malformed bodies among their searches. No 5xx, every client that
    left counted 499 (non-streamed) or cancelled, no block held afterwards, and completed answers come
    again from their seeds."""
    url = endless_server
    before = requests_answered(url)
    completed: list[tuple[str, dict, str]] = []  # (path, body, the first choice's text)
    left_unstreamed = 0

    async def client(i: int, http: httpx.AsyncClient) -> None:
        nonlocal left_unstreamed
        for j in range(REQUESTS_PER_CLIENT):
            path = SEARCHES[(i + j) % 2]
            prompt = {"messages": user(f"{i}+{j}=?")} if path == SEARCHES[0] else {"prompt": f"{i}+{j}="}
            if i % 3 == 0:
                stream = j % 2 == 0
                left_unstreamed += not stream
                await leave_mid_flight(url, path, prompt | {"stream": stream, "seed": i * 10 + j})
            elif j == 3:
                body = MALFORMED[i % len(MALFORMED)]
                answer = await http.post(url + SEARCHES[0], content=body,
                                         headers=AUTH | {"Content-Type": "application/json"})
                assert answer.status_code == 400, (body, answer.text)
            else:
                body = prompt | {"seed": i * 10 + j, "max_tokens": 12, "stream": (i + j) % 3 == 0}
                answer = await http.post(url + path, json=body, headers=AUTH)
                assert answer.status_code == 200, (body, answer.text)
                completed.append((path, body, answer_text(path, body, answer)))

    async def crowd():
        async with httpx.AsyncClient(timeout=120) as http:
            await asyncio.wait_for(asyncio.gather(*(client(i, http) for i in range(NUM_CLIENTS))), timeout=300)

    asyncio.run(crowd())
    wait_until_idle(url)
    assert metric(url, "pf_engine_kv_blocks_in_use") == 0
    assert metric(url, "pf_engine_running_requests") == 0 and metric(url, "pf_engine_queue_length") == 0
    peak = re.search(r'^pf_engine_kv_blocks_peak\{pool="policy",sharing="shared"\} (\S+)$',
                     httpx.get(url + "/metrics", headers=AUTH).text, re.M)
    assert peak and float(peak.group(1)) > 0, "the pool's peak since start-up is missing from /metrics"
    answered = requests_answered(url)
    new = {key: n - before.get(key, 0) for key, n in answered.items() if n > before.get(key, 0)}
    assert not [key for key in new if key[1].startswith("5")], f"the server answered 5xx: {new}"
    assert left_unstreamed == 16 and len(completed) == 48
    assert sum(n for (path, status), n in new.items() if status == "499") == left_unstreamed, \
        f"each client that left a request it did not stream is counted 499: {new}"
    for path, body, text in completed[:: len(completed) // 4]:  # a few again, alone: the seed gives the answer
        answer = httpx.post(url + path, json=body, headers=AUTH, timeout=120)
        assert answer.status_code == 200 and answer_text(path, body, answer) == text, (body, answer.text[-300:])
