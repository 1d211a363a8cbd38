"""The baseline: the same GGUF driven directly through llama-cpp-python, in this process.

Loads the model exactly as the daemon's embedded backend does (same file, n_ctx, threads,
chat template, sampling parameters) and generates with ``Llama.generate`` on the
chat-formatted tokens, detokenizing each token as a streaming caller would.
"""

from __future__ import annotations

import codecs
import time
from dataclasses import dataclass
from typing import Any

from bench.common import N_CTX


@dataclass(frozen=True)
class Generation:
    """One timed generation."""

    tokens: int
    ttft: float  # seconds from the start (before chat formatting) to the first token
    total: float  # seconds from the start to the last token
    prep: float  # seconds spent formatting and tokenizing the prompt
    text: str

    @property
    def tokens_per_s(self) -> float:
        """Completion tokens over the whole request time (time to first token included)."""
        return self.tokens / self.total


class DirectModel:
    """One llama.cpp context, also used for tokenizing, as in the daemon."""

    def __init__(self, threads: int, n_ctx: int = N_CTX) -> None:
        from llama_cpp import Llama
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        from aiosd.kernel.llm.llamacpp import default_model_path

        path = str(default_model_path())
        self.llama = Llama(
            model_path=path,
            n_ctx=n_ctx,
            n_threads=threads,
            n_threads_batch=threads,
            verbose=False,
        )
        eos, bos = self.llama.token_eos(), self.llama.token_bos()
        self.formatter = Jinja2ChatFormatter(
            template=self.llama.metadata["tokenizer.chat_template"],
            eos_token=self.llama._model.token_get_text(eos),
            bos_token=self.llama._model.token_get_text(bos) if bos >= 0 else "",
            stop_token_ids=[eos],
        )

    def prompt_tokens(self, prompt: str) -> list[int]:
        """The chat-formatted prompt as tokens, as the daemon builds it."""
        formatted = self.formatter(messages=[{"role": "user", "content": prompt}])
        tokens: list[int] = self.llama.tokenize(
            formatted.prompt.encode("utf-8"), add_bos=not formatted.added_special, special=True
        )
        return tokens

    def generate(self, prompt: str, max_tokens: int) -> Generation:
        """Greedy generation of up to ``max_tokens`` tokens, timed."""
        import llama_cpp

        llama: Any = self.llama
        t0 = time.perf_counter()
        tokens = self.prompt_tokens(prompt)
        prep = time.perf_counter() - t0
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        parts: list[str] = []
        first: float | None = None
        produced = 0
        for token in llama.generate(
            tokens, temp=0.0, top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=1.0, reset=True
        ):
            if llama_cpp.llama_vocab_is_eog(llama._model.vocab, token):
                break
            if first is None:
                first = time.perf_counter()
            produced += 1
            parts.append(decoder.decode(llama.detokenize([token])))
            if produced >= max_tokens:
                break
        end = time.perf_counter()
        parts.append(decoder.decode(b"", final=True))
        return Generation(
            tokens=produced,
            ttft=(first or end) - t0,
            total=end - t0,
            prep=prep,
            text="".join(parts),
        )

    def close(self) -> None:
        """Free the context."""
        self.llama.close()
