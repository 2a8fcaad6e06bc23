"""Host buffers with a chosen start address (cache-line aligned tables, huge-page vectors),
and how much memory the host still has for an output (cgroup limits included).

NumPy starts its buffers 16 bytes into a cache line. A table whose rows do not
start on 64-byte lines reads one line more per row than its size (a 64-byte
float32 row at D=16 touches two lines), which the gather kernels then have to
fetch too; TensorFlow's allocator aligns to 64, so tables arriving through the
TF op are already aligned. ``empty_aligned`` gives NumPy arrays the same start.
"""
from __future__ import annotations

import math
import os
from pathlib import PurePosixPath

import numpy as np

from .launch import CACHE_LINE_BYTES

HUGE_PAGE_BYTES = 2 << 20
# The TF op's host results of this many bytes and more start on a 64-byte line, so it
# can hand them to TensorFlow through DLPack instead of having TF copy them (TF takes
# a foreign buffer only when it is aligned). Smaller ones skip what the alignment
# costs; TF's copy of them is about as cheap.
ALIGNED_OUTPUT_MIN_BYTES = 64 << 10
# NumPy asks Linux for transparent huge pages (madvise) on allocations of this many
# bytes and more; smaller ones stay on 4 KB pages.
NUMPY_HUGE_PAGE_MIN_BYTES = 4 << 20


def empty_aligned(shape, dtype, alignment: int = CACHE_LINE_BYTES, min_bytes: int = 0) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts at a multiple of ``alignment`` bytes.

    A view into a slightly larger uint8 buffer (kept alive through ``.base``) of
    at least ``min_bytes`` bytes.
    """
    shape = tuple(shape) if np.ndim(shape) else (int(shape),)
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    buffer = np.empty(max(nbytes, min_bytes) + alignment, dtype=np.uint8)
    start = -buffer.__array_interface__["data"][0] % alignment  # cheaper than .ctypes.data
    return buffer[start:start + nbytes].view(dtype).reshape(shape)


def empty_on_huge_pages(count: int, dtype) -> np.ndarray:
    """np.empty(count, dtype) on transparent huge pages, where it is large enough to matter.

    For vectors read at scattered places (the cached row means): on 4 KB pages
    nearly every read also walks the page table once other work has churned the
    TLB; on 2 MB pages a 4 MB vector needs two TLB entries. Only a hint: where
    the kernel has huge pages off, this is an ordinary array.
    """
    nbytes = count * np.dtype(dtype).itemsize
    if nbytes < HUGE_PAGE_BYTES // 2:
        return np.empty(count, dtype=dtype)
    return empty_aligned(count, dtype, alignment=HUGE_PAGE_BYTES, min_bytes=NUMPY_HUGE_PAGE_MIN_BYTES)


# --- how much the host can still hand out ----------------------------------------------------

# Where the memory figures are read from: "/" on a real system. Tests point it at a
# folder holding a fake proc/ and sys/fs/cgroup/ tree.
SYSTEM_ROOT = "/"
# cgroup v2's one hierarchy is mounted at sys/fs/cgroup, or at sys/fs/cgroup/unified
# beside v1's controllers (the "hybrid" layout); v1's memory controller has its own.
CGROUP_V2_MOUNTS = ("sys/fs/cgroup", "sys/fs/cgroup/unified")
CGROUP_V1_MEMORY_MOUNT = "sys/fs/cgroup/memory"
NO_LIMIT = 2**63 - 1
# cgroup v1 writes "no limit" as a number near 2**63 (the largest page count, in bytes).
V1_NO_LIMIT_MIN = 2**62


def host_memory_limit_bytes() -> int:
    """Bytes an output on the host may still take (int): the least of MemAvailable and,
    for each memory-limited cgroup (v1 or v2) this process is in, its own or an
    ancestor's, the limit less what it uses net of reclaimable page cache.

    MemAvailable alone ignores a container's limit: past that limit the kernel's OOM
    killer ends the process (exit 137) while the kernel writes the output, instead
    of a MemoryError before it is allocated. Never raises: what can't be read counts
    as no limit.
    """
    available = _meminfo_bytes("MemAvailable")
    if available is None:
        available = _sysconf_bytes("SC_AVPHYS_PAGES")
    return min([available] + [limit - used for limit, used in _cgroup_memory_levels()])


def host_memory_total_bytes() -> int:
    """The host's memory as this process may use it (int): physical memory (MemTotal),
    or the lowest cgroup limit above this process where that is less."""
    total = _meminfo_bytes("MemTotal")
    if total is None:
        total = _sysconf_bytes("SC_PHYS_PAGES")
    return min([total] + [limit for limit, _ in _cgroup_memory_levels()])


def output_too_large_error(shape, dtype, out_bytes: int, limit: int, backend: str) -> MemoryError:
    """The error for an output of ``shape`` (a tuple) and ``dtype`` taking ``out_bytes``
    bytes, more than the ``limit`` bytes ``backend``'s device has: one wording for the
    core op and the TF op's compiled kernel."""
    return MemoryError(f"the output {tuple(shape)} {np.dtype(dtype)} needs {out_bytes / 2**30:.1f} GiB, "
                       f"more than the {limit / 2**30:.1f} GiB the {backend!r} backend's device has")


def _read(relative: str) -> str | None:
    try:
        with open(os.path.join(SYSTEM_ROOT, relative)) as file:  # ~10 us less than pathlib's
            return file.read()
    except (OSError, UnicodeDecodeError):
        return None


def _meminfo_bytes(field: str) -> int | None:
    for line in (_read("proc/meminfo") or "").splitlines():
        name, _, value = line.partition(":")
        if name == field:
            try:
                return int(value.split()[0]) * 1024  # in kB
            except (ValueError, IndexError):
                return None
    return None


def _sysconf_bytes(pages: str) -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf(pages)
    except (ValueError, OSError, AttributeError):
        return NO_LIMIT


def _cgroup_memory_levels() -> list[tuple[int, int]]:
    """(limit, used) in bytes for each memory-limited cgroup this process is in."""
    levels = []
    for line in (_read("proc/self/cgroup") or "").splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            for mount in CGROUP_V2_MOUNTS:
                levels += _limited_levels(mount, path, "memory.max", "memory.current", "inactive_file")
        elif "memory" in controllers.split(","):
            levels += _limited_levels(CGROUP_V1_MEMORY_MOUNT, path, "memory.limit_in_bytes",
                                      "memory.usage_in_bytes", "total_inactive_file")
    return levels


def _limited_levels(mount: str, path: str, limit_file: str, usage_file: str,
                    inactive_key: str) -> list[tuple[int, int]]:
    """(limit, used) of the cgroup at ``path`` under ``mount`` and of each ancestor up to
    the mount's root, wherever a limit is set.

    A limit on an ancestor binds too, so every level counts. The path
    /proc/self/cgroup gives is the process' place in the whole hierarchy, while a
    container often has only its own cgroup mounted (at the mount's root): folders
    of that path that aren't there are skipped, and the walk up reaches the
    container's own cgroup. Usage counts page cache, which the kernel reclaims
    before it kills anything: the inactive file pages are taken off it (what the
    kubelet and `docker stats` do).
    """
    parts = PurePosixPath(path).parts[1:]
    levels = []
    for depth in range(len(parts), -1, -1):
        folder = os.path.join(mount, *parts[:depth])
        limit = _read(os.path.join(folder, limit_file))
        try:
            limit = int(limit)  # v2's "max" (no limit) and a missing file both fail here
        except (TypeError, ValueError):
            continue
        if limit >= V1_NO_LIMIT_MIN:
            continue
        used = _int_or_zero(_read(os.path.join(folder, usage_file)))
        for line in (_read(os.path.join(folder, "memory.stat")) or "").splitlines():
            key, _, value = line.partition(" ")
            if key == inactive_key:
                used = max(0, used - _int_or_zero(value))
                break
        levels.append((limit, used))
    return levels


def _int_or_zero(text: str | None) -> int:
    try:
        return int(text)
    except (TypeError, ValueError):
        return 0
