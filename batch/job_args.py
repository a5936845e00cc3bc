"""`glmserve batch`'s command line (argparse only: building the parser imports neither Ray nor the engine)."""

import argparse


def add_batch_args(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("-i", "--input", help="OpenAI batch input lines (JSONL: custom_id, method, url, body)")
    source.add_argument("--documents", help="a directory: one request per document file (and per --prompt)")
    parser.add_argument("-o", "--output", required=True, help="result lines (JSONL), appended to when rerun")
    parser.add_argument("--error-file", help="lines that failed, with the reason (default: OUTPUT.errors.jsonl)")
    parser.add_argument(
        "--prompt",
        action="append",
        help="with --documents: the prompt, {document} standing for the file's text and {name} for its path; "
        "repeat for several questions per document (they share its prefix cache)",
    )
    parser.add_argument("--glob", default="**/*", help="with --documents: which files (default: all, recursively)")
    parser.add_argument(
        "--endpoint", default="/v1/chat/completions", choices=["/v1/chat/completions", "/v1/completions"]
    )
    parser.add_argument("--max-tokens", type=int, default=256, help="with --documents")
    parser.add_argument("--temperature", type=float, default=0.0, help="with --documents")
    parser.add_argument("--extra-body", help="with --documents: JSON merged into every request body")
    parser.add_argument("--model", help="checkpoint directory (default: the embedded glm5-tiny)")
    parser.add_argument("--served-model-name", help="the model name the requests may name (default: as serve)")
    parser.add_argument("--device", help="cpu, cuda or auto (the engine's default)")
    parser.add_argument("--engine-args", help="more engine arguments as JSON, vLLM's names (EngineArgs)")
    parser.add_argument("--concurrency", type=int, default=1, help="engine actors (one per GPU, or per CPU slot)")
    parser.add_argument("--num-cpus-per-actor", type=float, default=1.0)
    parser.add_argument("--num-gpus-per-actor", type=float, help="default: 1 when the cluster has GPUs, else 0")
    parser.add_argument("--batch-size", type=int, default=16, help="requests per task (a document's stay together)")
    parser.add_argument("--tasks-per-actor", type=int, default=4, help="tasks an actor runs at once")
    parser.add_argument("--retries", type=int, default=2, help="per request, after an overloaded engine (503)")
    parser.add_argument("--retry-failed", action="store_true", help="rerun the lines of the error file too")
    parser.add_argument("--summary-json", help="write the run's summary here too")
