"""The official ``openai`` client against a real SmolLM2 worker process (CPU)."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from tests.worker.conftest import WorkerProcess, metric, scrape

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(smollm2_worker: WorkerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=smollm2_worker.base_url, api_key="unused", max_retries=0)


def test_models_lists_the_served_model(client: openai.OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_chat_answers_paris(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(
        model=MODEL, messages=FRANCE, temperature=0, max_tokens=30
    )
    choice = response.choices[0]
    assert "Paris" in choice.message.content
    assert choice.message.role == "assistant"
    assert choice.finish_reason == "stop"  # EOS before max_tokens
    usage = response.usage
    assert usage.prompt_tokens == 37  # SmolLM2's template adds its default system prompt
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.prompt_tokens_details.cached_tokens >= 0


def test_completion_text_and_token_ids_prompt_agree(client: openai.OpenAI) -> None:
    text = client.completions.create(
        model=MODEL, prompt="The capital of France is", temperature=0, max_tokens=8
    )
    ids = [504, 3575, 282, 4649, 314]  # "The capital of France is"
    by_ids = client.completions.create(model=MODEL, prompt=ids, temperature=0, max_tokens=8)
    assert text.choices[0].text == by_ids.choices[0].text
    assert text.choices[0].text.startswith(" Paris")
    assert text.choices[0].finish_reason == "length"
    assert text.usage.completion_tokens == 8
    assert by_ids.usage.prompt_tokens == 5


def test_stream_matches_non_stream(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(
        model=MODEL, messages=FRANCE, temperature=0, max_tokens=20
    )
    stream = client.chat.completions.create(
        model=MODEL,
        messages=FRANCE,
        temperature=0,
        max_tokens=20,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop" and all(f is None for f in finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == (
        whole.usage.completion_tokens
    )


def test_completion_stream(client: openai.OpenAI) -> None:
    stream = client.completions.create(
        model=MODEL, prompt="1, 2, 3, 4,", temperature=0, max_tokens=12, stream=True
    )
    pieces = [c.choices[0].text for c in stream]
    whole = client.completions.create(
        model=MODEL, prompt="1, 2, 3, 4,", temperature=0, max_tokens=12
    )
    assert "".join(pieces) == whole.choices[0].text


def test_stop_string_is_cut_and_reported(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(
        model=MODEL, messages=FRANCE, temperature=0, max_tokens=30, stop=["Paris"]
    )
    choice = response.choices[0]
    assert choice.message.content == "The capital of France is "
    assert choice.finish_reason == "stop"
    assert choice.model_extra["stop_reason"] == "Paris"
    stream = client.chat.completions.create(
        model=MODEL, messages=FRANCE, temperature=0, max_tokens=30, stop=[" Paris."], stream=True
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert streamed == "The capital of France is"


def test_stop_token_ids_and_ignore_eos(client: openai.OpenAI) -> None:
    response = client.completions.create(
        model=MODEL,
        prompt="The capital of France is",
        temperature=0,
        max_tokens=8,
        extra_body={"stop_token_ids": [30]},  # "."
    )
    assert response.choices[0].text == " Paris."
    assert response.choices[0].model_extra["stop_reason"] == 30
    long = client.chat.completions.create(
        model=MODEL, messages=FRANCE, temperature=0, max_tokens=12, extra_body={"ignore_eos": True}
    )
    assert long.usage.completion_tokens == 12 and long.choices[0].finish_reason == "length"


def test_seed_reproduces_sampling(client: openai.OpenAI) -> None:
    def sample(seed: int) -> str:
        return (
            client.completions.create(
                model=MODEL, prompt="Once upon a time", temperature=1.0, max_tokens=16, seed=seed
            )
            .choices[0]
            .text
        )

    assert sample(7) == sample(7)
    assert len({sample(s) for s in (1, 2, 3)}) > 1


def test_logprobs(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(
        model=MODEL, messages=FRANCE, temperature=0, max_tokens=5, logprobs=True, top_logprobs=3
    )
    content = response.choices[0].logprobs.content
    assert len(content) == 5
    for entry in content:
        assert len(entry.top_logprobs) == 3
        # greedy: the chosen token is the most likely one
        assert entry.token == entry.top_logprobs[0].token
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
        assert entry.logprob <= 0


def test_errors_are_openai_shaped(client: openai.OpenAI, smollm2_worker: WorkerProcess) -> None:
    with pytest.raises(openai.NotFoundError) as not_found:
        client.chat.completions.create(model="nope", messages=FRANCE)
    assert not_found.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=-1)
    assert bad.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as too_long:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=100_000)
    assert too_long.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as out_of_vocab:
        client.completions.create(model=MODEL, prompt=[1, 2, 10**7])
    assert "out of range" in out_of_vocab.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="x", n=2)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[])
    raw = httpx.post(
        f"{smollm2_worker.base_url}/chat/completions",
        content=b"{not json",
        headers={"content-type": "application/json"},
    )
    assert raw.status_code == 400
    assert raw.json()["error"]["type"] == "invalid_request_error"


def test_unknown_fields_are_ignored(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(
        model=MODEL,
        messages=FRANCE,
        temperature=0,
        max_tokens=3,
        extra_body={"some_future_field": {"x": 1}},
    )
    assert response.choices[0].message.content


def test_kv_transfer_params_are_accepted(client: openai.OpenAI) -> None:
    params = {
        "do_remote_decode": False,
        "do_remote_prefill": False,
        "remote_engine_id": None,
        "remote_block_ids": None,
        "remote_host": None,
        "remote_port": None,
    }
    response = client.completions.create(
        model=MODEL, prompt="Hi", max_tokens=2, extra_body={"kv_transfer_params": params}
    )
    assert "kv_transfer_params" in response.model_extra


def test_health_and_metrics_names(smollm2_worker: WorkerProcess) -> None:
    health = httpx.get(f"{smollm2_worker.url}/health").json()
    assert health["status"] == "ok" and health["kv_events_port"] > 0
    values = scrape(smollm2_worker.url)
    for name in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:prefix_cache_queries_total",
        "vllm:prefix_cache_hits_total",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        "vllm:num_preemptions_total",
        "vllm:request_success_total",
        "vllm:time_to_first_token_seconds_count",
        "vllm:inter_token_latency_seconds_count",
        "vllm:e2e_request_latency_seconds_count",
        "vllm:request_queue_time_seconds_count",
        "vllm:request_prefill_time_seconds_count",
        "vllm:request_decode_time_seconds_count",
        "vllm:request_prompt_tokens_count",
        "vllm:request_generation_tokens_count",
    ):
        assert any(k.startswith(name) for k in values), name
    assert 'model_name="smollm2-135m-instruct"' in next(
        k for k in values if k.startswith("vllm:num_requests_running")
    )


def test_client_disconnect_aborts_the_request(
    client: openai.OpenAI, smollm2_worker: WorkerProcess
) -> None:
    before = metric(scrape(smollm2_worker.url), "vllm:request_success_total")
    stream = client.chat.completions.create(
        model=MODEL,
        messages=FRANCE,
        max_tokens=2000,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    # The abort is counted as a finished request with finished_reason="abort".
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        values = scrape(smollm2_worker.url)
        aborted = sum(
            v
            for k, v in values.items()
            if k.startswith("vllm:request_success_total") and 'finished_reason="abort"' in k
        )
        if aborted >= 1 and metric(values, "vllm:num_requests_running") == 0:
            break
        time.sleep(0.05)
    assert aborted >= 1
    assert metric(values, "vllm:request_success_total") == before + 1
    assert metric(values, "vllm:num_requests_running") == 0
