"""What /proc says about a process."""

from __future__ import annotations

from pathlib import Path


def rss_bytes(pid: int | str = "self") -> int:
    """Resident set size (``VmRSS``) of process ``pid`` (default: this one) in bytes; 0
    when the process is gone or /proc cannot be read."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0
