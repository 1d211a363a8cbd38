"""Kernel managers: access (and, later, context, memory, storage, tools)."""
