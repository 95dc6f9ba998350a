"""``pf-engine serve`` over loopback sockets, driven by the official ``openai`` client: answers equal
``Engine.solve`` offline under the same seed, streaming, its_hub's budget, every refusal in OpenAI's
error shape, cancellation by a client that goes away, and a bounded load of concurrent clients."""

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx2 as httpx
import openai
import pytest
from conftest import TESTS_PYTHONPATH, VARYING_VERIFIER, assert_resampled, varying_reward

from pf_engine import Engine, SearchConfig

KEY = "test-key"
# the server's defaults, as flags and as the SearchConfig they make
DEFAULTS = dict(num_particles=4, max_steps=5, max_step_tokens=8, max_new_tokens=40)
FLAGS = ["--particles", "4", "--max-steps", "5", "--max-step-tokens", "8", "--max-new-tokens", "40"]
QUESTIONS = ["What is 2+3?", "Add 4 and 5.", "7*6=?", "Is 9 odd?", "1+1", "Half of 10?", "3-1=?", "x"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_healthy(url: str, exited=lambda: False) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if exited():
            raise RuntimeError("the server exited")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise RuntimeError("the server did not start within 120 s")


def start_server(folder, *flags) -> tuple[subprocess.Popen, str]:
    """``pf-engine serve`` on a free port, with tests/ on its path for ``--verifier conftest:varying_reward``."""
    port = free_port()
    path = os.pathsep.join(filter(None, [TESTS_PYTHONPATH, os.environ.get("PYTHONPATH")]))
    # run outside the source folder, whose unbuilt pf_engine/ would shadow the installed package
    process = subprocess.Popen([sys.executable, "-m", "pf_engine.cli", "serve", "--policy", str(folder), "--port",
                                str(port), "--log-level", "warning", *flags], cwd=tempfile.gettempdir(),
                               env=os.environ | {"PYTHONPATH": path}, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, lambda: process.poll() is not None)
    except RuntimeError as exc:
        process.kill()
        raise RuntimeError(f"{exc}: {process.stdout.read()}") from None
    return process, url


def stop_server(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()


def metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


@pytest.fixture(scope="module")
def server(policy):
    process, url = start_server(policy, "--verifier", VARYING_VERIFIER, "--api-key", KEY, "--max-particles", "16",
                                "--progress-interval", "0.05", *FLAGS)
    yield url
    stop_server(process)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def offline(policy):
    engine = Engine(policy=policy, prm=varying_reward)

    def solve(item, **search):
        return engine.solve([item], SearchConfig(**(DEFAULTS | search)))[0]

    return solve


def user(question):
    return [{"role": "user", "content": question}]


def test_models_health_and_schema(server, client):
    assert [m.id for m in client.models.list().data] == [policy_name(server)]
    assert httpx.get(server + "/health").json() == {"status": "ok"}  # no key needed
    schema = httpx.get(server + "/openapi.json", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models"} <= set(schema["paths"])


def policy_name(server):
    return httpx.get(server + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()["data"][0]["id"]


def test_chat_equals_solve_offline_with_n_best(client, offline):
    answer = client.chat.completions.create(model=openai.NOT_GIVEN, messages=user(QUESTIONS[0]), seed=7, n=3)
    expected = offline({"messages": user(QUESTIONS[0])}, seed=7)
    order = sorted(range(4), key=lambda i: (i != expected.chosen, -expected.weights[i], i))[:3]
    assert_resampled([expected])
    assert [c.message.content for c in answer.choices] == [expected.particles[i] for i in order]
    assert [c.finish_reason for c in answer.choices] == [expected.finish_reasons[i] for i in order]
    assert answer.usage.completion_tokens == sum(expected.num_tokens[i] for i in order)
    extra = answer.usage.model_extra["pf_engine"]
    assert extra["generated_tokens"] == expected.stats["tokens_generated"] and extra["particles"] == 4
    assert extra["seed"] == 7 and extra["answer"] == expected.answer and extra["steps"] == len(expected.steps)


def test_completions_equal_solve_offline(client, offline):
    answer = client.completions.create(model=policy_name(str(client.base_url).removesuffix("/v1/")),
                                       prompt="2+2=", seed=3, max_tokens=20, temperature=1.1, top_p=0.9,
                                       extra_body={"search": {"algorithm": "beam_search", "beam_width": 2}})
    expected = offline({"prompt": "2+2="}, seed=3, max_new_tokens=20, temperature=1.1, top_p=0.9,
                       algorithm="beam_search", beam_width=2)
    assert answer.choices[0].text == expected.text
    assert answer.usage.prompt_tokens == len("2+2=")  # one token a character, no template


def test_streaming_sends_progress_then_the_answer(client, offline):
    search = {"num_particles": 16, "max_steps": 5, "max_new_tokens": 40}
    stream = client.chat.completions.create(messages=user(QUESTIONS[1]), seed=11, stream=True, model=openai.NOT_GIVEN,
                                            stream_options={"include_usage": True}, extra_body={"search": search})
    chunks = list(stream)
    expected = offline({"messages": user(QUESTIONS[1])}, seed=11, **search)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected.text
    progress = [c.model_extra["pf_engine"]["progress"] for c in chunks if "pf_engine" in (c.model_extra or {})]
    assert progress and {"step", "live_particles", "state"} <= set(progress[-1])
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [expected.finish_reasons[expected.chosen]]
    assert chunks[-1].usage.model_extra["pf_engine"]["particles"] == 16 and not chunks[-1].choices


def test_streamed_completions_with_n(client, offline):
    stream = client.completions.create(model=openai.NOT_GIVEN, prompt="Add 2 and 2.", seed=5, n=2, stream=True)
    texts = ["", ""]
    for c in stream:
        for choice in c.choices:
            texts[choice.index] += choice.text
    expected = offline({"prompt": "Add 2 and 2."}, seed=5)
    order = sorted(range(4), key=lambda i: (i != expected.chosen, -expected.weights[i], i))[:2]
    assert_resampled([expected])
    assert texts == [expected.particles[i] for i in order]


def test_its_hub_budget_in_the_body_or_the_header(client, offline):
    by_body = client.chat.completions.create(model=openai.NOT_GIVEN, messages=user(QUESTIONS[2]), seed=2,
                                             extra_body={"budget": 8})
    by_header = client.chat.completions.create(model=openai.NOT_GIVEN, messages=user(QUESTIONS[2]), seed=2,
                                               extra_headers={"X-ITS-Budget": "8"})
    expected = offline({"messages": user(QUESTIONS[2])}, seed=2, num_particles=8)
    for answer in (by_body, by_header):
        assert answer.usage.model_extra["pf_engine"]["particles"] == 8
        assert answer.choices[0].message.content == expected.text


def test_stop_strings_and_top_p(client, offline):
    answer = client.chat.completions.create(model=openai.NOT_GIVEN, messages=user(QUESTIONS[4]), seed=9, n=4,
                                            stop=["a", "1"], top_p=0.95)
    expected = offline({"messages": user(QUESTIONS[4])}, seed=9, stop=("a", "1"), top_p=0.95)
    order = sorted(range(4), key=lambda i: (i != expected.chosen, -expected.weights[i], i))
    assert_resampled([expected])
    assert [c.message.content for c in answer.choices] == [expected.particles[i] for i in order]
    assert all("a" not in c.message.content and "1" not in c.message.content for c in answer.choices)


def test_the_server_listens_on_loopback_only(server):
    """Without --host the socket is bound to 127.0.0.1, as the kernel's table of listening sockets shows."""
    port = int(server.rsplit(":", 1)[1])
    table = Path("/proc/net/tcp")
    if not table.exists():
        pytest.skip("no /proc/net/tcp to read the bound address from: this check runs on Linux")
    listening = [line.split()[1] for line in table.read_text().splitlines()[1:]
                 if line.split()[3] == "0A" and int(line.split()[1].split(":")[1], 16) == port]
    assert listening == [f"0100007F:{port:04X}"]  # 127.0.0.1, little-endian hex


@pytest.mark.parametrize("path,body,param", [
    ("/v1/chat/completions", {"messages": "hi"}, "messages"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
    ("/v1/chat/completions", {"n": "two"}, "n"),
    ("/v1/chat/completions", {"search": [1, 2]}, "search"),
    ("/v1/chat/completions", {"stop": 5}, "stop.str"),
    ("/v1/chat/completions", {"stop": ["x"] * 17}, "stop"),
    ("/v1/chat/completions", {"search": {"step_delimiter": "x" * 100}}, "search.step_delimiter"),
    ("/v1/chat/completions", {"search": {"iterations": 10 ** 9, "algorithm": "particle_gibbs"}}, "search.iterations"),
    ("/v1/chat/completions", {"budget": 0}, "budget"),
    ("/v1/completions", {"prompt": ["a", "b"]}, "prompt"),
    ("/v1/completions", {"prompt": ""}, "prompt"),
    ("/v1/completions", {}, "prompt"),
])
def test_whatever_a_body_holds_the_server_answers_400_and_goes_on(server, path, body, param):
    if "messages" not in body and path.endswith("chat/completions"):
        body = {"messages": user("1+1")} | body
    answer = httpx.post(server + path, json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == param, answer.json()
    assert httpx.get(server + "/health").status_code == 200
    assert metric(server, "pf_engine_kv_blocks_in_use") == 0


def test_the_tree_on_request(client, offline):
    answer = client.chat.completions.create(model=openai.NOT_GIVEN, messages=user(QUESTIONS[3]), seed=4,
                                            extra_body={"return_tree": True})
    expected = offline({"messages": user(QUESTIONS[3])}, seed=4)
    assert answer.model_extra["pf_engine"]["tree"] == json.loads(json.dumps(expected.tree_records()))


@pytest.mark.parametrize("kwargs,param,message", [
    (dict(extra_body={"search": {"num_particle": 4}}), "search.num_particle", "unknown search option"),
    (dict(extra_body={"search": {"algorithm": "mcts"}}), "search.algorithm", "unknown algorithm"),
    (dict(extra_body={"search": {"max_steps": "many"}}), "search.max_steps", "max_steps must be an int"),
    (dict(extra_body={"budget": 64}), "budget", "above this server's maximum of 16"),
    (dict(extra_headers={"X-ITS-Budget": "lots"}), "X-ITS-Budget", "must be an int"),
    (dict(max_tokens=-5), "max_tokens", "max_new_tokens must be >= 1"),
    (dict(temperature=0), "temperature", "temperature must be > 0"),
    (dict(n=5), "n", r"n must be in \[1, num_particles = 4\]"),
    (dict(seed=-1), "seed", "seed must be in"),
    (dict(logprobs=True), "logprobs", "not supported"),
    (dict(extra_body={"budget": 8, "search": {"num_particles": 4}}), "budget", "disagree"),
    (dict(messages=user("long " * 300)), "messages", "maximum context length is 1024"),
    (dict(max_tokens=1020), "max_tokens", "maximum context length"),
    (dict(messages=[{"role": "user"}]), "messages.0.content", "Field required"),
    (dict(messages=[{"role": "assistant", "content": "hi"}]), "messages", "no user turn"),
    (dict(model="gpt-4o"), "model", "does not exist"),
])
def test_bad_requests_are_refused_naming_the_field(client, kwargs, param, message):
    kwargs = {"messages": user(QUESTIONS[0]), "model": openai.NOT_GIVEN} | kwargs
    error = openai.NotFoundError if param == "model" else openai.BadRequestError
    with pytest.raises(error) as caught:
        client.chat.completions.create(**kwargs)
    body = caught.value.body
    assert set(body) == {"message", "type", "param", "code"} and body["param"] == param, body
    assert re.search(message, body["message"]), body["message"]


def test_malformed_json_and_missing_keys(server):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    answer = httpx.post(server + "/v1/chat/completions", content=b'{"messages": [', headers=headers)
    assert answer.status_code == 400 and "not valid JSON" in answer.json()["error"]["message"]
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        for path in ("/v1/models", "/metrics", "/v1/completions"):
            answer = httpx.request("POST" if "completions" in path else "GET", server + path, headers=headers,
                                   json={"prompt": "1+1"})
            assert answer.status_code == 401, (path, headers)
            assert answer.json()["error"]["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server + "/v1", api_key="nope", max_retries=0).models.list()


def test_a_bounded_load_of_concurrent_clients(server, offline):
    """64 requests from 16 clients at once: every one answered, each as Engine.solve gives it alone,
    every block back in the pool, within a time bound (a hang fails; the speed is bench_serve's)."""
    jobs = [dict(question=QUESTIONS[i % len(QUESTIONS)], seed=100 + i, particles=(2, 4, 8)[i % 3],
                 chat=i % 4 != 3) for i in range(64)]

    async def run():
        async with openai.AsyncOpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=120) as client:
            return await asyncio.wait_for(asyncio.gather(*(one(client, job) for job in jobs)), timeout=300)

    gate = asyncio.Semaphore(16)

    async def one(client, job):
        async with gate:
            if job["chat"]:
                answer = await client.chat.completions.create(
                    model=openai.NOT_GIVEN, messages=user(job["question"]), seed=job["seed"],
                    extra_body={"budget": job["particles"]})
                return answer.choices[0].message.content
            answer = await client.completions.create(model=openai.NOT_GIVEN, prompt=job["question"],
                                                     seed=job["seed"], extra_body={"budget": job["particles"]})
            return answer.choices[0].text

    before = metric(server, "pf_engine_decode_forwards_total"), metric(server, "pf_engine_decode_sequences_total")
    texts = asyncio.run(run())
    forwards = metric(server, "pf_engine_decode_forwards_total") - before[0]
    sequences = metric(server, "pf_engine_decode_sequences_total") - before[1]
    assert sequences / forwards > 8, "no request has more than 8 particles: requests must share forwards"
    expected = []
    for job, text in zip(jobs, texts, strict=True):
        item = {"messages": user(job["question"])} if job["chat"] else {"prompt": job["question"]}
        expected.append(offline(item, seed=job["seed"], num_particles=job["particles"]))
        assert text == expected[-1].text, job
    assert_resampled(expected)
    assert metric(server, "pf_engine_kv_blocks_in_use") == 0
    assert metric(server, "pf_engine_running_requests") == 0 and metric(server, "pf_engine_queue_length") == 0


# -- a second server: a policy that never ends a text, a small KV cache, one request at a time ------------
@pytest.fixture(scope="module")
def busy_server(tmp_path_factory):
    from tiny import save_tiny_policy

    folder = tmp_path_factory.mktemp("endless")
    save_tiny_policy(folder, eos=False)
    process, url = start_server(folder, "--verifier", "arithmetic", "--kv-cache-mib", "16", "--max-running", "1",
                                "--max-queue", "1", "--particles", "4", "--max-steps", "400", "--max-step-tokens",
                                "50", "--max-new-tokens", "20000", "--progress-interval", "0.05",
                                "--max-model-len", "100000", "--api-key", KEY)
    yield url
    stop_server(process)


def open_stream(url, **body):
    """A streaming chat request: its client, response and iterator over the lines."""
    client = httpx.Client(timeout=60)
    request = client.build_request("POST", url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                                   json={"messages": user(QUESTIONS[0]), "stream": True} | body)
    response = client.send(request, stream=True)
    assert response.status_code == 200, response.read()
    return client, response, response.iter_lines()


def wait_for_state(lines, state):
    """Read up to the first progress event of ``state`` (the iterator stays open)."""
    seen = []
    for line in lines:
        if line.startswith("data: {"):
            seen.append(line[-300:])
            progress = json.loads(line[6:]).get("pf_engine", {}).get("progress")
            if progress and progress["state"] == state:
                return progress
    raise AssertionError(f"the stream ended before a {state!r} progress event: {seen[-3:]}")


def test_a_client_that_goes_away_gives_its_blocks_back(busy_server):
    client, response, lines = open_stream(busy_server, seed=1)
    wait_for_state(lines, "running")
    assert metric(busy_server, "pf_engine_kv_blocks_in_use") > 0
    response.close()
    client.close()
    deadline = time.monotonic() + 30
    while metric(busy_server, "pf_engine_kv_blocks_in_use") > 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(busy_server, "pf_engine_kv_blocks_in_use") == 0
    assert metric(busy_server, "pf_engine_running_requests") == 0
    # it never finished (its 20,000 tokens a particle would take far longer): it was cancelled
    assert metric(busy_server, "pf_engine_generated_tokens_total") == 0


def test_a_full_queue_answers_429_and_a_request_too_big_400(busy_server):
    api = openai.OpenAI(base_url=busy_server + "/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError) as caught:  # 64 x (250 + 1) blocks at least, in a 4096-block cache
        api.chat.completions.create(model=openai.NOT_GIVEN, messages=user("2+2"),
                                    extra_body={"budget": 64, "search": {"max_step_tokens": 4000}})
    assert caught.value.body["param"] == "budget"
    assert re.search(r"needs at least \d+ KV blocks \([\d.]+ [KM]iB\)", caught.value.body["message"])
    first, running, first_lines = open_stream(busy_server, seed=2)  # each kept: a dropped iterator closes its stream
    wait_for_state(first_lines, "running")
    second, waiting, second_lines = open_stream(busy_server, seed=3)
    wait_for_state(second_lines, "waiting")
    with pytest.raises(openai.RateLimitError) as caught:
        api.chat.completions.create(model=openai.NOT_GIVEN, messages=user("2+2"))
    assert caught.value.status_code == 429 and caught.value.body["type"] == "rate_limit_error"
    for client, response in ((first, running), (second, waiting)):
        response.close()
        client.close()
    deadline = time.monotonic() + 30
    while metric(busy_server, "pf_engine_kv_blocks_in_use") > 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(busy_server, "pf_engine_kv_blocks_in_use") == 0 and metric(busy_server,
                                                                             "pf_engine_queue_length") == 0


def test_a_failing_prm_fails_the_requests_in_flight_and_the_server_goes_on(policy):
    """A PRM callable that raises (the server's own part, not a request's) fails the requests in
    flight with a 500 in OpenAI's shape; the pools are emptied and the next request is served."""
    import threading

    import uvicorn

    from pf_engine.server.app import build_app
    from pf_engine.server.protocol import Limits

    def prm(question, steps):
        if "boom" in question:
            raise RuntimeError("the PRM broke")
        return 0.5

    app = build_app(Engine(policy=policy, prm=prm), Limits("tiny", SearchConfig(**DEFAULTS), 16, 1024))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical"))
    thread = threading.Thread(target=server.run)
    thread.start()
    try:
        wait_until_healthy(f"http://127.0.0.1:{port}", lambda: not thread.is_alive())
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        with pytest.raises(openai.InternalServerError) as caught:
            client.chat.completions.create(model=openai.NOT_GIVEN, messages=user("boom: 1+1"))
        assert "the PRM broke" in caught.value.body["message"] and caught.value.body["type"] == "server_error"
        assert app.state.loop.kv_blocks_in_use == 0
        answer = client.chat.completions.create(model=openai.NOT_GIVEN, messages=user("1+1"), seed=1)
        offline = Engine(policy=policy, prm=prm).solve([{"messages": user("1+1")}], SearchConfig(**DEFAULTS, seed=1))
        assert answer.choices[0].message.content == offline[0].text
        assert app.state.loop.kv_blocks_in_use == 0
    finally:
        server.should_exit = True
        thread.join()
