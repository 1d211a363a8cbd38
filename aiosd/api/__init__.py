"""Front-ends: thin transports from the outside world to ``Kernel.dispatch``."""
