"""The Files and Batches API end to end through the official `openai` client, against a replica's real app (the
embedded model behind a colocated decode worker, uvicorn): 50 requests complete with outputs equal to the online
API's, malformed lines go to the error file and the rest complete, cancel keeps the finished lines, and a server
killed with SIGKILL mid-batch resumes it on restart with every line exactly once."""

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from batch_server import MODEL, serving
from server_process import free_port

from glmserve.batch.options import BatchOptions
from glmserve.batch.store import BatchStore

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
TESTS = Path(__file__).resolve().parent


def document(i: int) -> str:
    """A Python module of ~200 tokens, different for each i: the shared prefix of its questions."""
    return "".join(
        f"def handler_{i}_{j}(event, context):\n    value = event.get('key_{j}', {i})\n    return value * {j}\n\n"
        for j in range(6)
    )


def chat_body(content: str, max_tokens: int = 12) -> dict:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "thinking": {"type": "disabled"},
    }


def line(custom_id: str, body: dict, url: str = "/v1/chat/completions") -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


def doc_lines(documents: int, questions: int, max_tokens: int = 12) -> list[str]:
    return [
        line(f"doc{d}-q{q}", chat_body(document(d) + f"\n# question {q}: what does handler_{d}_{q} return?\n",
                                       max_tokens))
        for d in range(documents)
        for q in range(questions)
    ]  # fmt: skip


def upload(client: openai.OpenAI, lines: list[str], name: str = "requests.jsonl") -> str:
    return client.files.create(file=(name, ("\n".join(lines) + "\n").encode()), purpose="batch").id


def wait_until(client: openai.OpenAI, batch_id: str, done, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        if done(batch):
            return batch
        assert time.monotonic() < deadline, f"batch {batch_id} is still {batch.status}: {batch.request_counts}"
        time.sleep(0.2)


def finished(batch) -> bool:
    return batch.status in ("completed", "failed", "expired", "cancelled")


def jsonl(client: openai.OpenAI, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    return [json.loads(x) for x in client.files.content(file_id).text.splitlines()]


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    options = BatchOptions(store=str(tmp_path_factory.mktemp("batch-store")), max_concurrency=8, poll_s=0.2)
    with serving(options, free_port()) as (base, runner):
        yield base, runner


@pytest.fixture(scope="module")
def client(api):
    return openai.OpenAI(base_url=f"{api[0]}/v1", api_key="unused", max_retries=0, timeout=60)


def test_files_endpoints(client, api):
    f = client.files.create(file=("notes.jsonl", b'{"a": 1}\n'), purpose="batch")
    assert f.id.startswith("file-") and f.bytes == 9 and f.filename == "notes.jsonl" and f.purpose == "batch"
    assert client.files.retrieve(f.id).id == f.id
    assert f.id in [x.id for x in client.files.list()]
    assert client.files.content(f.id).content == b'{"a": 1}\n'
    assert client.files.delete(f.id).deleted
    with pytest.raises(openai.NotFoundError) as e:
        client.files.retrieve(f.id)
    assert "No such File object" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.files.create(file=("x.jsonl", b"{}"), purpose="fine-tune")
    assert e.value.body["param"] == "purpose"
    r = httpx.post(f"{api[0]}/v1/files", data={"purpose": "batch"})  # no file part
    assert r.status_code == 400 and r.json()["error"]["param"] == "file"
    with pytest.raises(openai.BadRequestError) as e:
        client.batches.create(input_file_id=f.id, endpoint="/v1/embeddings", completion_window="24h")
    assert e.value.body["param"] == "endpoint"
    with pytest.raises(openai.NotFoundError):
        client.batches.create(input_file_id="file-000000000000000000000000", endpoint="/v1/completions",
                              completion_window="24h")  # fmt: skip
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_nope")


def test_batch_of_50_matches_the_online_api(client):
    lines = doc_lines(documents=10, questions=5)
    batch = client.batches.create(
        input_file_id=upload(client, lines),
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"job": "fifty"},
    )
    assert batch.status == "validating" and batch.metadata == {"job": "fifty"}
    assert batch.id in [b.id for b in client.batches.list(limit=5)]
    done = wait_until(client, batch.id, finished)
    assert done.status == "completed", done
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (50, 50, 0)
    assert done.error_file_id is None and done.completed_at >= done.in_progress_at >= done.created_at
    outputs = jsonl(client, done.output_file_id)
    sent = [json.loads(x) for x in lines]
    assert [o["custom_id"] for o in outputs] == [s["custom_id"] for s in sent]  # one each, in input order

    def online(body: dict):
        body = dict(body)
        return client.chat.completions.create(extra_body={"thinking": body.pop("thinking")}, **body)

    with ThreadPoolExecutor(4) as pool:
        expected = list(pool.map(online, [s["body"] for s in sent]))
    for out, ref in zip(outputs, expected, strict=True):
        assert out["response"]["status_code"] == 200 and out["error"] is None
        body = out["response"]["body"]
        assert body["choices"][0]["message"]["content"] == ref.choices[0].message.content, out["custom_id"]
        assert body["choices"][0]["finish_reason"] == ref.choices[0].finish_reason
        assert body["usage"]["completion_tokens"] == ref.usage.completion_tokens
    # each document's leader ran first, so its four followers found its prefix cached
    cached = [o["response"]["body"]["usage"]["prompt_tokens_details"]["cached_tokens"] for o in outputs]
    followers = [c for o, c in zip(outputs, cached, strict=True) if not o["custom_id"].endswith("-q0")]
    assert sum(c >= 128 for c in followers) >= 0.9 * len(followers), cached


def test_malformed_lines_go_to_the_error_file(client):
    good = chat_body("def add(a, b):")
    lines = [
        line("good-1", good),
        "{this is not json",
        line("wrong-url", good, url="/v1/embeddings"),
        line("bad-body", {"model": MODEL, "messages": [], "max_tokens": 4}),
        line("negative", {**good, "max_tokens": -3}),
        line("other-model", {**good, "model": "gpt-4o"}),
        line("good-1", good),  # the id again
        json.dumps({"custom_id": "no-body", "method": "POST", "url": "/v1/chat/completions"}),
        line("good-2", chat_body("import os")),
    ]
    batch = client.batches.create(
        input_file_id=upload(client, lines), endpoint="/v1/chat/completions", completion_window="24h"
    )
    done = wait_until(client, batch.id, finished)
    assert done.status == "completed"
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (9, 2, 7)
    assert [o["custom_id"] for o in jsonl(client, done.output_file_id)] == ["good-1", "good-2"]
    errors = jsonl(client, done.error_file_id)
    assert [e["custom_id"] for e in errors] == [None, "wrong-url", "bad-body", "negative", "other-model", "good-1",
                                                "no-body"]  # fmt: skip
    by_id = {e["custom_id"]: e for e in errors}
    assert by_id[None]["error"]["code"] == "invalid_json" and "line 2" in by_id[None]["error"]["message"]
    assert "/v1/embeddings" in by_id["wrong-url"]["error"]["message"]
    assert "used by an earlier line" in by_id["good-1"]["error"]["message"]
    assert "body" in by_id["no-body"]["error"]["message"]
    for custom_id, param in (("bad-body", "messages"), ("negative", "max_tokens"), ("other-model", "model")):
        response = by_id[custom_id]["response"]  # judged by the endpoint itself, as online
        assert response["status_code"] in (400, 404) and response["body"]["error"]["param"] == param, response


def test_cancel_keeps_the_finished_lines(client):
    lines = [line(f"c{i}", chat_body(f"def task_{i}(items):", max_tokens=48)) for i in range(40)]
    batch = client.batches.create(
        input_file_id=upload(client, lines), endpoint="/v1/chat/completions", completion_window="24h"
    )
    wait_until(client, batch.id, lambda b: b.request_counts.completed >= 4)
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled")
    done = wait_until(client, batch.id, finished, timeout=60)
    assert done.status == "cancelled" and done.cancelled_at
    outputs = jsonl(client, done.output_file_id)
    assert 4 <= len(outputs) == done.request_counts.completed < 40
    assert all(o["response"]["status_code"] == 200 for o in outputs)
    assert len({o["custom_id"] for o in outputs}) == len(outputs)
    assert client.batches.cancel(batch.id).status == "cancelled"  # again: no change


def test_sigkill_mid_batch_then_restart_runs_every_line_once(tmp_path):
    store_dir = tmp_path / "store"
    lines = [line(f"k{i}", chat_body(f"def step_{i}(state):", max_tokens=32)) for i in range(50)]
    log = open(os.environ.get("GLMSERVE_TEST_SERVER_LOG", os.devnull), "a")  # noqa: SIM115

    def start() -> tuple[subprocess.Popen, openai.OpenAI]:
        port = free_port()
        proc = subprocess.Popen(
            [sys.executable, str(TESTS / "batch_server.py"), "--store", str(store_dir), "--port", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, "the batch server exited"
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the batch server did not come up"
            time.sleep(0.3)
        return proc, openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60)

    proc, client = start()
    try:
        batch = client.batches.create(
            input_file_id=upload(client, lines), endpoint="/v1/chat/completions", completion_window="24h"
        )
        wait_until(client, batch.id, lambda b: b.request_counts.completed >= 10)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()  # reaped: its pid is gone, so the restart takes the batch over at once
    store = BatchStore(store_dir)
    before = store.get_batch(batch.id)
    assert before.status == "in_progress" and 10 <= before.completed < 50
    (first_worker,) = store.results_by_worker(batch.id)

    proc, client = start()
    try:
        done = wait_until(client, batch.id, finished)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
        log.close()
    assert done.status == "completed"
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (50, 50, 0)
    outputs = [json.loads(x) for x in store.file_path(done.output_file_id).read_text().splitlines()]
    assert [o["custom_id"] for o in outputs] == [f"k{i}" for i in range(50)]  # each once, in order
    workers = store.results_by_worker(batch.id)
    assert workers[first_worker] == before.completed  # what the killed server had finished was kept ...
    assert sum(workers.values()) == 50 and len(workers) == 2  # ... and the restarted one ran only the rest
    print(f"killed after {before.completed} of 50 lines; the restart ran {50 - before.completed}")


def test_batches_on_ray_serve(tmp_path):
    """`glmserve serve` attaches the batch API to its decode replicas; the runner starts with the replica (Serve runs
    the app's lifespan) and works from the store the config names."""
    from server_process import running_server

    config = tmp_path / "serving.yaml"
    config.write_text(json.dumps({"batch": {"store": str(tmp_path / "store"), "poll_s": 0.2}}))
    lines = [line(f"s{i}", chat_body(f"def serve_{i}():")) for i in range(4)]
    with running_server("--config", str(config)) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60)
        batch = client.batches.create(
            input_file_id=upload(client, lines), endpoint="/v1/chat/completions", completion_window="24h"
        )
        done = wait_until(client, batch.id, finished, timeout=120)
        assert done.status == "completed" and done.request_counts.completed == 4
        outputs = jsonl(client, done.output_file_id)
        online = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "def serve_2():"}], max_tokens=12, temperature=0,
            extra_body={"thinking": {"type": "disabled"}},
        )  # fmt: skip
    assert [o["custom_id"] for o in outputs] == ["s0", "s1", "s2", "s3"]
    assert outputs[2]["response"]["body"]["choices"][0]["message"]["content"] == online.choices[0].message.content
    assert (tmp_path / "store" / "batch.sqlite3").exists()
