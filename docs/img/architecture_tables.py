"""The input of docs/img/architecture.svg: spillcache's modules with the layer and thread
of each (MODULES), and the steps of an update to disk and of a fetch back (PATHS).

This is the file to edit when src/spillcache changes; then run
python docs/img/draw_architecture.py, which checks these tables against the code (naming
the line to add, remove or rename) and redraws the picture from them. Data only: the
checks and the drawing live in draw_architecture.py.
"""

from __future__ import annotations

from dataclasses import dataclass

# ---------------------------------------------------------------------------- threads
# Which thread runs a module's code, as docs/architecture.md (its module tables)
# describes it. A module that runs on several is drawn with the one that defines it:
# placement's code runs on the caller's thread and on I/O lanes, always under the lock.
# A numbered step's colour is its thread and lock: CALLER and LANES steps hold no lock.

CALLER = "caller"
LOCKED = "locked"
LANES = "lanes"
STREAMS = "streams"
SIGNAL = "signal"
COMMAND = "command"
ANY = "any"

THREADS = {  # key: (legend, fill, stroke)
    CALLER: ("the caller's thread (a numbered step: no lock held)", "#dbeafe", "#3b82f6"),
    LOCKED: ("the pool's lock held (on the caller's thread or an I/O lane)", "#fde68a", "#d97706"),
    LANES: (
        "spillcache-io lanes: writes, deletions, prefetch jobs "
        "(a plain fetch reads on the caller's thread)",
        "#bbf7d0",
        "#16a34a",
    ),
    STREAMS: ("CUDA side streams, joined by events", "#e9d5ff", "#9333ea"),
    SIGNAL: ("the signal handler (main thread); a new cache's sweep", "#fecaca", "#dc2626"),
    COMMAND: ("the spillcache command", "#e5e7eb", "#6b7280"),
    ANY: ("any thread: definitions and pure functions", "#ffffff", "#9ca3af"),
}

# ----------------------------------------------------------------------------- groups
# The folders of src/spillcache/_internal (each with its rule of what it may import:
# tests/unit/test_import_rules.py), the public package and the helpers beside them.
# A module's group is its folder.

PUBLIC = "public"
RUNTIME = "runtime"
ENGINE = "engine"
IO = "io"
STORE = "store"
PROCESS = "process"
STOCK = "stock"
LLMCOMPRESSOR = "llmcompressor"
CLI = "cli"
HELPERS = "helpers"

GROUPS = {  # key: (title, what it is)
    PUBLIC: ("public", "what users import, and the command"),
    STOCK: ("stock/", "what stock-cache code reaches"),
    RUNTIME: ("runtime/", "where a cache's calls run; each change a transaction"),
    LLMCOMPRESSOR: ("llmcompressor/", "the switch's pipeline and watch"),
    ENGINE: ("engine/", "decisions under the pool's lock: no I/O, copies or waits"),
    IO: ("io/", "moving bytes: lanes, chunk files, memory, copies"),
    STORE: ("store/", "the store on disk: format, checks, finding stores"),
    PROCESS: ("process/", "this process and its node"),
    HELPERS: ("helpers", "pure helpers in _internal/"),
    CLI: ("cli/", "the subcommands"),
}

# Rows of the picture: the groups side by side in each, and how many columns of
# modules each group takes (two columns fill the width).
LAYOUT = [
    [(PUBLIC, 1), (STOCK, 1)],
    [(RUNTIME, 1), (LLMCOMPRESSOR, 1)],
    [(ENGINE, 2)],
    [(IO, 1), (STORE, 1)],
    [(PROCESS, 1), (HELPERS, 1)],
    [(CLI, 2)],
]

# ---------------------------------------------------------------------------- modules
# Every module of src/spillcache, named as docs/architecture.md names it: its path
# under src/spillcache without ".py", and without "_internal/" for the internals.
# A module added, moved or removed there must be added, moved or removed here.

MODULES: dict[str, tuple[str, str, str]] = {  # module: (group, thread, what it owns)
    "__init__": (PUBLIC, ANY, "the public names: IntermediatesCache, CacheConfig, the errors"),
    "cache": (PUBLIC, CALLER, "IntermediatesCache: the documented API, iter_prefetch, finalizer"),
    "config": (PUBLIC, CALLER, "CacheConfig: every knob, parsed and validated once"),
    "errors": (PUBLIC, ANY, "the exception tree"),
    "stock_api": (
        STOCK,
        CALLER,
        "batch_intermediates as a live view; stock helpers, OverrideEqMode",
    ),
    "stock_batch": (STOCK, CALLER, "a batch as a dict read from the cache; its trees"),
    "integrations/llmcompressor": (PUBLIC, CALLER, "enable/disable: llm-compressor rebound"),
    "resumable_pipeline": (
        LLMCOMPRESSOR,
        CALLER,
        "the sequential pipeline, checkpointed per subgraph; resumes, the ranks agreeing",
    ),
    "run_watch": (LLMCOMPRESSOR, CALLER, "a run's line per subgraph and metrics file"),
    "core": (RUNTIME, LOCKED, "CacheCore: batches, entries, generations; update, fetch, close"),
    "placement": (ENGINE, LOCKED, "Placement: each record's tier; admit, evict, spill, promote"),
    "records": (ENGINE, LOCKED, "TensorRecord, Entry; the records; the write-behind area"),
    "transaction": (ENGINE, LOCKED, "a decision's needs, and the journal that takes it back"),
    "tenants": (ENGINE, LOCKED, "one cache's share of a pool; eviction across caches"),
    "reads_and_kept": (ENGINE, LOCKED, "placement's part of a read and of a kept store"),
    "failures": (STORE, LOCKED, "failed writes kept per cache, reported once; DiskFullError"),
    "tiers": (ENGINE, LOCKED, "the device, host and disk tiers; the eviction policies"),
    "unlocked": (RUNTIME, CALLER, "a value prepared before the lock; a fetch's reads outside it"),
    "io_threads": (IO, LANES, "IOPool: the only module that starts threads; a lane per disk"),
    "arena": (IO, ANY, "the pool's host memory: one region cut into slots"),
    "buffers": (
        IO,
        LANES,
        "aligned I/O memory: staging buffers, read buffers without an arena; glibc's heap trimmed",
    ),
    "transfers": (IO, STREAMS, "every copy between devices; side streams, with events"),
    "dtypes": (HELPERS, ANY, "torch dtype <-> stored type; raw same-width views"),
    "tree": (
        HELPERS,
        ANY,
        "nested values <-> spec and tensor leaves; specs <-> JSON; IntermediateValue",
    ),
    "store_format": (STORE, ANY, "the layout; zarr.json read safely; what a commit must fsync"),
    "tensor_store": (STORE, LANES, "TensorStore; Store: made, opened, written, read, removed"),
    "store_dirs": (STORE, COMMAND, "where stores are, and whose; this process's unkept stores"),
    "chunkio": (IO, LANES, "one chunk file out: O_DIRECT, staging, .partial + rename"),
    "chunk_reads": (
        IO,
        LANES,
        "one chunk file in: O_DIRECT, large ones in turns, CRC32C checked",
    ),
    "aio": (IO, LANES, "Linux native AIO (io_submit) for chunkio's queued writes"),
    "persist": (RUNTIME, CALLER, "a kept store made durable on flush() and close, unlocked"),
    "reopen": (RUNTIME, CALLER, "IntermediatesCache.open: a kept store back as a cache"),
    "checkpoints": (STORE, CALLER, "a checkpoint_dir: fingerprint, changed tensors, the commit"),
    "store_checks": (STORE, CALLER, "a store read as data: names, links and sizes checked first"),
    "summary": (STORE, COMMAND, "what a store holds and what cut-short writes left; gc"),
    "pool": (RUNTIME, LOCKED, "SharedPool: one lock, its transactions, I/O lanes per config"),
    "resolved": (PROCESS, CALLER, "a config resolved: ranks under torchrun, shares, disks, device"),
    "sysinfo": (HELPERS, CALLER, "available RAM, filesystem type"),
    "cleanup": (PROCESS, SIGNAL, "signals left at SIG_DFL remove own stores; dead ones swept"),
    "cli": (PUBLIC, COMMAND, "the spillcache command: parser; du, gc, inspect, show, verify"),
    "config_cli": (CLI, COMMAND, "spillcache config: settings and where each came from"),
    "plan_cli": (CLI, COMMAND, "spillcache plan: options; the report, its JSON and TOML"),
    "plan_figures": (
        CLI,
        COMMAND,
        "spillcache plan's figures: inputs, budgets, disks probed, config",
    ),
    "report_cli": (CLI, COMMAND, "spillcache report: a metrics file's table, plot, budget"),
    "plan": (CLI, COMMAND, "a run's cache calls replayed at a reduced scale"),
    "demo_cli": (CLI, COMMAND, "spillcache demo: options and summary"),
    "demo": (CLI, COMMAND, "a random-weight transformer calibrated through the cache"),
    "text": (HELPERS, COMMAND, "byte sizes and aligned tables as printed"),
}

# ------------------------------------------------------------------------------ paths
# Each step: the functions in call order, as "Class.method" or "module.function" (each
# is checked against the code), the thread it runs on (its box's colour), and why.


@dataclass(frozen=True)
class Step:
    calls: tuple[str, ...]
    thread: str
    on: str
    what: str


@dataclass(frozen=True)
class Route:
    letter: str
    title: str
    colour: str
    steps: tuple[Step, ...]
    disk_step: int  # the step (from 1) that touches the chunk file
    aside: Step | None = None  # a variant drawn after the steps, unnumbered


UPDATE = Route(
    "U",
    "update: a value from the caller to a chunk file",
    "#c2410c",
    (
        Step(
            (
                "IntermediatesCache.update",
                "CacheCore.update",
                "Offload.prepare",
                "Transfers.to_host",
                "SharedPool.read_free_space",
            ),
            CALLER,
            "caller's thread, no lock",
            "checked and flattened; a tiered GPU value bound for host memory copied there on a "
            "side stream (the caller waits for that copy's event only), an inline one by a plain "
            "copy on the caller's stream; each disk's free space read if anything may spill",
        ),
        Step(
            (
                "SharedPool.transact",
                "CacheCore._wait_for_write_room",
                "CacheCore._store_prepared",
                "Placement.admit",
                "Placement._place_new",
            ),
            LOCKED,
            "caller's thread, pool lock held",
            "a transaction: earlier failed writes reported, backpressure while the write-behind "
            "area is over budget, then the decision: each tensor to the first tier with room, "
            "all or nothing",
        ),
        Step(
            ("Placement._make_room", "Tenants.victims", "Placement._evict", "Placement._spill"),
            LOCKED,
            "caller's thread, pool lock held",
            "no room in the tier: the policies' victims, across caches, move down; a value bound "
            "for disk gets a disk, its bytes reserved and a place in the write-behind area, its "
            "write queued as an effect; a missing store or a device value's host copy is asked "
            "for (NeedsFirst) and the admit taken back",
        ),
        Step(
            ("SharedPool._make_stores", "SharedPool.make_store", "Store.create"),
            CALLER,
            "caller's thread, no lock",
            "only when the decision asked: the cache's store made on a disk it never wrote to "
            "(directories, an O_DIRECT probe file, three zarr.json), device values copied to "
            "the host; then the transaction decides again (step 2)",
        ),
        Step(
            ("SharedPool._hand_effects_to_lanes", "Placement.take_writes", "IOPool.submit"),
            LOCKED,
            "caller's thread, pool lock held",
            "the end of the transaction: its writes and deletions go to their disk's lane at "
            "write priority; update returns",
        ),
        Step(
            (
                "SharedPool._write_to_disk",
                "Store.write_tensor",
                "chunkio.write_file",
                "chunkio.write_partial",
                "chunkio.publish",
            ),
            LANES,
            "a spillcache-io lane, no lock",
            "the chunk written with O_DIRECT where the filesystem takes it (unaligned data through "
            "a staging buffer, pieces queued with native AIO); zarr.json written under a .partial "
            "name inside write_file (on the AIO path while the last pieces are in flight, else "
            "after the data); the chunk renamed into place, then zarr.json",
        ),
        Step(
            ("SharedPool.transact", "Placement.write_done", "Tenant.write_failed"),
            LOCKED,
            "the same lane, pool lock held",
            "the record is on disk and its RAM copy dropped (a failed write: the value back in "
            "the host tier, reported by the cache's next call); waiting updates woken",
        ),
    ),
    disk_step=6,
)

FETCH = Route(
    "F",
    "fetch back, with iter_prefetch",
    "#0e7490",
    (
        Step(
            ("IntermediatesCache.iter_prefetch", "CacheCore.submit_fetch", "IOPool.submit"),
            LOCKED,
            "caller's thread, pool lock held",
            "the next prefetch_depth batches queued at read priority (ahead of writes), "
            "consecutive batches on different lanes",
        ),
        Step(
            (
                "CacheCore._prefetch",
                "CacheCore.fetch_versioned",
                "unlocked.plan",
                "ReadsAndKept.begin_load",
                "Placement.hold",
            ),
            LOCKED,
            "a spillcache-io lane, pool lock held",
            "values in memory (or still in the write-behind area) taken; records only on disk "
            "held, so that a delete cannot remove their file",
        ),
        Step(
            (
                "CacheCore._finish_loads",
                "unlocked.read",
                "unlocked._read_record",
                "Store.read_tensor",
                "Arena.take",
                "chunk_reads.read_file",
            ),
            LANES,
            "the same lane, no lock",
            "O_DIRECT where the filesystem takes it, into a slot of the pool's arena, its "
            "CRC32C checked once read; a record another thread is reading is waited for, "
            "not read twice",
        ),
        Step(
            ("SharedPool.transact", "ReadsAndKept.read_done", "Placement.release"),
            LOCKED,
            "the same lane, pool lock held",
            "a transaction: the read recorded and the holds released (a deletion this frees "
            "handed to a lane); promotion into the host tier waits for the reader",
        ),
        Step(
            ("CacheCore._assemble", "Transfers.onload"),
            STREAMS,
            "the same lane, no lock, the copy on a CUDA side stream",
            "for a CUDA model device; the copy's event goes into the batch's Ready and nothing "
            "waits for it here",
        ),
        Step(
            (
                "CacheCore.add_stall",
                "CacheCore.mark_read",
                "SharedPool.transact",
                "ReadsAndKept.promote",
                "CacheCore.generation",
            ),
            LOCKED,
            "caller's thread, pool lock held",
            "the caller took the batch from its Future; the scan position moves to it, what the "
            "job read is promoted as a plain fetch would (victims' writes handed off), and the "
            "batch's generation read",
        ),
        Step(
            ("Ready.wait",),
            CALLER,
            "caller's thread and its CUDA stream, no lock",
            "the consumer's stream waits on the copies' events (a GPU-side wait); a batch "
            "updated or deleted since its prefetch is fetched again, by a plain fetch",
        ),
    ),
    disk_step=3,
    aside=Step(
        ("IntermediatesCache.fetch", "CacheCore.fetch", "CacheCore.fetch_versioned"),
        CALLER,
        "a plain fetch",
        "steps 2 to 5 on the caller's thread (2 and 4 with the pool lock held): failed writes "
        "reported and the scan position moved first, the read time counted as stall, what it "
        "read promoted at once, onloaded without a side stream",
    ),
)

PATHS = (UPDATE, FETCH)
