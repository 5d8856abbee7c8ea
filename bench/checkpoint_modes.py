"""An instrumented coordinator: the same server with its WAL checkpoints changed, to measure
what they cost (run a benchmark through it with ``BENCH_SERVER_SCRIPT``, see bench/harness.py):

    CKPT_MODE=off BENCH_SERVER_SCRIPT=bench/checkpoint_modes.py python -m bench.tail

``CKPT_MODE``:

- ``off``: no checkpoints at all (the WAL grows for the whole run);
- ``nosync``: checkpoints without their fsyncs (the checkpointer's ``synchronous=OFF``);
- ``flush``: as shipped, plus a thread that starts the WAL's writeback every
  ``FLUSH_SECONDS`` (default 0.05) with ``sync_file_range``, so that a checkpoint's fsync
  finds little left to write (PostgreSQL's ``*_flush_after`` idea);
- anything else: as shipped.

For experiments only: ``off`` and ``nosync`` give up durability after a power loss.
"""

from __future__ import annotations

import ctypes
import os
import runpy
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import anyio  # noqa: E402
from databases import DatabaseURL  # noqa: E402

from storage.sql import DatabasesJobStore  # noqa: E402

SYNC_FILE_RANGE_WRITE = 2


def _flusher(wal: str, every: float) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(wal, os.O_RDONLY)
    while True:
        time.sleep(every)
        libc.sync_file_range(fd, ctypes.c_longlong(0), ctypes.c_longlong(0), SYNC_FILE_RANGE_WRITE)


def patch(mode: str) -> None:
    connect = DatabasesJobStore._connect

    async def never(self: DatabasesJobStore, interval: float = 1.0) -> None:
        await anyio.sleep_forever()

    async def connect_then(self: DatabasesJobStore) -> None:
        await connect(self)
        checkpointer: Any = self._checkpointer
        if mode == "nosync":
            await checkpointer.raw_connection.execute("PRAGMA synchronous = OFF")
        elif mode == "flush":
            wal = DatabaseURL(self.url).database + "-wal"
            every = float(os.environ.get("FLUSH_SECONDS", "0.05"))
            threading.Thread(target=_flusher, args=(wal, every), daemon=True).start()

    if mode == "off":
        DatabasesJobStore.maintain = never  # type: ignore[method-assign]
    DatabasesJobStore._connect = connect_then  # type: ignore[method-assign]


if __name__ == "__main__":
    patch(os.environ.get("CKPT_MODE", ""))
    sys.argv[0] = "web.cli"
    runpy.run_module("web.cli", run_name="__main__")
