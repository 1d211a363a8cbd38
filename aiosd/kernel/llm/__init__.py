"""LLM backends: one class per kind of model server, all behind :class:`Backend`."""
