"""The OpenAI-compatible endpoints: validate, apply the chat template, tokenize, stream from a decode worker,
and shape the result (reasoning split, tool calls, logprobs, usage) as OpenAI and Z.AI clients expect.

Cheap checks first (`limits`): stop-string counts and lengths, a prompt-length bound from its characters, token-id
prompts by their length; then rendering and tokenization, off the event loop when the request is big, so a long
prompt never stalls the other streams of the replica. The engine knows each request by an id of its own; a client's
`request_id` is only echoed back as the response's id.
"""

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol, TypeVar

from pydantic import ValidationError

from glmserve.engine.admission import Admission, Overloaded, Ticket
from glmserve.engine.async_engine import EngineDeadError, EngineStopped
from glmserve.engine.grammar import GrammarCompiler
from glmserve.engine.outputs import CompletionDelta, RequestOutput
from glmserve.engine.remote import RemotePrefillFailed
from glmserve.engine.request import EngineRequest
from glmserve.engine.sampling_params import SamplingParams
from glmserve.engine.validation import InvalidRequest
from glmserve.model.chat_template import ChatTemplateError
from glmserve.model.tokenizer import Tokenizer

from .chat_assembler import ChoiceAssembler, chat_logprobs, finish_reason
from .errors import (
    APIError,
    InvalidRequestError,
    ModelNotFoundError,
    RateLimitError,
    ServiceUnavailableError,
    from_validation_error,
)
from .limits import INLINE_CHARS, RequestLimits, chat_prompt_chars, max_chars_per_token
from .metrics import Metrics
from .quota import Quotas
from .request_models import ChatCompletionRequest, CompletionRequest, GenerationRequest
from .response_models import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatDelta,
    ChatLogprobs,
    ChatResponseMessage,
    Completion,
    CompletionChoice,
    CompletionChunk,
    CompletionChunkChoice,
    CompletionLogprobs,
    FunctionCall,
    ModelCard,
    ModelList,
    ToolCall,
    Usage,
    random_id,
)
from .sse import SSE_DONE, sse_event

log = logging.getLogger(__name__)
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's legacy default for /v1/completions
INLINE_BODY_BYTES = 4096  # bodies up to this are parsed, rendered and tokenized on the event loop
_WORKERS = 2  # threads that parse, render and tokenize big requests (they queue beyond that)
T = TypeVar("T")


class EngineClient(Protocol):
    """Where requests go: the decode worker beside this API (`DecodeWorker`), or any in-process engine."""

    def generate(self, request: EngineRequest) -> AsyncIterator[RequestOutput]: ...


class _Timer:
    """One request's latencies into the metrics, from its arrival at the server (so queueing and prefill count):
    TTFT, inter-token latency and end-to-end, and the queue / prefill / decode phases vLLM reports."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics
        self.arrived = self.last = time.perf_counter()
        self.first_at: float | None = None

    def output(self, out: RequestOutput) -> None:
        n = max((len(d.token_ids) for d in out.deltas), default=0)  # n > 1 choices advance side by side
        if n == 0:
            return
        now = time.perf_counter()
        if self.first_at is None:
            self.first_at = now
            self.metrics.ttft.observe(now - self.arrived)
            started = out.scheduled_at if out.scheduled_at is not None else self.arrived
            self.metrics.queue_time.observe(max(0.0, started - self.arrived))
            self.metrics.prefill_time.observe(max(0.0, now - started))
        else:
            for _ in range(n):  # several tokens in one step (speculative decoding) share the gap
                self.metrics.itl.observe((now - self.last) / n)
        self.last = now

    def done(self, reasons: list[str | None], prompt_tokens: int, completion_tokens: int) -> None:
        now = time.perf_counter()
        self.metrics.e2e.observe(now - self.arrived)
        if self.first_at is not None:
            self.metrics.decode_time.observe(now - self.first_at)
        for reason in reasons:
            self.metrics.finished(reason or "abort")
        self.metrics.prompt_tokens.inc(prompt_tokens)
        self.metrics.generation_tokens.inc(completion_tokens)


class _Call:
    """What one request carries through the server: its timer, the API key it came with, its admission ticket."""

    def __init__(self, server: "OpenAIServer", key: str | None):
        self.server = server
        self.timer = _Timer(server.metrics)
        self.key = key
        self.ticket: Ticket | None = None

    def done(self, reasons: list[str | None], usage: Usage) -> None:
        self.timer.done(reasons, usage.prompt_tokens, usage.completion_tokens)
        self.server.quotas.used(self.key, usage.completion_tokens)


class OpenAIServer:
    def __init__(
        self,
        client: EngineClient,
        tokenizer: Tokenizer,
        model_name: str,
        max_model_len: int,
        metrics: Metrics | None = None,
        limits: RequestLimits | None = None,
        admission: Admission | None = None,
        quotas: Quotas | None = None,
    ):
        """`admission`: this replica's overload limits (none by default); `quotas`: per-API-key rates."""
        self.client = client
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.metrics = metrics or Metrics(model_name)
        self.limits = limits or RequestLimits()
        self.admission = admission or Admission()
        self.quotas = quotas or Quotas([])
        self.max_prompt_chars = max_model_len * max_chars_per_token(tokenizer)
        self._executor = ThreadPoolExecutor(_WORKERS, thread_name_prefix="api-prepare")
        self.grammars = GrammarCompiler(tokenizer)  # structured output is compiled here first: a bad one is a 400

    def models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=self.model_name, max_model_len=self.max_model_len)])

    # ---- shared steps ----
    async def _off_loop(self, big: bool, work: Callable[[], T]) -> T:
        """`work()`, in the worker threads when the request is big (inline otherwise: a thread hop costs more)."""
        if not big:
            return work()
        return await asyncio.get_running_loop().run_in_executor(self._executor, work)

    async def _parse(self, model: type[GenerationRequest], raw: bytes) -> GenerationRequest:
        req = await self._off_loop(len(raw) > INLINE_BODY_BYTES, lambda: self._validate(model, raw))
        self._check_model(req.model)
        self.limits.check(req)
        return req

    @staticmethod
    def _validate(model: type[GenerationRequest], raw: bytes) -> GenerationRequest:
        try:
            return model.model_validate_json(raw)
        except ValidationError as e:
            if any(err["type"] == "json_invalid" for err in e.errors()):
                raise InvalidRequestError(f"the body is not valid JSON: {e.errors()[0]['msg']}") from None
            raise from_validation_error(e) from None

    def _check_prompt_chars(self, chars: int, param: str) -> None:
        if chars > self.max_prompt_chars:
            raise InvalidRequestError(
                f"the prompt has {chars} characters, more than {self.max_model_len} tokens can hold "
                f"(this model serves at most {self.max_model_len} tokens)",
                param=param,
            )

    def _check_prompt_ids(self, ids: list[int]) -> None:
        if len(ids) >= self.max_model_len:
            raise InvalidRequestError(
                f"the prompt has {len(ids)} tokens; this model serves at most {self.max_model_len} tokens "
                "(prompt plus at least one generated token)",
                param="prompt",
            )

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise ModelNotFoundError(model)

    def _params(self, req: GenerationRequest, default_max_tokens: int) -> SamplingParams:
        try:
            params = SamplingParams(**req.sampling_params(default_max_tokens=max(1, default_max_tokens)))
        except ValidationError as e:
            raise from_validation_error(e) from None
        if params.structured_outputs is not None:
            try:
                self.grammars.compile(params.structured_outputs)
            except InvalidRequest as e:  # named by the request field that asked for it
                raise InvalidRequestError(str(e), param=req.structured_output()[1]) from None
        return params  # the prompt and stop ids are checked where they meet the engine (engine.validation)

    def _reserve(self, call: _Call, num_seqs: int) -> Ticket:
        """A place in this replica for the request, before its prompt is rendered (503 when overloaded)."""
        try:
            call.ticket = self.admission.reserve(num_seqs)
        except Overloaded as e:
            raise self._rejection(e) from None
        return call.ticket

    def _admit(self, call: _Call, prompt_tokens: int) -> None:
        """The prompt's admission: the replica's backlog (503), then the key's quota (429; charged only for a request
        that runs)."""
        try:
            call.ticket.admit_prompt(prompt_tokens)
        except Overloaded as e:
            raise self._rejection(e) from None
        try:
            self.quotas.admit(call.key, prompt_tokens)
        except RateLimitError as e:  # the caller releases the ticket
            self.metrics.rejected(e.code or "quota")
            raise

    def _rejection(self, e: Overloaded) -> ServiceUnavailableError:
        self.metrics.rejected(e.reason)
        log.debug("refused a request: %s", e)
        return ServiceUnavailableError(str(e), retry_after=e.retry_after)

    async def _stream(self, request: EngineRequest, ticket: Ticket) -> AsyncIterator[RequestOutput]:
        """The worker's outputs. The first is awaited before returning, so a request the worker refuses becomes a
        4xx response rather than an error inside a stream that already said 200. From here the stream holds the
        ticket: it is released when the stream ends, however it ends."""
        outputs = self._outputs(request, ticket)
        first = await anext(outputs)

        async def chained() -> AsyncIterator[RequestOutput]:
            yield first
            async for out in outputs:
                yield out

        return chained()

    async def _outputs(self, request: EngineRequest, ticket: Ticket) -> AsyncIterator[RequestOutput]:
        try:
            async for out in self.client.generate(request):
                if any(d.token_ids for d in out.deltas):
                    ticket.first_token()
                yield out
        except InvalidRequest as e:
            raise InvalidRequestError(str(e), param=e.param) from None
        except RemotePrefillFailed as e:
            raise ServiceUnavailableError(str(e).splitlines()[-1], retry_after=1) from None
        except EngineStopped as e:  # the replica is being removed (scale-down, upgrade) and could not finish it
            raise ServiceUnavailableError(str(e), retry_after=1, code="replica_stopping") from None
        except EngineDeadError as e:  # e.g. a rank of a parallel replica died; Serve's health check replaces it
            raise ServiceUnavailableError(f"this replica's engine stopped: {e}", retry_after=1) from None
        finally:
            ticket.release()

    # ---- /v1/chat/completions ----
    async def chat(self, raw: bytes, key: str | None = None) -> ChatCompletion | AsyncIterator[str]:
        """`key`: the name of the API key the request came with (its quota applies)."""
        call = _Call(self, key)
        req = await self._parse(ChatCompletionRequest, raw)
        self._check_prompt_chars(chat_prompt_chars(req), "messages")
        ticket = self._reserve(call, req.n)
        try:
            return await self._chat(call, req, len(raw) > INLINE_BODY_BYTES)
        except BaseException:
            ticket.release()
            raise

    async def _chat(self, call: _Call, req: ChatCompletionRequest, big: bool) -> ChatCompletion | AsyncIterator[str]:
        kwargs = req.template_kwargs()

        def render() -> tuple[str, list[int]]:
            try:
                prompt = self.tokenizer.apply_chat_template(**kwargs)
            except ChatTemplateError as e:
                raise InvalidRequestError(str(e), param="messages") from None
            self._check_prompt_chars(len(prompt), "messages")
            return prompt, self.tokenizer.encode(prompt)

        prompt, ids = await self._off_loop(big, render)
        params = self._params(req, self.max_model_len - len(ids))
        self._admit(call, len(ids))
        request_id = random_id("chatcmpl")
        engine_request = EngineRequest(request_id=request_id, prompt_token_ids=ids, params=params)
        response_id = req.request_id or request_id
        log.debug("chat request %s (client id %r): %d prompt tokens", request_id, req.request_id, len(ids))
        assemblers = [
            ChoiceAssembler(prompt.endswith("<think>"), kwargs["tools"], req.tool_stream) for _ in range(params.n)
        ]
        top = req.top_logprobs or 0
        stream = await self._stream(engine_request, call.ticket)
        if req.stream:
            return self._chat_stream(call, req, engine_request, response_id, stream, assemblers, top)
        return await self._chat_full(call, engine_request, response_id, stream, assemblers, top)

    async def _chat_full(
        self,
        call: _Call,
        request: EngineRequest,
        response_id: str,
        stream: AsyncIterator[RequestOutput],
        assemblers: list[ChoiceAssembler],
        top: int,
    ) -> ChatCompletion:
        logprobs = [[] for _ in assemblers]
        tokens = [[] for _ in assemblers]
        reasons: list[str | None] = [None] * len(assemblers)
        last = None
        async for out in stream:
            last = out
            call.timer.output(out)
            for d in out.deltas:
                assemblers[d.index].feed(d.text)
                tokens[d.index] += d.token_ids
                if d.logprobs is not None:
                    logprobs[d.index] += chat_logprobs(d.token_ids, d.logprobs, top)
                reasons[d.index] = d.finish_reason or reasons[d.index]
        choices = []
        for i, a in enumerate(assemblers):
            a.finish()
            calls = [ToolCall(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments)) for c in a.tool_calls]
            message = ChatResponseMessage(
                content=a.content or (None if calls else ""),
                reasoning_content=a.reasoning or None,
                tool_calls=calls or None,
            )
            choices.append(
                ChatChoice(
                    index=i,
                    message=message,
                    logprobs=ChatLogprobs(content=logprobs[i]) if request.params.logprobs is not None else None,
                    finish_reason=finish_reason(reasons[i], a),
                )
            )
        usage = self._usage(last, sum(map(len, tokens)))
        call.done(reasons, usage)
        return ChatCompletion(id=response_id, model=self.model_name, choices=choices, usage=usage)

    async def _chat_stream(
        self,
        call: _Call,
        req: ChatCompletionRequest,
        request: EngineRequest,
        response_id: str,
        stream: AsyncIterator[RequestOutput],
        assemblers: list[ChoiceAssembler],
        top: int,
    ) -> AsyncIterator[str]:
        def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> str:
            return sse_event(ChatCompletionChunk(id=response_id, model=self.model_name, choices=choices, usage=usage))

        completion_tokens = 0
        reasons: list[str | None] = [None] * len(assemblers)
        last = None
        try:
            yield chunk(
                [
                    ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content=""))
                    for i in range(len(assemblers))
                ]
            )
            async for out in stream:
                last = out
                call.timer.output(out)
                choices = []
                for d in out.deltas:
                    completion_tokens += len(d.token_ids)
                    a = assemblers[d.index]
                    delta = a.feed(d.text)
                    if d.finish_reason is not None:
                        delta = _merge(delta, a.finish())
                        reasons[d.index] = d.finish_reason
                    lp = chat_logprobs(d.token_ids, d.logprobs, top) if d.logprobs is not None else None
                    if _has_content(delta) or lp or d.finish_reason is not None:
                        choices.append(
                            ChatChunkChoice(
                                index=d.index,
                                delta=delta,
                                logprobs=ChatLogprobs(content=lp) if lp else None,
                                finish_reason=finish_reason(d.finish_reason, a),
                            )
                        )
                if choices:
                    yield chunk(choices)
            usage = self._usage(last, completion_tokens)
            if req.include_usage:
                yield chunk([], usage)
            call.done(reasons, usage)
        except APIError as e:  # after the stream started, an error is an event, then the stream ends as usual
            self.metrics.errored(e.status_code)
            yield sse_event(e.body())
        yield SSE_DONE

    @staticmethod
    def _usage(last: RequestOutput | None, completion_tokens: int) -> Usage:
        if last is None:
            return Usage.from_counts(0, completion_tokens)
        return Usage.from_counts(last.num_prompt_tokens, completion_tokens, cached_tokens=last.num_cached_tokens)

    # ---- /v1/completions ----
    async def completions(self, raw: bytes, key: str | None = None) -> Completion | AsyncIterator[str]:
        """`key`: the name of the API key the request came with (its quota applies)."""
        call = _Call(self, key)
        req = await self._parse(CompletionRequest, raw)
        ticket = self._reserve(call, req.n)
        try:
            return await self._completion(call, req)
        except BaseException:
            ticket.release()
            raise

    async def _completion(self, call: _Call, req: CompletionRequest) -> Completion | AsyncIterator[str]:
        prompts = req.prompts()
        if len(prompts) != 1:
            raise InvalidRequestError(
                "one prompt per request is supported; send a list as separate requests", param="prompt"
            )
        prompt = prompts[0]
        if isinstance(prompt, str):
            self._check_prompt_chars(len(prompt), "prompt")
            ids = await self._off_loop(len(prompt) > INLINE_CHARS, lambda: self.tokenizer.encode(prompt))
        else:
            ids = list(prompt)
            self._check_prompt_ids(ids)
        params = self._params(req, COMPLETIONS_DEFAULT_MAX_TOKENS)
        self._admit(call, len(ids))
        request = EngineRequest(request_id=random_id("cmpl"), prompt_token_ids=ids, params=params)
        response_id = req.request_id or request.request_id
        log.debug("completion %s (client id %r): %d prompt tokens", request.request_id, req.request_id, len(ids))
        echo = ""
        if req.echo:  # a token prompt is detokenized only when it is echoed
            if isinstance(prompt, str):
                echo = prompt
            else:
                echo = await self._off_loop(len(ids) > INLINE_CHARS, lambda: self.tokenizer.decode(ids))
        stream = await self._stream(request, call.ticket)
        if req.stream:
            return self._completion_stream(call, req, request, response_id, stream, echo)
        return await self._completion_full(call, request, response_id, stream, echo)

    def _completion_logprobs(self, d: CompletionDelta, offset: int) -> CompletionLogprobs | None:
        if d.logprobs is None:
            return None
        lp = CompletionLogprobs()
        for token, entry in zip(d.token_ids, d.logprobs, strict=True):
            text = entry[token].decoded_token or ""
            lp.tokens.append(text)
            lp.token_logprobs.append(entry[token].logprob)
            lp.top_logprobs.append({(e.decoded_token or ""): e.logprob for e in entry.values()})
            lp.text_offset.append(offset)
            offset += len(text)
        return lp

    async def _completion_full(
        self, call: _Call, request: EngineRequest, response_id: str, stream: AsyncIterator[RequestOutput], echo: str
    ) -> Completion:
        n = request.params.n
        texts, reasons, logprobs = [echo] * n, [None] * n, [None] * n
        completion_tokens, last = 0, None
        async for out in stream:
            last = out
            call.timer.output(out)
            for d in out.deltas:
                completion_tokens += len(d.token_ids)
                lp = self._completion_logprobs(d, len(texts[d.index]))
                if lp is not None:
                    logprobs[d.index] = _extend(logprobs[d.index], lp)
                texts[d.index] += d.text
                reasons[d.index] = d.finish_reason or reasons[d.index]
        usage = self._usage(last, completion_tokens)
        call.done(reasons, usage)
        choices = [
            CompletionChoice(index=i, text=texts[i], logprobs=logprobs[i], finish_reason=_plain_reason(reasons[i]))
            for i in range(n)
        ]
        return Completion(id=response_id, model=self.model_name, choices=choices, usage=usage)

    async def _completion_stream(
        self,
        call: _Call,
        req: CompletionRequest,
        request: EngineRequest,
        response_id: str,
        stream: AsyncIterator[RequestOutput],
        echo: str,
    ) -> AsyncIterator[str]:
        n = request.params.n
        offsets = [len(echo)] * n
        reasons: list[str | None] = [None] * n
        completion_tokens, last = 0, None

        def chunk(choices: list[CompletionChunkChoice], usage: Usage | None = None) -> str:
            return sse_event(CompletionChunk(id=response_id, model=self.model_name, choices=choices, usage=usage))

        try:
            if echo:
                yield chunk([CompletionChunkChoice(index=i, text=echo) for i in range(n)])
            async for out in stream:
                last = out
                call.timer.output(out)
                choices = []
                for d in out.deltas:
                    completion_tokens += len(d.token_ids)
                    lp = self._completion_logprobs(d, offsets[d.index])
                    offsets[d.index] += len(d.text)
                    reasons[d.index] = d.finish_reason or reasons[d.index]
                    if d.text or lp or d.finish_reason is not None:
                        choices.append(
                            CompletionChunkChoice(
                                index=d.index, text=d.text, logprobs=lp, finish_reason=_plain_reason(d.finish_reason)
                            )
                        )
                if choices:
                    yield chunk(choices)
            usage = self._usage(last, completion_tokens)
            if req.include_usage:
                yield chunk([], usage)
            call.done(reasons, usage)
        except APIError as e:
            self.metrics.errored(e.status_code)
            yield sse_event(e.body())
        yield SSE_DONE


def _plain_reason(reason: str | None) -> str | None:
    return "stop" if reason == "abort" else reason


def _has_content(delta: ChatDelta) -> bool:
    return bool(delta.content or delta.reasoning_content or delta.tool_calls)


def _merge(a: ChatDelta, b: ChatDelta) -> ChatDelta:
    return ChatDelta(
        content=((a.content or "") + (b.content or "")) or None,
        reasoning_content=((a.reasoning_content or "") + (b.reasoning_content or "")) or None,
        tool_calls=((a.tool_calls or []) + (b.tool_calls or [])) or None,
    )


def _extend(acc: CompletionLogprobs | None, more: CompletionLogprobs) -> CompletionLogprobs:
    if acc is None:
        return more
    acc.tokens += more.tokens
    acc.token_logprobs += more.token_logprobs
    acc.top_logprobs += more.top_logprobs
    acc.text_offset += more.text_offset
    return acc
