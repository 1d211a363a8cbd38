"""THE syscall table: every family's syscalls, collected in one place.

Each syscall is declared beside its handler in its family module (``kernel/families/``);
this table only lists the families.  Both transports and ``aiosctl``'s help are generated
from :data:`SYSCALLS`; nothing else declares a syscall.
"""

from __future__ import annotations

from types import MappingProxyType

from aiosd.kernel.families.agent import AgentSyscalls
from aiosd.kernel.families.llm import LlmSyscalls
from aiosd.kernel.families.memory import MemorySyscalls
from aiosd.kernel.families.storage import StorageSyscalls
from aiosd.kernel.families.system import SystemSyscalls
from aiosd.kernel.families.tool import ToolSyscalls
from aiosd.kernel.syscall_base import Syscall, declared

#: Every family, in the order the table (and so the docs and the bus) lists them.
FAMILIES = (
    LlmSyscalls,
    SystemSyscalls,
    StorageSyscalls,
    MemorySyscalls,
    AgentSyscalls,
    ToolSyscalls,
)

SYSCALLS: MappingProxyType[str, Syscall] = MappingProxyType(declared(*FAMILIES))
