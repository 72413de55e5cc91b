"""An OpenAI-compatible HTTP server for LayerSkip models, with self-speculative decoding per row.

    python serve.py --checkpoint_path DIR/model.pth --draft_layers 4 --speculate_k auto --batch_size 8 --compile
    curl 127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
        -d '{"model": "layerskip", "prompt": "def fib(n):", "max_tokens": 64, "temperature": 0}'

Endpoints: POST /v1/completions and /v1/chat/completions (OpenAI's formats, streaming as
server-sent events), GET /v1/models, /health and /metrics (Prometheus' text format).

The model runs on a thread of its own, in common.generate_batch's loop over --batch_size cache
rows: a request takes a free row as soon as one is free (its prompt prefilled into that row while
the others keep their place) and leaves it when it ends, is cancelled or its client goes away.
Every row has its own sampling settings - temperature, top-k, top-p and seed are tensors of the
compiled step, written into a row as a request takes it - so requests that sample differently
share one graph, greedy rows stay exact, and a seeded request's draws come from its own stream
(common.row_uniform). With --speculate_k auto a seeded sampled request chooses its own k
(self_spec.PerRowK), so its text does not depend on what else shares the batch; the other rows
share one choice, priced at what a step on that many rows costs.
"""
import argparse
import asyncio
import collections
import json
import logging
import os
import random
import signal
import sys
import threading
import time
import uuid
from functools import partial
from pathlib import Path
from typing import Callable, Literal, Optional, Union

import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field

import tp
from common import DTYPES, check_device, check_exit_layer, fail, generate_batch
from generate import fastest_threads
from model import Transformer, load_model
from self_spec import (AUTO_K, PerRowK, add_draft_vocab_flags, decoding_functions, draft_vocab_checks,
                       draft_vocab_for, measure_step_seconds, parse_speculate_k, warm_up)
from tokenizer import load_tokenizer, render_chat

log = logging.getLogger("serve")
ROW_SIZES = (1, 4, 16, 64)  # the leading rows a step may run on (and the batch size): one graph per step for each
DEFAULT_CHECKPOINT = Path(__file__).parent / "checkpoints" / "demo" / "model.pth"


# --- requests (OpenAI's fields; any other field is an error that names it) ------------------------

class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class Sampling(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False)
    model: str
    max_tokens: Optional[int] = Field(None, ge=1)  # None: up to the context
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: Optional[int] = Field(None, ge=1)  # not OpenAI's, as vLLM and llama.cpp's server take it
    seed: Optional[int] = Field(None, ge=-2 ** 63, lt=2 ** 63)
    stop: Union[str, list[str], None] = None
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None  # an end user's id, as OpenAI takes it: logged nowhere, used for nothing


class CompletionRequest(Sampling):
    prompt: Union[str, list[str]]
    max_tokens: Optional[int] = Field(16, ge=1)  # OpenAI's default for completions


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)


class BadRequest(Exception):
    """An error a client caused: its status and OpenAI's error body."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


def error_body(message: str, kind: str, param: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


# --- metrics ---------------------------------------------------------------------------------------

class Metrics:
    """The server's Prometheus metrics, in a registry of its own."""

    def __init__(self):
        import prometheus_client as prom
        self.registry = r = prom.CollectorRegistry()
        self.requests = prom.Counter("layerskip_requests", "Requests by outcome", ["outcome"], registry=r)
        self.prompt_tokens = prom.Counter("layerskip_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.generated_tokens = prom.Counter("layerskip_generated_tokens", "Tokens generated", registry=r)
        self.drafted = prom.Counter("layerskip_draft_tokens", "Tokens drafted by the early layers", registry=r)
        self.accepted = prom.Counter("layerskip_accepted_tokens", "Drafted tokens the full model accepted", registry=r)
        self.steps = prom.Counter("layerskip_steps", "Steps by drafts per step (0: autoregressive)", ["k"], registry=r)
        self.rows_busy = prom.Gauge("layerskip_rows_busy", "Cache rows generating", registry=r)
        self.queue = prom.Gauge("layerskip_queue_length", "Texts waiting for a free row", registry=r)
        self.first_token = prom.Histogram("layerskip_time_to_first_token_seconds", "From arrival to the first token",
                                          registry=r, buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60))
        self.per_token = prom.Histogram("layerskip_inter_token_latency_seconds", "Between tokens of one text",
                                        registry=r, buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1))

    def text(self) -> bytes:
        import prometheus_client as prom
        return prom.generate_latest(self.registry)


# --- one text the model generates ------------------------------------------------------------------

class Choice:
    """One text of a request (n > 1 asks for n): its prompt, settings and progress. The model's
    thread feeds it tokens; it turns them into text - held back while it might still become a stop
    string or a split character - and sends ("text", piece), ("finish", reason) or ("error", ...)
    to the request's handler on the server's event loop."""

    def __init__(self, job: "Job", index: int, prompt_tokens: list[int], seed: int):
        self.job, self.index, self.prompt = job, index, prompt_tokens
        self.seed = seed % 2 ** 63  # a row's stream is keyed by a non-negative int64
        self.tokens: list[int] = []
        self.text, self.sent = "", 0
        self.finish_reason: Optional[str] = None
        self.cancelled = False
        self.row: Optional[int] = None  # the cache row it generates in
        self.last_time: Optional[float] = None

    def settings(self) -> tuple:
        job = self.job
        return job.temperature, job.top_k or 0, job.top_p, self.seed

    def add(self, new_tokens: list[int], tokenizer, metrics: Metrics) -> None:
        """The row's new tokens (up to EOS): text, stop strings, max_tokens."""
        if self.finish_reason is not None:  # tokens accepted in the step that ended it
            return
        before = len(self.tokens)
        for token in new_tokens:
            if token in tokenizer.stop_ids:
                self.tokens.append(token)
                self.finish_reason = "stop"
                break
            self.tokens.append(token)
            if len(self.tokens) == self.job.max_tokens:
                self.finish_reason = "length"
                break
        now, added = time.perf_counter(), len(self.tokens) - before
        if self.last_time is None:
            metrics.first_token.observe(now - self.job.arrival)
        else:
            for _ in range(added):  # a step's tokens arrive together: each is charged its share
                metrics.per_token.observe((now - self.last_time) / added)
        self.last_time = now
        generated = [t for t in self.tokens if t not in tokenizer.stop_ids]
        text = tokenizer.decode(self.prompt + generated)[len(self.job.prompt_texts[self.index // self.job.n]):]
        hits = [i for i in (text.find(s, max(0, self.sent - len(s))) for s in self.job.stop) if i >= 0]
        if hits:
            text, self.finish_reason = text[: min(hits)], "stop"
        self.text = text
        ready = len(text)
        if self.finish_reason is None:  # hold back what may yet be a stop string's start, or half a character
            ready -= max([n for s in self.job.stop for n in range(len(s), 0, -1) if text.endswith(s[:n])] + [0])
            if text[:ready].endswith("\ufffd"):
                ready = len(text[:ready].rstrip("\ufffd"))
        if ready > self.sent:
            self.job.send(("text", self.index, text[self.sent: ready]))
            self.sent = ready

    def done(self, reason: Optional[str]) -> None:
        """The row is free: the text ends (reason: where it did not end itself)."""
        if self.finish_reason is None:
            self.finish_reason = reason
        if self.sent < len(self.text):
            self.job.send(("text", self.index, self.text[self.sent:]))
            self.sent = len(self.text)
        self.job.send(("finish", self.index, self.finish_reason))


class Job:
    """A request: its choices, its settings and the queue its handler reads events from."""

    def __init__(self, body: Sampling, prompts: list[list[int]], prompt_texts: list[str], loop, seed: int):
        self.n, self.max_tokens = body.n, body.max_tokens  # None: until the context ends
        self.seeded = body.seed is not None
        self.temperature, self.top_k, self.top_p = body.temperature, body.top_k, body.top_p
        self.stop = [body.stop] if isinstance(body.stop, str) else [s for s in body.stop or [] if s]
        self.prompt_texts = prompt_texts
        self.prompt_tokens = sum(len(p) for p in prompts)
        self.arrival = time.perf_counter()
        self.loop, self.events = loop, asyncio.Queue()
        self.choices = [Choice(self, i * body.n + j, prompt, seed + j) for i, prompt in enumerate(prompts)
                        for j in range(body.n)]

    def send(self, event: tuple) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def cancel(self) -> None:
        for choice in self.choices:
            choice.cancelled = True


# --- the model's thread ----------------------------------------------------------------------------

class Engine:
    """The model loop on its own thread. generate_batch runs while any text is waiting or
    generating; its prompts are the waiting texts, taken as rows free up."""

    def __init__(self, model: Transformer, tokenizer, batch_size: int, exit_layer: Optional[int],
                 speculate_k: Union[int, str, None], device: str, compile: bool = False, threads: Optional[int] = None, max_queue: int = 256,
                 make_steps: Callable = decoding_functions):
        self.model, self.tokenizer, self.batch_size, self.exit_layer = model, tokenizer, batch_size, exit_layer
        self.speculate_k, self.device, self.compile, self.threads = speculate_k, device, compile, threads
        self.max_queue, self.make_steps = max_queue, make_steps
        self.metrics = Metrics()
        self.waiting: collections.deque[Choice] = collections.deque()
        self.lock = threading.Condition()
        self.draining = False
        self.busy: set[int] = set()  # cache rows generating
        self.ready, self.failed = threading.Event(), None
        self.thread = threading.Thread(target=self.run, name="model", daemon=True)

    def submit(self, job: Job) -> None:
        with self.lock:
            if self.draining:
                raise BadRequest(503, "the server is shutting down", "server_error")
            if len(self.waiting) + len(job.choices) > self.max_queue:
                raise BadRequest(429, f"the queue is full ({self.max_queue} texts waiting): retry later", "rate_limit_error")
            self.waiting.extend(job.choices)
            self.metrics.queue.set(len(self.waiting))
            self.lock.notify()

    def drain(self) -> None:
        """Admits nothing more; the texts generating end at their next step, the waiting ones now."""
        with self.lock:
            self.draining = True
            waiting, self.waiting = list(self.waiting), collections.deque()
            self.metrics.queue.set(0)
            self.lock.notify()
        for choice in waiting:
            choice.job.send(("error", 503, "the server is shutting down"))

    def setup(self) -> None:
        """Caches for every row at the full context; the steps for each number of leading rows a
        step may run on (ROW_SIZES up to the batch: a step costs the rows it runs, and with one
        request in flight that is one), compiled; the thread count; k's costs."""
        model, rows = self.model, self.batch_size
        with torch.device(self.device):  # each row's sampling settings, written as a text takes the row
            self.settings = dict(temperature=torch.zeros(rows), top_k=torch.zeros(rows, dtype=torch.long),
                                 top_p=torch.ones(rows), seed=torch.zeros(rows, dtype=torch.long))
            limit = torch.zeros(rows, dtype=torch.long)  # auto: the drafts each row takes (PerRowK)
        self.prefill, steps = self.make_steps(speculate_k=self.speculate_k, compile=self.compile, device=self.device,
                                              **self.settings)
        auto = len(steps) > 1
        self.row_tensors = {**self.settings, **({"limit": limit} if auto else {})}  # sent to the other ranks
        self.context = model.args.max_seq_length
        with torch.device(self.device):
            model.setup_caches(rows, self.context + max(steps) + 1, self.exit_layer)
        self.sizes = sorted({n for n in ROW_SIZES if n < rows} | {rows})
        self.sized_steps = {n: {k: partial(step, **{name: t[:n] for name, t in self.row_tensors.items() if k or name != "limit"})
                                for k, step in steps.items()} for n in self.sizes}
        if self.threads is None and self.device == "cpu" and torch.get_num_threads() > 1:
            uncompiled = self.make_steps(speculate_k=self.speculate_k, **self.settings)[1]
            self.threads = fastest_threads(model, uncompiled[min(uncompiled)], rows)
        elif self.threads:
            torch.set_num_threads(self.threads)
        compiling, costs = 0.0, {}  # auto: what a step at each k costs on each number of rows
        for n in self.sizes:
            model.use_rows(n)
            if self.compile:
                compiling += warm_up(model, self.prefill, self.sized_steps[n], n)
            if auto:
                costs[n] = measure_step_seconds(model, self.sized_steps[n], n)
        if self.compile:
            log.info("compiled %d steps for %s rows in %.1f s", len(steps), "/".join(map(str, self.sizes)), compiling)
        self.policy = PerRowK(costs, limit, self.step_rows) if auto else None
        self.steps = {k: self.counted(k, self.sized(k)) for k in steps}

    def counted(self, k: int, step: Callable) -> Callable:
        counter = self.metrics.steps.labels(k=str(k))

        def step_and_count(*args):
            counter.inc()
            return step(*args)
        return step_and_count

    def step_rows(self) -> int:
        """The fewest leading rows a step may run on that hold every busy row."""
        return next(size for size in self.sizes if size > max(self.busy, default=0))

    def sized(self, k: int) -> Callable:
        """Step k on the fewest leading rows that hold every busy row; the idle rows past them keep
        their token and position, and their output (ignored) is zeros."""
        def step(model, token, pos):
            n = self.step_rows()
            out, accepted, next_token, next_pos = self.call((n, k), token[:n], pos[:n])
            if n == len(pos):
                return out, accepted, next_token, next_pos
            idle = len(pos) - n
            return (torch.cat([out, out.new_zeros(idle, out.shape[1])]), torch.cat([accepted, accepted.new_zeros(idle)]),
                    torch.cat([next_token, token[n:]]), torch.cat([next_pos, pos[n:]]))
        return step

    def prefill_rows(self, model, *tensors):
        return self.call("prefill", *tensors)

    # Tensor parallelism: rank 0 runs the loop and, before each prefill or step, tells the other
    # ranks what it calls with what - the admissions are prefills into rows, with the rows' settings -
    # so that every rank runs the same sharded passes (and collectives) in the same order.

    def call(self, what, *tensors):
        """A prefill ("prefill": it names its cache rows, so every row's caches) or step k on the
        first n rows ((n, k)), announced to the other ranks first when this is rank 0."""
        if dist.is_initialized() and dist.get_rank() == 0:
            tp.broadcast((what, [(t.tolist(), t.dtype) for t in tensors],
                          {name: s.tolist() for name, s in self.row_tensors.items()}))
        if what == "prefill":
            self.model.use_rows(self.batch_size)
            return self.prefill(self.model, *tensors)
        n, k = what
        self.model.use_rows(n)
        return self.sized_steps[n][k](self.model, *tensors)

    def follow(self) -> None:
        """A rank other than 0: the calls rank 0 announces, until it says it has stopped."""
        while True:
            what, tensors, values = tp.broadcast(None)
            if what is None:
                return
            if what == "idle":
                continue
            for name, value in values.items():
                self.row_tensors[name].copy_(torch.tensor(value))
            self.call(what, *[torch.tensor(value, dtype=dtype, device=self.device) for value, dtype in tensors])

    def run(self) -> None:
        with torch.inference_mode():  # thread-local: the settings and caches are made here, on this thread
            try:
                self.setup()
            except Exception as e:  # reported by main(), which waits for ready
                self.failed = e
                self.ready.set()
                return
            self.ready.set()
            while True:
                with self.lock:
                    while not self.waiting and not self.draining:
                        if not self.lock.wait(timeout=60) and dist.is_initialized():
                            tp.broadcast(("idle", [], {}))  # the other ranks' wait must not time out
                    if self.draining and not self.waiting:
                        break
                self.serve_waiting()
        if dist.is_initialized():
            tp.broadcast((None, [], {}))

    def serve_waiting(self) -> None:
        taken: list[Choice] = []  # generate_batch's prompt index -> choice
        engine = self

        class Waiting:  # the waiting texts as generate_batch's prompts: none for now is not the end
            def __iter__(self):
                return self

            def __next__(self):
                with engine.lock:
                    while engine.waiting:
                        choice = engine.waiting.popleft()
                        engine.metrics.queue.set(len(engine.waiting))
                        if not choice.cancelled:
                            taken.append(choice)
                            return choice.prompt
                raise StopIteration

        def admit(index: int, row: int) -> None:
            taken[index].row = row
            self.busy.add(row)
            self.metrics.rows_busy.set(len(self.busy))
            for name, value in zip(self.settings, taken[index].settings()):
                self.settings[name][row] = value
            if self.policy:  # a seeded sampled text chooses its k alone: then its company cannot change it
                self.policy.start(row, own=taken[index].job.temperature > 0 and taken[index].job.seeded)
            self.metrics.prompt_tokens.inc(len(taken[index].prompt))

        def on_done(result: dict) -> None:
            choice = taken[result["index"]]
            self.busy.discard(choice.row)
            self.metrics.rows_busy.set(len(self.busy))
            if self.policy:
                self.policy.end(choice.row)
            drafted = sum(k * n for k, n in result["k_steps"].items())
            self.metrics.drafted.inc(drafted)
            self.metrics.accepted.inc(round((result["acceptance_rate"] or 0) * drafted))
            self.metrics.generated_tokens.inc(len(choice.tokens))
            if not choice.cancelled:
                choice.done("length")  # where the text did not end itself: its context ran out, or draining

        try:
            generate_batch(self.model, Waiting(), self.context, prefill_fn=self.prefill_rows, steps=self.steps,
                           stop_ids=self.tokenizer.stop_ids, batch_size=self.batch_size, policy=self.policy,
                           on_tokens=lambda i, new, _: taken[i].add(new, self.tokenizer, self.metrics),
                           on_done=on_done, admit=admit,
                           stop=lambda i, _: taken[i].finish_reason is not None or taken[i].cancelled or self.draining)
        except Exception:
            log.exception("the model loop failed; its requests are answered with an error, the server goes on")
            self.busy.clear()
            self.metrics.rows_busy.set(0)
            for choice in taken:
                if choice.finish_reason is None and not choice.cancelled:
                    choice.finish_reason = "error"
                    choice.job.send(("error", 500, "the model loop failed on this request's batch (see the server's log)"))


# --- the HTTP side ---------------------------------------------------------------------------------

def make_app(engine: Engine, model_name: str, api_key: Optional[str]):
    """The FastAPI application over an engine."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException

    app = FastAPI(title="layerskip-fast", docs_url=None, redoc_url=None, openapi_url=None)
    tokenizer, context = engine.tokenizer, engine.model.args.max_seq_length
    seeds = random.Random()

    def refuse(request: Request, status: int, message: str, kind: str, param: Optional[str] = None):
        log.info("%s %s %d: %s", request.method, request.url.path, status, message)
        headers = {"Retry-After": "1"} if status == 429 else None
        return JSONResponse(error_body(message, kind, param), status_code=status, headers=headers)

    @app.exception_handler(BadRequest)
    async def bad_request(request: Request, e: BadRequest):
        return refuse(request, e.status, e.message, e.kind, e.param)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        error = e.errors()[0]
        where = [str(part) for part in error["loc"] if part != "body"]
        field = ".".join(where) or None
        if error["type"] == "json_invalid":
            message, field = "the request body is not valid JSON", None
        elif error["type"] == "extra_forbidden":
            message = f"unsupported field: {field}"
        elif error["type"] == "missing":
            message = f"missing field: {field}"
        else:
            message = f"{field}: {error['msg']}" if field else error["msg"]
        return refuse(request, 400, message, "invalid_request_error", field)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        return refuse(request, e.status_code, str(e.detail), "invalid_request_error")

    @app.middleware("http")
    async def authorize(request: Request, call_next):
        if api_key is not None and request.url.path.startswith("/v1/"):
            if request.headers.get("authorization") != f"Bearer {api_key}":
                return refuse(request, 401, "a valid API key is needed: Authorization: Bearer KEY", "authentication_error")
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "draining" if engine.draining else "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(engine.metrics.text(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "layerskip"}]}

    def check(body: Sampling, prompts: list[list[int]]) -> None:
        if body.model != model_name:
            raise BadRequest(404, f"model {body.model!r} not found: this server has {model_name!r}",
                             "invalid_request_error", "model")
        for tokens in prompts:
            if len(tokens) >= context:
                raise BadRequest(400, f"the prompt is {len(tokens)} tokens; the model's context of {context} leaves no room",
                                 "invalid_request_error", "prompt")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not texts:
            raise BadRequest(400, "prompt: at least one prompt is needed", param="prompt")
        prompts = [tokenizer.encode(text, bos=True) for text in texts]
        check(body, prompts)
        return await answer(body, prompts, [tokenizer.decode(p) for p in prompts], request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        if tokenizer.chat_template is None:
            raise BadRequest(400, "this model has no chat template: use /v1/completions", param="messages")
        try:
            text = render_chat(tokenizer, [m.model_dump() for m in body.messages])
        except ValueError as e:
            raise BadRequest(400, str(e), param="messages") from None
        prompts = [tokenizer.encode(text, bos=False, special=True)]
        check(body, prompts)
        return await answer(body, prompts, [tokenizer.decode(prompts[0])], request, chat=True)

    async def answer(body: Sampling, prompts: list[list[int]], prompt_texts: list[str], request: Request, chat: bool):
        seed = body.seed if body.seed is not None else seeds.getrandbits(63)
        job = Job(body, prompts, prompt_texts, asyncio.get_running_loop(), seed)
        engine.submit(job)
        kind = "chat.completion" if chat else "text_completion"
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name}

        def usage() -> dict:
            generated = sum(len(c.tokens) for c in job.choices)
            return {"prompt_tokens": job.prompt_tokens, "completion_tokens": generated,
                    "total_tokens": job.prompt_tokens + generated}

        def outcome(kind_: str) -> None:
            engine.metrics.requests.labels(outcome=kind_).inc()
            log.info("%s %s %s: %d texts, %s", request.method, request.url.path, kind_, len(job.choices), usage())

        if not body.stream:
            texts, reasons = [""] * len(job.choices), [None] * len(job.choices)
            try:
                while None in reasons:
                    event = await job.events.get()
                    if event[0] == "error":
                        job.cancel()
                        outcome("error")
                        return JSONResponse(error_body(event[2], "server_error"), status_code=event[1])
                    if event[0] == "text":
                        texts[event[1]] += event[2]
                    else:
                        reasons[event[1]] = event[2]
            except asyncio.CancelledError:
                job.cancel()
                raise
            outcome("ok")
            if chat:
                choices = [{"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": r}
                           for i, (t, r) in enumerate(zip(texts, reasons))]
            else:
                choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": r}
                           for i, (t, r) in enumerate(zip(texts, reasons))]
            return {**head, "object": kind, "choices": choices, "usage": usage()}

        include_usage = body.stream_options is not None and body.stream_options.include_usage
        chunk_kind = kind + ".chunk" if chat else kind

        def chunk(index: int, text: Optional[str], reason: Optional[str], first: bool = False) -> str:
            if chat:
                delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text is not None else {})
                choice = {"index": index, "delta": delta, "finish_reason": reason}
            else:
                choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": reason}
            extra = {"usage": None} if include_usage else {}
            return f"data: {json.dumps({**head, 'object': chunk_kind, 'choices': [choice], **extra})}\n\n"

        async def events():
            finished, ok = 0, True
            try:
                if chat:
                    for choice in job.choices:
                        yield chunk(choice.index, None, None, first=True)
                while finished < len(job.choices):
                    event = await job.events.get()
                    if event[0] == "error":
                        ok = False
                        yield f"data: {json.dumps(error_body(event[2], 'server_error'))}\n\n"
                        break
                    if event[0] == "text":
                        yield chunk(event[1], event[2], None)
                    else:
                        finished += 1
                        yield chunk(event[1], None, event[2])
                if ok and include_usage:
                    yield f"data: {json.dumps({**head, 'object': chunk_kind, 'choices': [], 'usage': usage()})}\n\n"
                yield "data: [DONE]\n\n"
                outcome("ok" if ok else "error")
            except (asyncio.CancelledError, GeneratorExit):  # the client went away
                outcome("cancelled")
                raise
            finally:
                job.cancel()  # frees its rows at the next step; a no-op once every text has ended

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


# --- the command line ------------------------------------------------------------------------------

def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.error = fail
    p.add_argument("--checkpoint_path", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--draft_layers", type=int, help="self-speculation: draft with layers [0, E)")
    p.add_argument("--speculate_k", type=parse_speculate_k, default="auto",
                   help=f"tokens drafted per step, or auto: chosen before each step from {', '.join(map(str, AUTO_K[1:]))} "
                        "(or an autoregressive step) by measured cost and acceptance")
    add_draft_vocab_flags(p)
    p.add_argument("--batch_size", type=int, default=8, help="cache rows: texts generated at once")
    p.add_argument("--compile", action="store_true", help="compile the steps before listening")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=list(DTYPES),
                   help="activations: default float32 on CPU (bfloat16 for a quantized file), bfloat16 on CUDA")
    p.add_argument("--threads", type=int, help="CPU threads; default: one or all, whichever runs a step faster")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api_key", default=os.environ.get("LAYERSKIP_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/ (default: $LAYERSKIP_API_KEY)")
    p.add_argument("--max_queue", type=int, default=256, help="texts that may wait for a row; past it: 429")
    p.add_argument("--model_name", help="the model's name in the API (default: the checkpoint's folder name)")
    args = p.parse_args(argv)
    check_device(args.device)
    checks = [
        (args.batch_size < 1, "--batch_size must be at least 1"),
        (args.max_queue < 1, "--max_queue must be at least 1"),
        (args.threads is not None and args.threads < 1, "--threads must be at least 1"),
        (not 0 <= args.port < 65536, f"--port must be between 0 and 65535, got {args.port}"),
        (args.api_key is not None and not args.api_key, "--api_key is empty"),
        *draft_vocab_checks(args),
    ]
    for bad, message in checks:
        if bad:
            fail(message)
    args.dtype = DTYPES[args.dtype] if args.dtype else None
    args.model_name = args.model_name or args.checkpoint_path.resolve().parent.name
    return args


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn
    except ImportError as e:
        fail(f"serve.py needs the server's packages: pip install -r requirements-serve.txt ({e})")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    try:
        rank, world, args.device = tp.setup(args.device)  # under torchrun: this process's share of the model
    except ValueError as e:
        fail(str(e))
    if world > 1 and args.draft_vocab is not None:
        fail("--draft_vocab runs in one process: run it without torchrun (each rank holds a share of the head)")
    if rank:  # rank 0 alone speaks and serves; the others end when it says so, not on a signal of their own
        sys.stdout = sys.stderr = open(os.devnull, "w")
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        draft_ids = draft_vocab_for(args, args.checkpoint_path)
        model = load_model(args.checkpoint_path, args.device, args.dtype, draft_ids=draft_ids,
                           shard=tp.shard(rank, world) if world > 1 else None)
        if world > 1:
            tp.add_collectives(model)
        tokenizer = load_tokenizer(args.checkpoint_path.parent)
    except (ValueError, OSError) as e:
        fail(str(e))
    if args.draft_layers is not None:
        check_exit_layer("--draft_layers", args.draft_layers, model.args.n_layer)
    if model.args.vocab_size < tokenizer.vocab_size:
        fail(f"tokenizer has {tokenizer.vocab_size} tokens but the model only {model.args.vocab_size}")

    engine = Engine(model, tokenizer, args.batch_size, args.draft_layers, args.speculate_k if args.draft_layers else None,
                    args.device,
                    compile=args.compile, threads=args.threads, max_queue=args.max_queue)
    if rank:
        with torch.inference_mode():
            engine.setup()
            engine.follow()
        return
    log.info("preparing %d rows of %d positions%s", args.batch_size, model.args.max_seq_length,
             " and compiling the steps" if args.compile else "")
    engine.thread.start()
    engine.ready.wait()
    if engine.failed is not None:
        raise engine.failed

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # SIGINT / SIGTERM: end the streams with a final chunk, then stop
            engine.drain()
            super().handle_exit(sig, frame)

    app = make_app(engine, args.model_name, args.api_key)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=5)
    server = Server(config)
    log.info("serving %s on http://%s:%d (model name %r)", args.checkpoint_path, args.host, args.port, args.model_name)
    server.run()
    engine.thread.join(timeout=5)
    log.info("stopped")


if __name__ == "__main__":
    main()
