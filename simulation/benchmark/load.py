"""A load generator for the split server's scaling benchmark; imports gRPC but not torch.

Each process is one client: it streams the same pre-encoded batch, renumbered step by step, and
like a real client sends the next only once the reply to the last has come, but computes nothing
itself, so the split server does all the work.
"""

from __future__ import annotations

import json
import queue
import struct
import time
from multiprocessing.connection import Connection


def stream_batches(
    conn: Connection,
    *,
    address: str,
    method: str,
    metadata: tuple[tuple[str, str], ...],
    header: dict,
    payload: bytes,
    steps: int,
) -> None:
    """Wait for ``"go"`` on ``conn``, stream ``steps`` frames, send back (start, end) times."""
    import grpc  # noqa: PLC0415 - keeps module import cheap for the process that spawns this

    channel = grpc.insecure_channel(
        address,
        options=[
            ("grpc.max_send_message_length", 1 << 30),
            ("grpc.max_receive_message_length", 1 << 30),
        ],
    )
    grpc.channel_ready_future(channel).result(timeout=30)

    def frame(step: int) -> bytes:
        encoded = json.dumps({**header, "step": step}, separators=(",", ":")).encode()
        return struct.pack("<I", len(encoded)) + encoded + payload

    outbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
    conn.send("ready")
    conn.recv()
    started = time.perf_counter()
    replies = channel.stream_stream(method)(iter(outbox.get, None), metadata=metadata)
    count = 0
    for step in range(1, steps + 1):
        outbox.put(frame(step))
        next(replies)
        count += 1
    outbox.put(None)
    conn.send((started, time.perf_counter(), count))
    channel.close()
