"""Device memory readings of a replica: CUDA allocator and driver, or process and host RAM.

Read by `GroupServer` for its status and the `lens_device_memory_bytes` gauge.
"""

from __future__ import annotations

import os

import torch


def read_memory(device: torch.device) -> dict[str, int]:
    """Read allocated, free and total bytes of the replica's device.

    On CUDA: the caching allocator's allocated bytes and the driver's free/total. On CPU:
    this process's resident set size and the host's available/total memory (from /proc).
    """
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        allocated = torch.cuda.memory_allocated(device)
        return {"allocated_bytes": allocated, "free_bytes": free, "total_bytes": total}
    return {
        "allocated_bytes": _process_rss_bytes(),
        "free_bytes": _meminfo_bytes("MemAvailable"),
        "total_bytes": _meminfo_bytes("MemTotal"),
    }


def _process_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as statm:
            resident_pages = int(statm.read().split()[1])
    except (OSError, IndexError, ValueError):
        return 0
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def _meminfo_bytes(field: str) -> int:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) * 1024  # the file says kB; it means KiB
    except (OSError, ValueError):
        return 0
    return 0
