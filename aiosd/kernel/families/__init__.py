"""Syscall families besides llm and system: each module declares its models and entries."""
