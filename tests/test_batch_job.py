"""`glmserve batch`: resuming (what an interrupted run left is kept, a line cut short is dropped), planning (skips,
malformed lines, a document's requests kept together), the engine actor on documents (the prefix cache serves a
document's later questions), and the whole command on Ray Data killed mid-way and rerun: the output complete, no
line twice, the rerun doing only the remainder."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from glmserve.batch.job import Done, EngineActor, JobConfig, _pack, plan_job, read_done, truncate_partial_line

MODEL = "glm5-tiny"


def request_line(custom_id: str, content: str, max_tokens: int = 8) -> str:
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, "temperature": 0,
            "thinking": {"type": "disabled"}}  # fmt: skip
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body})


def document(i: int) -> str:
    return "".join(f"def handler_{i}_{j}(event):\n    return event.get('k{j}', {i}) * {j}\n\n" for j in range(8))


def test_truncate_partial_line(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_bytes(b'{"a": 1}\n{"b": 2}\n{"c": ')
    assert truncate_partial_line(path) == 6 and path.read_bytes() == b'{"a": 1}\n{"b": 2}\n'
    assert truncate_partial_line(path) == 0
    path.write_bytes(b'{"cut')
    truncate_partial_line(path)
    assert path.read_bytes() == b""


def test_read_done_and_plan_skip_what_is_finished(tmp_path):
    source = tmp_path / "in.jsonl"
    doc = document(0)
    lines = [request_line(f"r{i}", doc + f"# q{i}") for i in range(5)] + ["{oops", request_line("other", "import os")]
    source.write_text("\n".join(lines) + "\n")
    out, err = tmp_path / "out.jsonl", tmp_path / "out.errors.jsonl"
    out.write_text(json.dumps({"custom_id": "r1", "response": {"status_code": 200}, "error": None}) + "\n{partial")
    err.write_text(json.dumps({"custom_id": None, "response": None, "error": {"code": "invalid_json", "line": 6}})
                   + "\n")  # fmt: skip
    config = JobConfig(input=source, output=out, batch_size=3)
    assert config.errors_path == err
    done = read_done(out, err)
    assert done == Done(ids={"r1"}, lines={6}) and out.read_text().count("\n") == 1
    plan = plan_job(config, done)
    assert (plan.total, plan.skipped, plan.to_run, plan.malformed) == (7, 2, 5, [])
    ids = [[row["custom_id"] for row in task] for task in plan.tasks]
    # the four left about the document stay together (split at batch_size), the other request apart
    assert sorted(ids) == sorted([["r0", "r2", "r3"], ["r4"], ["other"]]) or sorted(ids) == sorted(
        [["r0", "r2", "r3"], ["r4", "other"]]
    ), ids
    fresh = plan_job(config, Done())
    assert [e.code for e in fresh.malformed] == ["invalid_json"] and fresh.to_run == 6
    assert read_done(out, err, retry_failed=True) == Done(ids={"r1"})  # the error file is set aside to be redone
    assert (tmp_path / "out.errors.jsonl.previous").exists() and not err.exists()


def test_pack_keeps_groups_whole():
    groups = [[1, 2], [3], [4, 5, 6], [7, 8, 9, 10, 11]]
    assert sorted(_pack(groups, 4)) == [[1, 2, 3], [4, 5, 6], [7, 8, 9, 10], [11]]


def test_config_checks():
    with pytest.raises(ValueError, match="either"):
        JobConfig(output=Path("o"))
    with pytest.raises(ValueError, match="needs --prompt"):
        JobConfig(documents=Path("d"), output=Path("o"))
    with pytest.raises(ValueError, match="no \\{document\\}"):
        JobConfig(documents=Path("d"), output=Path("o"), prompt=["Summarize"])


def test_engine_actor_answers_document_questions_from_the_prefix_cache(tmp_path):
    docs = tmp_path / "docs"
    (docs / "pkg").mkdir(parents=True)
    for i in range(2):
        (docs / "pkg" / f"mod{i}.py").write_text(document(i))
    prompts = ["{document}\n# {name}: the first handler returns", "{document}\n# the last handler returns"]
    config = JobConfig(documents=docs, prompt=prompts, output=tmp_path / "out.jsonl", max_tokens=6,
                       extra_body={"thinking": {"type": "disabled"}})  # fmt: skip
    plan = plan_job(config, Done())
    assert plan.total == 4 and len(plan.tasks) == 1
    actor = EngineActor(config.engine() | {"kv_cache_memory_bytes": 64 << 20}, MODEL, prompts, config.endpoint,
                        config.defaults(), retries=0)  # fmt: skip
    try:
        out = asyncio.run(actor({"task": [json.dumps(task) for task in plan.tasks]}))
    finally:
        actor.server.client.shutdown()
    assert sorted(out["custom_id"]) == ["pkg/mod0.py#0", "pkg/mod0.py#1", "pkg/mod1.py#0", "pkg/mod1.py#1"]
    assert all(out["ok"]) and all(n == 6 for n in out["completion_tokens"])
    cached = dict(zip(out["custom_id"], out["cached_tokens"], strict=True))
    leaders = [cached[f"pkg/mod{i}.py#0"] for i in range(2)]
    followers = [cached[f"pkg/mod{i}.py#1"] for i in range(2)]
    assert leaders == [0, 0] and all(c >= 64 for c in followers), out["cached_tokens"]
    assert all(out["custom_id"][i][:-2] == out["custom_id"][i + 1][:-2] for i in (0, 2))  # a document's together
    body = json.loads(out["text"][0])["response"]["body"]
    assert body["object"] == "chat.completion" and body["model"] == MODEL


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_killed_mid_way_then_rerun_does_only_the_remainder(tmp_path):
    import ray

    source, out = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    errors, summary = tmp_path / "results.errors.jsonl", tmp_path / "summary.json"
    n = 24
    lines = [request_line(f"k{i}", f"def step_{i}(state):", max_tokens=24) for i in range(n)]
    source.write_text("\n".join(lines[:10] + ["{not json"] + lines[10:]) + "\n")
    command = [sys.executable, "-m", "glmserve.cli", "batch", "-i", str(source), "-o", str(out),
               "--batch-size", "2", "--tasks-per-actor", "1", "--summary-json", str(summary),
               "--engine-args", json.dumps({"kv_cache_memory_bytes": 64 << 20})]  # fmt: skip
    log = open(os.environ.get("GLMSERVE_TEST_SERVER_LOG", os.devnull), "a")  # noqa: SIM115
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)  # the CLI joins it; killing the CLI ends
    try:  # its job (and actors) but not this cluster
        env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
        proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 600
        while not out.exists() or out.read_text().count("\n") < 6:
            assert proc.poll() is None, "glmserve batch ended before it was killed"
            assert time.monotonic() < deadline, "no results"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        kept = out.read_bytes().count(b"\n") + errors.read_bytes().count(b"\n")  # whole lines only
        assert 6 <= kept < n + 1 and not summary.exists()

        rerun = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=600)
    finally:
        ray.shutdown()
        log.close()
    assert rerun.returncode == 0
    report = json.loads(summary.read_text())
    assert report["requests"] == n + 1
    assert report["skipped"] == kept and report["ran"] == n + 1 - kept  # only the remainder
    assert report["succeeded"] == report["ran"] and report["failed"] == 0 and report["not_finished"] == 0
    ids = [json.loads(x)["custom_id"] for x in out.read_text().splitlines()]
    assert sorted(ids) == sorted(f"k{i}" for i in range(n)) and len(ids) == len(set(ids))  # complete, once each
    (bad,) = [json.loads(x) for x in errors.read_text().splitlines()]
    assert bad["error"]["code"] == "invalid_json" and bad["error"]["line"] == 11
    print(f"killed with {kept} of {n + 1} lines written; the rerun ran {report['ran']}")
