"""System facts as a tool: CPUs, load, memory, disks, uptime (what any user may read)."""

from __future__ import annotations

import os
import platform
import time
from typing import Any

import psutil

#: File systems that hold no files of anyone's (pseudo and container layers).
_PSEUDO_FS = frozenset({"squashfs", "overlay", "tmpfs", "devtmpfs", "proc", "sysfs", "tracefs"})


def system_info() -> dict[str, Any]:
    """A snapshot of the machine, as ``uptime``, ``free`` and ``df`` would show it."""
    vm = psutil.virtual_memory()
    sw = psutil.swap_memory()
    load = os.getloadavg()
    disks = []
    seen: set[str] = set()
    for part in psutil.disk_partitions(all=False):
        if part.fstype in _PSEUDO_FS or part.device in seen:
            continue
        seen.add(part.device)
        try:
            du = psutil.disk_usage(part.mountpoint)
        except OSError:
            continue
        disks.append(
            {
                "mount": part.mountpoint,
                "device": part.device,
                "fstype": part.fstype,
                "total": du.total,
                "used": du.used,
                "free": du.free,
                "percent": du.percent,
            }
        )
    boot = psutil.boot_time()
    return {
        "hostname": platform.node(),
        "kernel": platform.release(),
        "cpus": psutil.cpu_count(logical=True),
        "physical_cores": psutil.cpu_count(logical=False),
        "load": {"1m": round(load[0], 2), "5m": round(load[1], 2), "15m": round(load[2], 2)},
        "memory": {
            "total": vm.total,
            "available": vm.available,
            "used": vm.used,
            "percent": vm.percent,
        },
        "swap": {"total": sw.total, "used": sw.used, "percent": sw.percent},
        "disks": disks,
        "boot_time": boot,
        "uptime_s": round(time.time() - boot, 1),
    }
