"""The D-Bus front-end: a second thin transport over the syscall table (pydbus over GDBus)."""
