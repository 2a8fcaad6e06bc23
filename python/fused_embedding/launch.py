"""Launch-configuration heuristics, one place for all backends."""
from __future__ import annotations

CACHE_LINE_BYTES = 64  # x86 and most other CPUs: the unit every prefetch and alignment here counts in

# Parallel work items per CPU thread: a few, so a slow thread (the machine is
# shared) does not hold up the rest, while each chunk still amortises its
# accumulator allocation over many bags.
CPU_CHUNKS_PER_THREAD = 4


# A table of at most this many bytes is read from the caches (1 MB of L2 a core here, the
# rest from L3): a row arrives in tens of cycles, which 16 rows ahead covers, and a
# prefetch further ahead only costs instructions. Measured (one thread, fresh ids each
# call, interleaved with torch): V=10,000 D=32 fp32 (1.3 MB) 15-20% faster 16 ahead than
# the row rule's 64, D=8 and D=16 (0.3, 0.6 MB) about 8% faster than 128; V=100,000 D=32
# (12.8 MB) no faster.
CPU_CACHED_TABLE_BYTES = 2 << 20


def cpu_rows_ahead(row_bytes: int, table_bytes: int = -1) -> int:
    """How many rows ahead of the one being summed the CPU kernels prefetch.

    16 for a table of at most CPU_CACHED_TABLE_BYTES (``table_bytes``; -1: not known).
    Otherwise about 8 KB ahead, kept between 16 and 128 rows. Measured (2 threads,
    64-byte aligned tables, benchmarks/NOTES.md): 64-byte rows ran 1.8x faster 128 ahead
    than 32; 128-byte rows 1.5x faster 64-96 ahead than 32; 256-byte rows were
    within 10% from 32 to 256 ahead; 512-byte rows were best 8-16 ahead (1.1x
    slower 48 ahead); 2 KB rows the same from 8 to 64.
    """
    if 0 <= table_bytes <= CPU_CACHED_TABLE_BYTES:
        return 16
    return max(16, min(128, 8192 // max(1, row_bytes)))


# Ids ahead whose cached row mean the axis-2 gather prefetches (one scalar each;
# measured at B=1024, L=64 with the [V] means out of cache: see benchmarks/NOTES.md).
CPU_MEANS_AHEAD = 256

# Calls gathering at most this many bytes (whole cache lines) run on the calling
# thread: waking Numba's thread team costs 5-40 us (more when other thread pools,
# TF's or torch's, have just run), which is what a call this small takes
# altogether (benchmarks/NOTES.md).
CPU_SERIAL_MAX_BYTES = 256 << 10


def cpu_runs_serial(rows: int, row_bytes: int) -> bool:
    """True when a call reading ``rows`` gathered rows of ``row_bytes`` each is too small to share out."""
    lines_per_row = -(-row_bytes // CACHE_LINE_BYTES)
    return rows * lines_per_row * CACHE_LINE_BYTES <= CPU_SERIAL_MAX_BYTES


def cpu_bag_chunks(ids: int, batch: int, threads: int, serial: bool) -> int:
    """How many merge-path chunks the CPU bags kernel splits ``ids`` ids in ``batch`` bags
    into: a few per thread (CPU_CHUNKS_PER_THREAD), each at least one step of the merge
    path; one (on the calling thread, no fix-up) when the call runs serial."""
    if serial:
        return 1
    return max(1, min(ids + batch, threads * CPU_CHUNKS_PER_THREAD))


def cpu_bags_per_chunk(batch: int, threads: int) -> int:
    """Bags handled by one parallel iteration of a CPU kernel (>= 1)."""
    chunks = max(1, threads * CPU_CHUNKS_PER_THREAD)
    return max(1, -(-batch // chunks))


# --- GPU ---------------------------------------------------------------------------------
# One launch shape for both GPU backends (numba-cuda and cupy): only the widest load
# each can issue differs (8 bytes in Numba, 16 in CUDA C).

GPU_BLOCK_THREADS = 256      # 8 warps: enough loads in flight per block, no register limit on occupancy
GPU_WARP = 32
# Bytes of one gathered row a lane holds per row in flight: 4 rows x 64 bytes of
# loads plus their accumulators stay well inside the register file (no spills).
GPU_ROW_BYTES_PER_LANE = 64
GPU_MAX_WORDS_PER_LANE = 8
# Axis 1 loads this many rows before summing any; twice as many where a lane's part
# of a row is GPU_NARROW_LANE_BYTES or less (a float16 row of 128 in 8-byte words:
# one word per lane), so a lane keeps as many bytes in flight as with wider rows.
# Measured on an H200 with 4: a float16 table ran no faster than float32
# (benchmarks/NOTES.md, GPU run 4).
GPU_ROWS_IN_FLIGHT = 4
GPU_NARROW_LANE_BYTES = 8
# Axis 2 sums a whole row per group: about this many words per lane before the
# shared-memory/shuffle reduction, for a few loads in flight without idle lanes.
GPU_AXIS2_WORDS_PER_LANE = 4
GPU_MAX_GRID_X = 2**31 - 1
GPU_MAX_GRID_Y = 65535


def _next_power_of_two(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def gpu_word_bytes(dim: int, item_bytes: int, address: int, max_word_bytes: int) -> int:
    """The widest load (bytes, a power of two <= max_word_bytes) that tiles a row.

    A word must divide the row's bytes (dim * item_bytes) so every row starts on a
    word boundary, and divide the table's address so the loads are aligned.
    Falls back to one element per load.
    """
    row_bytes = dim * item_bytes
    word = max_word_bytes
    while word > item_bytes and (row_bytes % word or address % word):
        word //= 2
    return max(word, item_bytes)


class GpuLaunch:
    """Launch shape of a GPU kernel: who reads which words of which gathered row.

    word_bytes / elements_per_word / words_per_row: the row as W words of E elements.
    lanes: threads per bag (axis 1) or per (bag, position) (axis 2), a power of two <= 32.
    words_per_lane: K, the words of a row each lane holds (axis 1; a power of two).
    rows_in_flight: R, rows whose loads a lane issues before summing them (axis 1).
    groups_per_block: bags (axis 1) or positions (axis 2) per block.
    grid: (x,) or (x, y) blocks; y = column tiles of lanes * words_per_lane words.
    """

    def __init__(self, word_bytes, elements_per_word, words_per_row, lanes, words_per_lane,
                 block, grid, rows_in_flight):
        self.word_bytes = word_bytes
        self.rows_in_flight = rows_in_flight
        self.elements_per_word = elements_per_word
        self.words_per_row = words_per_row
        self.lanes = lanes
        self.words_per_lane = words_per_lane
        self.block = block
        self.groups_per_block = block // lanes
        self.grid = grid

    def __repr__(self):
        return (f"GpuLaunch(word_bytes={self.word_bytes}, elements_per_word={self.elements_per_word}, "
                f"words_per_row={self.words_per_row}, lanes={self.lanes}, "
                f"words_per_lane={self.words_per_lane}, rows_in_flight={self.rows_in_flight}, "
                f"block={self.block}, grid={self.grid})")


def gpu_launch(axis: int, batch: int, length: int, dim: int, item_bytes: int,
               word_bytes: int) -> GpuLaunch:
    """The launch shape for a (B, L) x (V, D) call reading rows in ``word_bytes`` loads.

    Axis 1: a group of lanes per bag, min(32, W rounded up to a power of two),
    each lane K words (K <= 8, K * word_bytes <= GPU_ROW_BYTES_PER_LANE); rows wider than
    a group's lanes * K words are split into column tiles (grid y); R rows in flight
    (GPU_ROWS_IN_FLIGHT, doubled for narrow lanes).
    Axis 2: a group of lanes per (bag, position), about
    GPU_AXIS2_WORDS_PER_LANE words per lane.
    Raises ValueError when the grid would exceed CUDA's limits. Callers skip the
    launch when there is nothing to write (B == 0, or axis 2 with L == 0).
    """
    elements = word_bytes // item_bytes
    words = dim // elements
    block = GPU_BLOCK_THREADS
    if int(axis) == 1:
        lanes = min(GPU_WARP, _next_power_of_two(words))
        max_per_lane = max(1, min(GPU_MAX_WORDS_PER_LANE, GPU_ROW_BYTES_PER_LANE // word_bytes))
        per_lane = min(_next_power_of_two(-(-words // lanes)), _next_power_of_two(max_per_lane))
        tiles = -(-words // (lanes * per_lane))
        grid = (-(-batch // (block // lanes)), tiles)
        narrow = per_lane * word_bytes <= GPU_NARROW_LANE_BYTES
        rows_in_flight = 2 * GPU_ROWS_IN_FLIGHT if narrow else GPU_ROWS_IN_FLIGHT
    else:
        lanes = min(GPU_WARP, _next_power_of_two(-(-words // GPU_AXIS2_WORDS_PER_LANE)))
        per_lane = -(-words // lanes)
        grid = (-(-(batch * length) // (block // lanes)),)
        rows_in_flight = GPU_ROWS_IN_FLIGHT  # unused: axis 2 reads one row per group
    if grid[0] > GPU_MAX_GRID_X or (len(grid) > 1 and grid[1] > GPU_MAX_GRID_Y):
        raise ValueError(f"a GPU launch for B={batch}, L={length}, D={dim} needs a grid of {grid} "
                         f"blocks, past CUDA's limits ({GPU_MAX_GRID_X}, {GPU_MAX_GRID_Y}); "
                         f"split the batch")
    return GpuLaunch(word_bytes, elements, words, lanes, per_lane, block, grid, rows_in_flight)
