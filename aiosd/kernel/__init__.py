"""The kernel: syscall table, dispatch, scheduler, agents and LLM backends."""
