"""Bridges from the kernel to the host OS (processes, files, notifications, executor)."""
