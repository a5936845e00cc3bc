"""Which machine this is: cuda_ipc handles only open on the host that exported them."""

import socket
from functools import cache
from pathlib import Path

_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


@cache
def host_id() -> str:
    """Hostname plus boot id (containers can share a hostname pattern; a boot id is per kernel)."""
    boot = _BOOT_ID.read_text().strip() if _BOOT_ID.exists() else ""
    return f"{socket.gethostname()}/{boot}"
