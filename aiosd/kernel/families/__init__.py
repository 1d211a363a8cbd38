"""Syscall families: each module declares its models and a class whose methods handle them.

Every family has the same shape: parameter and result models, then one class that takes the
narrow services its handlers use and marks each handler with
:func:`aiosd.kernel.syscall_base.syscall`.  The table (``kernel/syscalls.py``) collects them.
"""
