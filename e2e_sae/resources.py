"""What a job needs against what the machine has: the device it names (`check_device`), memory on
a device, space on a filesystem; and what the machine does fast (`bf16_is_fast`: whether
`precision: auto` picks bf16).

Checks run before anything large is allocated or written and compare a lower bound of the need
(e.g. the weights alone) with what is free now, so a refusal means the job cannot fit, never that
it merely might not. A `ConfigError` names the config field that asked for the size.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from e2e_sae.errors import ConfigError, UserError


def human_bytes(n: float) -> str:
    """'1.5 GB' style (powers of 1000)."""
    for unit in ("B", "KB", "MB", "GB", "TB", "PB", "EB"):
        if abs(n) < 1000 or unit == "EB":
            return f"{n:.3g} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def _meminfo() -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                parts = rest.split()
                if parts and parts[0].isdigit():
                    out[key] = int(parts[0]) * 1024
    except OSError:
        pass
    return out


def _cgroup_room() -> int | None:
    """Bytes this process's cgroup may still allocate (None without a limit)."""
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        (
            "/sys/fs/cgroup/memory/memory.limit_in_bytes",
            "/sys/fs/cgroup/memory/memory.usage_in_bytes",
        ),
    ):
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 2**60:
            return max(0, int(limit) - usage)
    return None


def available_memory(device: object = "cpu") -> int | None:
    """Bytes that can be allocated on `device` now (None: unknown, e.g. `meta` or no /proc).

    CPU: the kernel's MemAvailable plus free swap, capped by the cgroup's limit; CUDA: the free
    memory `torch.cuda.mem_get_info` reports."""
    kind = str(device).split(":")[0]
    if kind == "cuda":
        import torch

        if not torch.cuda.is_available():
            return None
        index = str(device).partition(":")[2]
        free, _ = torch.cuda.mem_get_info(int(index) if index.isdigit() else None)
        return int(free)
    if kind != "cpu":
        return None
    info = _meminfo()
    if "MemAvailable" not in info:
        return None
    room = info["MemAvailable"] + info.get("SwapFree", 0)
    cgroup = _cgroup_room()
    return room if cgroup is None else min(room, cgroup)


def check_memory(n_bytes: float, device: object, field: str, what: str) -> None:
    """ConfigError naming `field` when `n_bytes` (`what` needs them) exceed the free memory."""
    free = available_memory(device)
    if free is not None and n_bytes > free:
        raise ConfigError(
            f"{field}: {what} need {human_bytes(n_bytes)} of memory, more than the "
            f"{human_bytes(free)} free on {device}"
        )


def free_disk(path: Path) -> int:
    """Free bytes on the filesystem that holds `path` (or would: its nearest existing parent)."""
    p = Path(path).expanduser().absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def check_disk(n_bytes: float, path: Path, field: str, what: str, hint: str = "") -> None:
    """UserError naming `field` when `n_bytes` (`what` needs them) exceed the free space there."""
    free = free_disk(path)
    if n_bytes > free:
        raise UserError(
            f"{field}: {what} need {human_bytes(n_bytes)} on disk, more than the "
            f"{human_bytes(free)} free on the filesystem of {path}{hint}"
        )


def reserve(fd: int, n_bytes: int) -> None:
    """Allocate `n_bytes` for an open file now, so that a full disk is an `OSError` (ENOSPC) here
    rather than a SIGBUS later when a memory map of the file is written."""
    if n_bytes <= 0:
        return
    fallocate = getattr(os, "posix_fallocate", None)  # (none on macOS / Windows)
    if fallocate is None:
        return
    try:
        fallocate(fd, 0, n_bytes)
    except OSError as err:
        if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # (a filesystem without it)
            raise


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def bf16_is_fast(device: object = "cpu") -> bool:
    """Whether `device` multiplies bf16 matrices faster than fp32 ones: a CUDA GPU with native
    bf16 (Ampere and later), or a CPU with AMX tiles (`amx_bf16`, recent Xeons). A CPU with only
    AVX512-BF16 does not count: measured on one (benchmarks/results/README.md), its bf16 GEMMs
    run at about half its fp32 speed."""
    import torch

    kind = str(device).split(":")[0]
    if kind == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if kind != "cpu":
        return False
    return "amx_bf16" in cpu_flags()


def check_device(device: str | None, field: str = "device") -> None:
    """A device string torch understands and this machine has (else a one-line UserError)."""
    import torch

    if device is None:
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise UserError(
            f"{field}: '{device}' is not a device (use cpu, cuda, cuda:1, ...)"
        ) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"{field}: '{device}' requested but CUDA is not available here")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            n = torch.cuda.device_count()
            raise UserError(f"{field}: '{device}' but only {n} CUDA device(s) are visible")
    elif dev.type not in ("cpu", "mps"):
        raise UserError(f"{field}: device type '{dev.type}' is not supported (use cpu or cuda)")
