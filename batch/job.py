"""`glmserve batch`: an offline batch job on Ray Data, OpenAI batch lines in (or one request per document of a
directory), result lines out.

    glmserve batch -i requests.jsonl -o results.jsonl
    glmserve batch --documents papers/ --prompt "{document}\\n\\nSummarize this paper." -o summaries.jsonl

The driver reads the input, sorts out the malformed lines (they go to the error file at once, with the reason), drops
the requests whose `custom_id` is already in the output or error file (so rerunning the same command finishes what an
interrupted run left), groups the rest by shared prompt start (a document's requests) and packs whole groups into
tasks of about `--batch-size` requests. Ray Data hands the tasks to `--concurrency` engine actors (`EngineActor`, one
per GPU, or per CPU slot), each running `--tasks-per-actor` tasks at once; an actor runs a group's first request
before the others, so the document is prefilled once and its other requests are served from the prefix cache. The
actor's engine is a `glmserve.LLM` driven through the same OpenAIServer handlers the online API answers with, so a
line's result is what `/v1/chat/completions` or `/v1/completions` would have returned.

Results are appended as tasks finish (in completion order, not input order: match them by `custom_id`), a line at a
time and flushed, so a kill loses only what was in flight; a line cut short by the kill is dropped on the next run.
A request that fails (its body refused, an engine error) goes to the error file and the job goes on; so do the rows
of a task whose actor died (they are counted as not finished, and a rerun does them).
"""

import asyncio
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from tqdm import tqdm

from .grouping import PrefixScheduler, group_by_prefix
from .lines import SUPPORTED_URLS, LineError, Request, error_line, parse_line, prompt_start, read_request, scan_lines

log = logging.getLogger(__name__)


class JobConfig(BaseModel):
    """What `glmserve batch` was asked to do (its flags, validated)."""

    model_config = ConfigDict(extra="forbid")

    input: Path | None = None
    documents: Path | None = None
    output: Path
    error_file: Path | None = None
    prompt: list[str] = Field(default_factory=list)
    glob: str = "**/*"
    endpoint: Literal["/v1/chat/completions", "/v1/completions"] = "/v1/chat/completions"
    max_tokens: int = Field(256, ge=1)
    temperature: float = Field(0.0, ge=0, le=2)
    extra_body: dict[str, Any] = Field(default_factory=dict)
    model: str | None = None
    served_model_name: str | None = None
    device: str | None = None
    engine_args: dict[str, Any] = Field(default_factory=dict)
    concurrency: int = Field(1, ge=1, le=4096)
    num_cpus_per_actor: float = Field(1.0, gt=0)
    num_gpus_per_actor: float | None = Field(None, ge=0)
    batch_size: int = Field(16, ge=1, le=65536)
    tasks_per_actor: int = Field(4, ge=1, le=256)
    retries: int = Field(2, ge=0, le=10)
    retry_failed: bool = False
    summary_json: Path | None = None

    @model_validator(mode="after")
    def _consistent(self) -> "JobConfig":
        if (self.input is None) == (self.documents is None):
            raise ValueError("give either --input or --documents")
        if self.documents is not None:
            if not self.prompt:
                raise ValueError("--documents needs --prompt (with {document} where the file's text goes)")
            for template in self.prompt:
                if "{document}" not in template:
                    raise ValueError(f"--prompt {template[:40]!r} has no {{document}}")
        elif self.prompt:
            raise ValueError("--prompt goes with --documents")
        return self

    @property
    def errors_path(self) -> Path:
        return self.error_file or self.output.with_name(self.output.name.removesuffix(".jsonl") + ".errors.jsonl")

    @property
    def model_name(self) -> str:
        """As `glmserve serve` names it: requests may say `"model": NAME` or nothing."""
        if self.served_model_name:
            return self.served_model_name
        return Path(self.model).name if self.model else "glm5-tiny"

    def engine(self) -> dict[str, Any]:
        from glmserve.engine.engine_args import EngineArgs

        extra = {"device": self.device} if self.device else {}
        return EngineArgs(model=self.model, **extra, **self.engine_args).model_dump()

    def defaults(self) -> dict[str, Any]:
        """The body fields of a document request besides its prompt."""
        return {"max_tokens": self.max_tokens, "temperature": self.temperature, **self.extra_body}

    @classmethod
    def from_args(cls, args) -> "JobConfig":
        data = {k: v for k, v in vars(args).items() if k in cls.model_fields and v is not None}
        for key in ("extra_body", "engine_args"):
            if isinstance(data.get(key), str):
                try:
                    data[key] = json.loads(data[key])
                except json.JSONDecodeError as e:
                    raise ValueError(f"--{key.replace('_', '-')} is not valid JSON: {e}") from None
        return cls.model_validate(data)


# ---- resuming ----
@dataclass
class Done:
    """What earlier runs finished: custom_ids with a result line, and malformed input lines already reported."""

    ids: set[str] = field(default_factory=set)
    lines: set[int] = field(default_factory=set)


def truncate_partial_line(path: Path) -> int:
    """Drop a last line that a killed run left without its newline; the bytes dropped."""
    with open(path, "rb+") as f:
        end = f.seek(0, os.SEEK_END)
        position = end
        while position > 0:
            step = min(1 << 16, position)
            f.seek(position - step)
            block = f.read(step)
            newline = block.rfind(b"\n")
            if newline >= 0:
                keep = position - step + newline + 1
                break
            position -= step
        else:
            keep = 0
        if keep < end:
            f.truncate(keep)
            log.warning("%s: dropped %d bytes of a line cut short by an interrupted run", path, end - keep)
        return end - keep


def read_done(output: Path, errors: Path, retry_failed: bool = False) -> Done:
    done = Done()
    if retry_failed and errors.exists():
        previous = errors.with_name(errors.name + ".previous")
        os.replace(errors, previous)
        log.info("retrying the failed lines: the old error file is now %s", previous)
    for path in (output, errors):
        if not path.exists():
            continue
        truncate_partial_line(path)
        with open(path, "rb") as f:
            for number, raw in enumerate(f, 1):
                try:
                    result = json.loads(raw)
                except json.JSONDecodeError:
                    log.warning("%s:%d is not a result line; ignored", path, number)
                    continue
                error = result.get("error") or {}
                if result.get("response") is None and isinstance(error.get("line"), int):
                    done.lines.add(error["line"])  # a malformed input line, reported by its number
                elif isinstance(result.get("custom_id"), str):
                    done.ids.add(result["custom_id"])
    return done


# ---- planning ----
@dataclass
class Plan:
    tasks: list[list[dict[str, Any]]]  # each a list of rows; a group's rows stay in one task
    malformed: list[LineError]  # to report now
    total: int  # requests in the input, malformed included
    skipped: int  # finished by an earlier run

    @property
    def to_run(self) -> int:
        return sum(map(len, self.tasks))


def plan_job(config: JobConfig, done: Done) -> Plan:
    rows: list[tuple[dict[str, Any], str]] = []  # (row, the prompt's start)
    malformed: list[LineError] = []
    total = skipped = 0
    if config.input is not None:
        with open(config.input, "rb") as f:
            for item in scan_lines(f, SUPPORTED_URLS):
                total += 1
                if isinstance(item, LineError):
                    if item.line in done.lines:
                        skipped += 1
                    else:
                        malformed.append(item)
                elif item.custom_id in done.ids:
                    skipped += 1
                else:
                    row = {"kind": "line", "custom_id": item.custom_id, "path": str(config.input.resolve()),
                           "line": item.line, "offset": item.offset, "length": item.length, "prompt": -1}  # fmt: skip
                    rows.append((row, prompt_start(item.body)))
    else:
        root = config.documents
        if not root.is_dir():
            raise FileNotFoundError(f"--documents {root}: not a directory")
        for path in sorted(p for p in root.glob(config.glob) if p.is_file()):
            name = path.relative_to(root).as_posix()
            document_key = "\0" + hashlib.sha256(str(path).encode()).hexdigest()[:16]  # its requests share it
            for k in range(len(config.prompt)):
                total += 1
                custom_id = name if len(config.prompt) == 1 else f"{name}#{k}"
                if custom_id in done.ids:
                    skipped += 1
                    continue
                row = {"kind": "doc", "custom_id": custom_id, "path": str(path.resolve()), "line": 0, "offset": 0,
                       "length": 0, "prompt": k}  # fmt: skip
                rows.append((row, document_key))
    groups = group_by_prefix(rows, text=lambda r: r[1])
    return Plan(_pack([[row for row, _ in g] for g in groups], config.batch_size), malformed, total, skipped)


def _pack(groups: list[list[dict[str, Any]]], size: int) -> list[list[dict[str, Any]]]:
    """Whole groups into tasks of up to `size` rows (a larger group is split into tasks of its own)."""
    tasks: list[list[dict[str, Any]]] = []
    current: list[dict[str, Any]] = []
    for group in groups:
        if len(group) > size:
            tasks += [group[i : i + size] for i in range(0, len(group), size)]
            continue
        if len(current) + len(group) > size:
            tasks.append(current)
            current = []
        current += group
    if current:
        tasks.append(current)
    return tasks


# ---- the engine actor ----
class EngineActor:
    """One engine (a `glmserve.LLM`) behind the OpenAI handlers, in a Ray Data actor: a task's rows in, their
    result lines out."""

    def __init__(self, engine: dict, model_name: str, prompts: list[str], endpoint: str, defaults: dict,
                 retries: int):  # fmt: skip
        from glmserve.api.openai_server import OpenAIServer
        from glmserve.decode.server import DecodeWorker
        from glmserve.engine.engine_args import EngineArgs
        from glmserve.engine.llm import LLM
        from glmserve.model.default_checkpoint import default_checkpoint
        from glmserve.model.tokenizer import Tokenizer

        logging.basicConfig(level=logging.INFO)
        args = EngineArgs.model_validate(engine)
        self.llm = LLM(**args.model_dump())
        worker = DecodeWorker(args, engine=self.llm.engine)  # the offline engine, driven as a colocated worker
        max_model_len = args.max_model_len or worker.engine.config.max_position_embeddings
        tokenizer = Tokenizer.from_pretrained(args.model or default_checkpoint())
        self.server = OpenAIServer(worker, tokenizer, model_name, max_model_len=max_model_len)
        self.handlers = {"/v1/chat/completions": self.server.chat, "/v1/completions": self.server.completions}
        self.prompts, self.endpoint, self.defaults, self.retries = prompts, endpoint, defaults, retries

    def _request(self, row: dict[str, Any]) -> Request | LineError:
        if row["kind"] == "line":
            raw = read_request(Path(row["path"]), row["offset"], row["length"])
            return parse_line(raw, row["line"], SUPPORTED_URLS, row["offset"])
        try:
            text = Path(row["path"]).read_text(encoding="utf-8", errors="replace")
        except OSError as e:
            return LineError(0, row["custom_id"], "unreadable_document", f"{row['custom_id']}: {e}")
        prompt = self.prompts[row["prompt"]].replace("{name}", row["custom_id"]).replace("{document}", text)
        if self.endpoint == "/v1/chat/completions":
            body = {"messages": [{"role": "user", "content": prompt}], **self.defaults}
        else:
            body = {"prompt": prompt, **self.defaults}
        return Request(0, row["custom_id"], self.endpoint, body, 0, 0)

    async def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        from .runner import run_request

        began = time.time()
        rows = [row for text in batch["task"] for row in json.loads(text)]
        items = await asyncio.to_thread(lambda: [self._request(row) for row in rows])
        results: dict[int, tuple[bool, dict[str, Any]]] = {}
        for i, item in enumerate(items):
            if isinstance(item, LineError):
                results[i] = (False, error_line(item.custom_id, item.code, item.message, item.line or None))
        valid = [i for i, item in enumerate(items) if isinstance(item, Request)]
        scheduler = PrefixScheduler(group_by_prefix(valid, text=lambda i: prompt_start(items[i].body)))
        running: dict[asyncio.Task, int] = {}
        while not scheduler.finished:
            while (i := scheduler.next()) is not None:
                item = items[i]
                running[asyncio.ensure_future(run_request(self.handlers[item.url], item, self.retries))] = i
            finished, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
            for task in finished:
                i = running.pop(task)
                results[i] = task.result()
                scheduler.done(i)
        ended = time.time()
        columns = ("custom_id", "ok", "text", "prompt_tokens", "completion_tokens", "cached_tokens", "began", "ended")
        out: dict[str, list] = {key: [] for key in columns}
        for i, row in enumerate(rows):
            ok, line = results[i]
            usage = ((line.get("response") or {}).get("body") or {}).get("usage") or {}
            out["custom_id"].append(row["custom_id"])
            out["ok"].append(ok)
            out["text"].append(json.dumps(line, ensure_ascii=False))
            out["prompt_tokens"].append(int(usage.get("prompt_tokens") or 0))
            out["completion_tokens"].append(int(usage.get("completion_tokens") or 0))
            out["cached_tokens"].append(int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0))
            out["began"].append(began)
            out["ended"].append(ended)
        return out


# ---- the run ----
@dataclass
class Summary:
    requests: int = 0  # in the input
    skipped: int = 0  # finished by an earlier run
    ran: int = 0  # sent to the engines by this run
    succeeded: int = 0
    failed: int = 0  # this run's error lines (malformed input included)
    not_finished: int = 0  # lost with an actor that died: a rerun does them
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    seconds: float = 0.0  # the whole run: Ray's start, the engines' load, the work
    engine_seconds: float = 0.0  # from the first task's start to the last one's end, on the engines' clocks
    actors: int = 0

    @property
    def cached_share(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    def as_dict(self) -> dict[str, Any]:
        """The counts, and throughput over the whole run and over the engines' working time."""
        data: dict[str, Any] = {**asdict(self), "cached_share": round(self.cached_share, 4)}
        for suffix, seconds in (("", self.seconds), ("_engine", self.engine_seconds)):
            s = max(seconds, 1e-9)
            data[f"requests_per_s{suffix}"] = round(self.succeeded / s, 3)
            data[f"completion_tokens_per_s{suffix}"] = round(self.completion_tokens / s, 1)
            data[f"tokens_per_s{suffix}"] = round((self.prompt_tokens + self.completion_tokens) / s, 1)
        return data


def _init_ray() -> None:
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"])
    else:
        ray.init(include_dashboard=False, log_to_driver=False)


def _results(config: JobConfig, plan: Plan, gpus: float) -> Iterator[dict[str, Any]]:
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    context = DataContext.get_current()
    context.enable_progress_bars = False  # ours counts requests and tokens
    context.max_errored_blocks = -1  # a task whose actor died is counted as not finished; the job goes on
    items = [{"task": json.dumps(task)} for task in plan.tasks]
    dataset = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        EngineActor,
        batch_size=1,
        compute=ActorPoolStrategy(size=config.concurrency, max_concurrent_calls_per_actor=config.tasks_per_actor),
        num_cpus=config.num_cpus_per_actor,
        num_gpus=gpus,
        fn_constructor_kwargs={
            "engine": config.engine(),
            "model_name": config.model_name,
            "prompts": config.prompt,
            "endpoint": config.endpoint,
            "defaults": config.defaults(),
            "retries": config.retries,
        },
    )
    yield from dataset.iter_rows()


def run_job(config: JobConfig) -> Summary:
    started = time.perf_counter()
    output, errors = config.output, config.errors_path
    output.parent.mkdir(parents=True, exist_ok=True)
    errors.parent.mkdir(parents=True, exist_ok=True)
    done = read_done(output, errors, config.retry_failed)
    plan = plan_job(config, done)
    summary = Summary(requests=plan.total, skipped=plan.skipped, ran=plan.to_run, actors=config.concurrency)
    log.info("%d requests: %d done by earlier runs, %d to run, %d malformed", plan.total, plan.skipped, plan.to_run,
             len(plan.malformed))  # fmt: skip
    with open(output, "ab") as out, open(errors, "ab") as err:
        for item in plan.malformed:
            err.write(json.dumps(error_line(item.custom_id, item.code, item.message, item.line)).encode() + b"\n")
            summary.failed += 1
        err.flush()
        if plan.tasks:
            _init_ray()
            import ray

            gpus = config.num_gpus_per_actor
            if gpus is None:
                gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
            received, first, last = 0, float("inf"), 0.0
            with tqdm(total=plan.to_run, desc="batch", unit="req", dynamic_ncols=True) as bar:
                for row in _results(config, plan, gpus):
                    (out if row["ok"] else err).write(row["text"].encode() + b"\n")
                    (out if row["ok"] else err).flush()
                    received += 1
                    first, last = min(first, float(row["began"])), max(last, float(row["ended"]))
                    summary.succeeded += bool(row["ok"])
                    summary.failed += not row["ok"]
                    summary.prompt_tokens += int(row["prompt_tokens"])
                    summary.completion_tokens += int(row["completion_tokens"])
                    summary.cached_tokens += int(row["cached_tokens"])
                    elapsed = max(time.perf_counter() - started, 1e-9)
                    bar.set_postfix(
                        {
                            "gen tok/s": f"{summary.completion_tokens / elapsed:.0f}",
                            "tok/s": f"{(summary.prompt_tokens + summary.completion_tokens) / elapsed:.0f}",
                            "cached": f"{summary.cached_share:.0%}",
                            "errors": summary.failed,
                        },
                        refresh=False,
                    )
                    bar.update()
            summary.not_finished = plan.to_run - received
            summary.engine_seconds = max(0.0, last - first) if received else 0.0
    summary.seconds = time.perf_counter() - started
    if config.summary_json is not None:
        config.summary_json.write_text(json.dumps(summary.as_dict(), indent=2) + "\n")
    return summary


def print_summary(summary: Summary, config: JobConfig) -> None:
    from rich.console import Console
    from rich.table import Table

    data = summary.as_dict()
    table = Table(title="glmserve batch", show_header=False)
    rows = [
        ("requests in the input", f"{summary.requests:,}"),
        ("done by earlier runs (skipped)", f"{summary.skipped:,}"),
        ("run now", f"{summary.ran:,} on {summary.actors} engine actor(s)"),
        ("succeeded / failed", f"{summary.succeeded:,} / {summary.failed:,}"),
        ("prompt / completion tokens", f"{summary.prompt_tokens:,} / {summary.completion_tokens:,}"),
        ("cached prompt tokens", f"{summary.cached_tokens:,} ({summary.cached_share:.1%})"),
        ("time", f"{summary.seconds:.1f} s ({summary.engine_seconds:.1f} s of it on the engines)"),
        ("throughput, whole run", _rate(data, "")),
        ("throughput on the engines", _rate(data, "_engine")),
        ("output / errors", f"{config.output} / {config.errors_path}"),
    ]
    if summary.not_finished:
        rows.append(("not finished (rerun to do them)", f"{summary.not_finished:,}"))
    for name, value in rows:
        table.add_row(name, value)
    Console(stderr=True).print(table)


def _rate(data: dict[str, Any], suffix: str) -> str:
    return (
        f"{data['requests_per_s' + suffix]} req/s, {data['tokens_per_s' + suffix]:,} tok/s "
        f"({data['completion_tokens_per_s' + suffix]:,} generated)"
    )


def main(args) -> int:
    try:
        config = JobConfig.from_args(args)
    except (ValidationError, ValueError) as e:
        log.error("glmserve batch: %s", e)
        return 2
    try:
        summary = run_job(config)
    except FileNotFoundError as e:
        log.error("glmserve batch: %s", e)
        return 2
    print_summary(summary, config)
    return 0 if summary.not_finished == 0 else 1
