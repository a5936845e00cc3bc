"""The JSON result format of every `glmserve bench ...` command (bench/report.py): its fields, a round trip, real
commands (`bench scheduler`, `bench serve` against a fake server) writing it, and the recorded results in docs/."""

import json
import platform
import re
import sys
from datetime import UTC, datetime, timedelta
from importlib import metadata
from pathlib import Path

import pytest
import torch
from test_bench_serve import server  # noqa: F401  (a fixture: a fake OpenAI server on a local port)

from glmserve.bench.report import BenchResult, command_line, write_report
from glmserve.cli import main as cli_main

FIELDS = {"command", "commit", "date", "device", "torch", "triton", "python", "rows", "extra"}
ROOT = Path(__file__).resolve().parents[1]
RECORDED = sorted((ROOT / "docs" / "bench").rglob("*.json"))


def run_cli(monkeypatch, *argv: str) -> None:
    """Run `glmserve ARGV` as the console script would: the command line is what the report records."""
    monkeypatch.setattr(sys, "argv", ["/usr/local/bin/glmserve", *argv])
    assert cli_main(list(argv)) == 0


def test_fields(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/usr/bin/glmserve", "bench", "scheduler", "--output-json", "a b.json"])
    path = tmp_path / "nested" / "out.json"
    rows = [{"context": 1024, "p50_ms": 0.09}, {"context": 32768, "p50_ms": 0.1}]
    write_report(path, rows, {"budget_ms": 2.0})
    data = json.loads(path.read_text())
    assert set(data) == FIELDS
    assert data["command"] == "glmserve bench scheduler --output-json 'a b.json'"
    assert data["commit"] is None or re.fullmatch(r"[0-9a-f]{40}", data["commit"])
    date = datetime.fromisoformat(data["date"])
    assert date.utcoffset() == timedelta(0) and abs(datetime.now(UTC) - date) < timedelta(minutes=1)
    if torch.cuda.is_available():
        assert data["device"] == torch.cuda.get_device_name()
    else:
        assert re.fullmatch(r"cpu: .+, \d+ cores", data["device"])
    assert data["torch"] == torch.__version__
    assert data["triton"] == metadata.version("triton")
    assert data["python"] == platform.python_version()
    assert data["rows"] == rows and data["extra"] == {"budget_ms": 2.0}
    write_report(path, rows)
    assert json.loads(path.read_text())["extra"] == {}


def test_round_trip(tmp_path):
    path = tmp_path / "out.json"
    written = write_report(path, [{"case": "x", "ms": 1.5, "nested": {"k": [1, None]}}], {"errors": {}})
    assert BenchResult.model_validate_json(path.read_text()) == written
    with pytest.raises(ValueError):
        BenchResult.model_validate(json.loads(path.read_text()) | {"unknown": 1})
    with pytest.raises(ValueError):  # a date without a time zone is not UTC
        BenchResult.model_validate(json.loads(path.read_text()) | {"date": "2026-11-29T03:56:37"})


def test_command_line_of_a_module_run(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/src/glmserve/bench/kernels.py", "--out", "k.json"])
    spec = type("Spec", (), {"name": "glmserve.bench.kernels"})()
    monkeypatch.setattr(sys.modules["__main__"], "__spec__", spec, raising=False)
    assert command_line() == "python -m glmserve.bench.kernels --out k.json"


def test_bench_scheduler_writes_the_format(tmp_path, monkeypatch):
    out = tmp_path / "scheduler.json"
    argv = ["bench", "scheduler", "--num-seqs", "4", "--contexts", "64", "256", "--steps", "5", "--output-json"]
    run_cli(monkeypatch, *argv, str(out))
    result = BenchResult.model_validate_json(out.read_text())
    assert result.command == "glmserve " + " ".join([*argv, str(out)])
    assert [r["context"] for r in result.rows] == [64, 256]
    assert all(r["p50_ms"] > 0 and r["vs_shortest_context"] > 0 for r in result.rows)
    assert result.extra == {"budget_ms": 2.0, "steps": 5}


def test_bench_serve_writes_the_format(server, tmp_path, monkeypatch):  # noqa: F811
    out = tmp_path / "serve.json"
    run_cli(
        monkeypatch, "bench", "serve", "--base-url", server[1], "--num-requests", "3", "--input-len", "8",
        "--output-len", "4", "--token-ids", "--no-progress", "--output-json", str(out),
    )  # fmt: skip
    result = BenchResult.model_validate_json(out.read_text())
    assert result.command.startswith("glmserve bench serve --base-url")
    (row,) = result.rows
    assert (row["completed"], row["failed"], row["model_id"]) == (3, 0, "fake-model")
    assert row["total_output_tokens"] == 12 and row["p99_ttft_ms"] > 0
    assert result.extra["output_lens"] == [4, 4, 4] and len(result.extra["ttfts"]) == 3
    assert result.extra["config"]["num_requests"] == 3


def test_kernel_and_model_reports_write_the_format(tmp_path, monkeypatch):
    """`bench kernels` and `bench model` need CUDA; the report they share is exercised here with sections of its own."""
    from glmserve.bench.kernels import BenchReport, Row

    monkeypatch.setattr(sys, "argv", ["glmserve", "bench", "kernels", "--output-json", "k.json"])
    report = BenchReport(tmp_path / "k.json")

    def measured() -> dict:
        report.rows.append(Row("topk", "8K keys", 2.0, peer="torch.topk", peer_ms=3.0))
        return {"detail": 1}

    def broken() -> None:
        raise RuntimeError("no such kernel")

    report.run_sections([("measured", measured), ("broken", broken)])
    report.finish()
    result = BenchResult.model_validate_json((tmp_path / "k.json").read_text())
    assert result.command == "glmserve bench kernels --output-json k.json"
    (row,) = result.rows
    assert (row["case"], row["ms"], row["speedup"]) == ("8K keys", 2.0, 1.5)
    assert result.extra["measured"] == {"detail": 1} and "no such kernel" in result.extra["errors"]["broken"]
    assert set(result.extra["section_seconds"]) == {"measured", "broken"} and "8K keys" in result.extra["table"]


@pytest.mark.parametrize("path", RECORDED, ids=lambda p: str(p.relative_to(ROOT / "docs" / "bench")))
def test_recorded_results_are_in_the_format(path):
    result = BenchResult.model_validate_json(path.read_text())
    assert result.command.startswith("glmserve bench ") and result.rows
    assert f" {path.relative_to(ROOT)}" in result.command  # the command that wrote it there


def test_the_docs_name_recorded_results_that_exist():
    named = set()
    for page in ("docs/benchmarks.md", "docs/bench/notes.md"):
        for path in re.findall(r"docs/bench/[\w/{},.]+\.json", (ROOT / page).read_text()):
            stem, _, rest = path.partition("{")  # `a_{x,y}.json` names a_x.json and a_y.json
            choices, _, suffix = rest.partition("}")
            named |= {f"{stem}{c}{suffix}" for c in choices.split(",")} if rest else {path}
    assert named <= {str(p.relative_to(ROOT)) for p in RECORDED}
    assert {str(p.relative_to(ROOT)) for p in RECORDED if "/runs/" not in str(p)} <= named
