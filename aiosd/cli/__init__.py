"""aiosctl, the command line of aiosd."""
