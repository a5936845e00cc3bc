"""The batch store (SQLite + a files directory) and the input-line parser: ids, lists, leases and takeover, results
recorded exactly once, output and error files written in line order, deletion, bounds."""

import io
import json
import os
import subprocess
import sys
import time

import pytest

from glmserve.batch.grouping import PrefixScheduler, group_by_prefix
from glmserve.batch.lines import SUPPORTED_URLS, LineError, Request, TooManyLines, scan_lines
from glmserve.batch.store import BatchStore, LeaseLost, Owner, StoreError


def _line(custom_id, content="hi", url="/v1/chat/completions", **extra):
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": 4, **extra}
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


@pytest.fixture
def store(tmp_path):
    return BatchStore(tmp_path / "store")


def _upload(store, text: str, purpose="batch"):
    return store.create_file(purpose, "in.jsonl", io.BytesIO(text.encode()), max_bytes=1 << 20)


def test_files_round_trip_list_and_delete(store):
    a = _upload(store, "a\n")
    b = _upload(store, "bb\n")
    assert a.id.startswith("file-") and len(a.id) == 5 + 24 and a.id != b.id
    assert store.get_file(a.id).bytes == 2 and store.file_path(a.id).read_bytes() == b"a\n"
    page, more = store.list_files(limit=1)
    assert [f.id for f in page] == [b.id] and more
    page, more = store.list_files(limit=1, after=b.id)
    assert [f.id for f in page] == [a.id] and not more
    assert [f.id for f in store.list_files(order="asc")[0]] == [a.id, b.id]
    store.delete_file(a.id)
    with pytest.raises(StoreError) as e:
        store.get_file(a.id)
    assert e.value.kind == "not_found"
    assert not store.file_path(a.id).exists()
    with pytest.raises(StoreError):
        store.delete_file(a.id)
    with pytest.raises(StoreError):
        store.file_path("../batch.sqlite3")  # a client's id never becomes a path


def test_file_over_the_limit_is_refused_and_leaves_nothing(store):
    with pytest.raises(StoreError) as e:
        store.create_file("batch", "big", io.BytesIO(b"x" * 3000), max_bytes=1000)
    assert e.value.kind == "too_large"
    assert list(store.files_dir.iterdir()) == []


def test_results_are_recorded_once_and_files_come_out_in_line_order(store):
    f = _upload(store, "\n".join(_line(f"r{i}") for i in range(3)))
    batch = store.create_batch(f.id, "/v1/chat/completions", 86400, "24h", {"k": "v"}, max_active=10)
    assert batch.id.startswith("batch_") and batch.status == "validating" and batch.metadata == {"k": "v"}
    owner = Owner()
    assert store.claim(owner, 30).id == batch.id
    store.start(batch.id, owner, total=4, errors=[(4, json.dumps({"custom_id": None, "error": {"code": "x"}}))])
    assert store.record(batch.id, 3, "r2", True, '{"custom_id": "r2"}', owner)
    assert store.record(batch.id, 1, "r0", True, '{"custom_id": "r0"}', owner)
    assert not store.record(batch.id, 1, "r0", True, '{"custom_id": "again"}', owner)  # once
    assert store.record(batch.id, 2, "r1", False, '{"custom_id": "r1"}', owner)
    b = store.get_batch(batch.id)
    assert (b.status, b.total, b.completed, b.failed) == ("in_progress", 4, 2, 2)
    done = store.finish(batch.id, owner, "completed")
    assert done.status == "completed" and done.completed_at and done.owner is None
    output = store.file_path(done.output_file_id).read_text().splitlines()
    assert [json.loads(x)["custom_id"] for x in output] == ["r0", "r2"]
    errors = store.file_path(done.error_file_id).read_text().splitlines()
    assert [json.loads(x)["custom_id"] for x in errors] == ["r1", None]
    assert store.get_file(done.output_file_id).purpose == "batch_output"
    api = done.to_api()
    assert api.request_counts.total == 4 and api.output_file_id == done.output_file_id


def test_lease_is_exclusive_until_it_expires(store):
    f = _upload(store, _line("a"))
    batch = store.create_batch(f.id, "/v1/completions", 86400, "24h", None, max_active=10)
    first, second = Owner(), Owner()
    assert store.claim(first, 0.3).id == batch.id
    assert store.claim(second, 30) is None  # held
    assert store.renew(batch.id, first, 0.3) == "validating"
    time.sleep(0.4)
    assert store.claim(second, 30).id == batch.id  # ran out
    assert store.renew(batch.id, first, 30) is None
    with pytest.raises(LeaseLost):
        store.start(batch.id, first, 1, [])


def test_a_dead_owner_on_this_host_is_taken_over_at_once(store):
    f = _upload(store, _line("a"))
    batch = store.create_batch(f.id, "/v1/completions", 86400, "24h", None, max_active=10)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    gone = Owner()
    gone.pid = int(dead.stdout)  # a process that has exited
    assert store.claim(gone, 3600).id == batch.id
    assert store.claim(Owner(), 30).id == batch.id
    me, neighbour, earlier = Owner(), Owner(), Owner()
    earlier.process = "0" * 12  # an earlier process that had our pid (a restarted container)
    assert earlier.pid == me.pid == os.getpid()
    assert me.outlived(str(earlier)) and not me.outlived(str(neighbour)) and not me.outlived(str(me))


def test_cancel_rules_and_active_limit(store):
    f = _upload(store, _line("a"))
    a = store.create_batch(f.id, "/v1/completions", 86400, "24h", None, max_active=2)
    store.create_batch(f.id, "/v1/completions", 86400, "24h", None, max_active=2)
    with pytest.raises(StoreError) as e:
        store.create_batch(f.id, "/v1/completions", 86400, "24h", None, max_active=2)
    assert e.value.kind == "limit"
    assert store.request_cancel(a.id).status == "cancelling"
    assert store.request_cancel(a.id).status == "cancelling"  # idempotent
    owner = Owner()
    assert store.claim(owner, 30).id == a.id
    store.finish(a.id, owner, "cancelled")
    assert store.request_cancel(a.id).status == "cancelled"
    done = store.get_batch(a.id)
    assert done.output_file_id is None and done.error_file_id is None  # nothing had finished
    out = _upload(store, "x", purpose="batch_output")
    with pytest.raises(StoreError) as e:
        store.create_batch(out.id, "/v1/completions", 86400, "24h", None, max_active=9)
    assert e.value.kind == "invalid"


def test_deleted_input_file_keeps_its_bytes_until_the_batch_ends(store):
    f = _upload(store, _line("a"))
    batch = store.create_batch(f.id, "/v1/completions", 86400, "24h", None, max_active=10)
    store.delete_file(f.id)
    assert store.file_path(f.id).exists()
    owner = Owner()
    store.claim(owner, 30)
    store.finish(batch.id, owner, "failed", errors=[{"code": "x", "message": "y"}])
    assert not store.file_path(f.id).exists()
    assert store.get_batch(batch.id).to_api().errors.data[0].code == "x"


def test_store_reopens_with_its_data(tmp_path):
    a = BatchStore(tmp_path)
    f = _upload(a, "z")
    a.close()
    assert BatchStore(tmp_path).get_file(f.id).bytes == 1


def test_scan_lines_sorts_requests_from_errors():
    text = "\n".join(
        [
            _line("ok1"),
            "{not json",
            json.dumps({"custom_id": "u", "method": "POST", "url": "/v1/embeddings", "body": {}}),
            json.dumps({"custom_id": "m", "method": "GET", "url": "/v1/completions", "body": {}}),
            "",
            _line("ok1"),
            _line("s", stream=True),
            json.dumps({"method": "POST", "url": "/v1/completions", "body": {"prompt": "x"}}),
            _line("ok2", url="/v1/completions"),
        ]
    )
    items = list(scan_lines(io.BytesIO(text.encode()), SUPPORTED_URLS))
    assert [i.line for i in items] == [1, 2, 3, 4, 6, 7, 8, 9]  # the blank line is no request
    kinds = [(type(i).__name__, getattr(i, "code", None)) for i in items]
    assert kinds == [
        ("Request", None),
        ("LineError", "invalid_json"),
        ("LineError", "invalid_url"),
        ("LineError", "invalid_request"),
        ("LineError", "duplicate_custom_id"),
        ("LineError", "invalid_request"),
        ("LineError", "invalid_request"),
        ("Request", None),
    ]
    errors = {i.line: i.message for i in items if isinstance(i, LineError)}
    assert "line 3" in errors[3] and "/v1/embeddings" in errors[3]
    assert "method" in errors[4] and "stream" in errors[7] and "custom_id" in errors[8]
    first, last = items[0], items[-1]
    assert isinstance(first, Request) and first.offset == 0
    assert text.encode()[last.offset : last.offset + last.length] == _line("ok2", url="/v1/completions").encode()
    with pytest.raises(TooManyLines):
        list(scan_lines(io.BytesIO(text.encode()), SUPPORTED_URLS, max_lines=3))


def test_grouping_by_shared_prompt_start():
    doc_a, doc_b = "a" * 300, "b" * 300
    items = [doc_b + "q1", "short one", doc_a + "q1", doc_b + "q2", doc_a + "q2", "short two", doc_a[:200]]
    groups = group_by_prefix(items, text=lambda x: x, min_shared=256)
    assert sorted(groups) == sorted([[doc_b + "q1", doc_b + "q2"], [doc_a + "q1", doc_a + "q2"], ["short one"],
                                     ["short two"], [doc_a[:200]]])  # fmt: skip


def test_prefix_scheduler_runs_leaders_first_then_their_followers():
    items = [("doc1", 1), ("doc2", 2), ("doc1", 3), ("doc1", 4), ("doc3", 5)]
    groups = [[i for i in items if i[0] == d] for d in ("doc1", "doc2", "doc3")]
    scheduler = PrefixScheduler(groups)
    order = [scheduler.next(), scheduler.next()]
    assert order == [("doc1", 1), ("doc2", 2)]
    scheduler.done(("doc1", 1))  # doc1's prefix is cached now: its followers go before doc3
    assert [scheduler.next(), scheduler.next(), scheduler.next()] == [("doc1", 3), ("doc1", 4), ("doc3", 5)]
    assert scheduler.next() is None and not scheduler.finished
    for item in [("doc2", 2), ("doc1", 3), ("doc1", 4), ("doc3", 5)]:
        scheduler.done(item)
    assert scheduler.finished


def test_runners_take_only_the_batches_of_their_model(store):
    f = _upload(store, _line("a"))
    tiny = store.create_batch(f.id, "/v1/completions", 86400, "24h", None, max_active=10, served_by="glm5-tiny")
    assert store.claim(Owner(), 30, served_by="GLM-5.2") is None
    assert store.claim(Owner(), 30, served_by="glm5-tiny").id == tiny.id
