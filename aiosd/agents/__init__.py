"""The agents that come with aiosd: one directory each, with an ``agent.toml``.

The daemon finds them here (see :mod:`aiosd.kernel.manifests`) and starts them by name with
``agent.spawn``; each runs as ``{python} -m aiosd.agents.NAME``, as its owner's process.
"""
