"""The configured models: each name's backend, and which one is the default."""

from __future__ import annotations

from collections.abc import Mapping

from aiosd.config import LlamaCppModelConfig, OllamaModelConfig
from aiosd.errors import ModelNotFound
from aiosd.kernel.llm.base import Backend


def build_backend(name: str, cfg: LlamaCppModelConfig | OllamaModelConfig) -> Backend:
    """Create the backend a model's config asks for (imported lazily: each pulls a library)."""
    if isinstance(cfg, LlamaCppModelConfig):
        from aiosd.kernel.llm.llamacpp import LlamaCppBackend

        return LlamaCppBackend(name, cfg)
    from aiosd.kernel.llm.ollama import OllamaBackend

    return OllamaBackend(name, cfg)


class Models:
    """The backends by model name; fixed for the daemon's life (a change needs a restart)."""

    def __init__(self, backends: Mapping[str, Backend], default: str) -> None:
        self.backends = dict(backends)
        self.default = default

    def names(self) -> list[str]:
        """Every configured model's name, in configuration order."""
        return list(self.backends)

    def get(self, model: str | None) -> Backend:
        """The backend of a configured model (None: the default model)."""
        name = model or self.default
        backend = self.backends.get(name)
        if backend is None:
            raise ModelNotFound(
                f"no model named {name!r} is configured (configured: "
                f"{', '.join(sorted(self.backends))})",
                data={"model": name, "models": sorted(self.backends)},
            )
        return backend
