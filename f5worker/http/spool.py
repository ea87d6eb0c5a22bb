"""What a speech answer has sampled and its client has not read yet: in memory up to a bound, the
rest in an anonymous temp file, handed out in order.

Why this module exists: a job samples faster than a client that plays as it reads (a GPU samples
tens of times faster than real time), and the job does not wait for its connection: its deadline
and its share of the model are the job's, not the client's. What the client has not read yet had
piled up in memory, a 48 kHz chapter's WAV about 0.9 GB per request. Here the first
``MEMORY_BYTES`` are kept in memory and the rest is written to an anonymous file in the temp folder
(gone with its last handle, whatever ends the job) and read back a piece at a time, so a slow
reader costs disk, as the queue face's assembled output does, not memory.
"""
from __future__ import annotations

import collections
import tempfile
from pathlib import Path
from typing import BinaryIO

from f5worker.jobs.tempfiles import staging_error

MEMORY_BYTES = 8 << 20  # unsent bytes kept in memory before the rest goes to disk
READ_BYTES = 1 << 20  # a piece read back from disk


class ByteSpool:
    """First in, first out; every byte in memory is older than every byte on disk, so the order
    holds: new bytes go to memory only while the file has nothing unread."""

    def __init__(self, spill_dir: Path, memory_bytes: int | None = None):
        self.spill_dir = spill_dir
        self.memory_bytes = MEMORY_BYTES if memory_bytes is None else memory_bytes
        self.pieces: collections.deque[bytes] = collections.deque()
        self.in_memory = 0
        self.file: BinaryIO | None = None
        self.written = self.read_at = 0  # the file's end, and how far it has been read

    @property
    def on_disk(self) -> int:
        return self.written - self.read_at

    def __bool__(self) -> bool:
        return bool(self.pieces) or self.on_disk > 0

    def put(self, data: bytes) -> None:
        if not self.on_disk and self.in_memory + len(data) <= self.memory_bytes:
            self.pieces.append(data)
            self.in_memory += len(data)
            return
        try:
            if self.file is None:
                self.file = tempfile.TemporaryFile(dir=self.spill_dir)
            self.file.seek(self.written)
            self.file.write(data)
            self.file.flush()  # read back through the same handle; the buffer is written first
        except OSError as err:  # a full or missing temp folder, said as such
            raise staging_error(self.spill_dir, err) from err
        self.written += len(data)

    def take(self) -> bytes:
        """The oldest unsent bytes (at most ``READ_BYTES`` from disk); b"" when there are none.
        Both ends run on the event loop (a piece from the page cache takes well under a
        millisecond), so the file is never read and written at once."""
        if self.pieces:
            data = self.pieces.popleft()
            self.in_memory -= len(data)
            return data
        if not self.on_disk:
            return b""
        self.file.seek(self.read_at)
        data = self.file.read(min(READ_BYTES, self.on_disk))
        self.read_at += len(data)
        if not self.on_disk:  # all read: the file starts over, and new bytes may go to memory again
            self.file.seek(0)
            self.file.truncate()
            self.written = self.read_at = 0
        return data

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
