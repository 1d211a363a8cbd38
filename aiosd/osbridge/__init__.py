"""Bridges from the kernel to the host OS; nothing lives here yet.

What will: ``processes.py`` (psutil views and owner-checked signals), ``files.py`` (inotify
watches through pyinotify, turned into kernel events), ``notifications.py`` (desktop
notifications on a user's session bus) and ``executor.py`` (a worker per user that runs with
that user's uid, gid and groups, so that the kernel, not the daemon, enforces permissions).
"""
