"""The package's ServerApp, its Grid wrapped so that every reply the server's code pulls is
kept and written (pickled) to the run config's `record-file`: every array, every byte string
that decodes as one, every metric. tests/flower/test_secure.py checks what is in there."""

from __future__ import annotations

import pickle

import numpy as np
from flwr.app import Context, Message
from flwr.common import bytes_to_ndarray
from flwr.serverapp import Grid, ServerApp

from pneumonia.flower import server_app

app = ServerApp()


def decoded(value) -> list[np.ndarray]:
    """The arrays a record value holds (numbers, numpy-serialized bytes, lists of either)."""
    if isinstance(value, list):
        return [a for v in value for a in decoded(v)]
    if isinstance(value, bytes):
        try:
            return [bytes_to_ndarray(value)]
        except Exception:  # key material: not an array
            return []
    if isinstance(value, int | float):
        return [np.asarray([value], dtype=np.float64)]
    return []


def arrays_of(reply: Message) -> list[np.ndarray]:
    content, out = reply.content, []
    for record in content.array_records.values():
        out += [array.numpy() for array in record.values()]
    for record in [*content.config_records.values(), *content.metric_records.values()]:
        out += [a for value in record.values() for a in decoded(value)]
    return out


class RecordingGrid:
    def __init__(self, grid: Grid) -> None:
        self.grid, self.arrays = grid, []

    def __getattr__(self, name: str):
        return getattr(self.grid, name)

    def pull_messages(self, message_ids):
        replies = list(self.grid.pull_messages(message_ids))
        for reply in replies:
            if not reply.has_error():
                self.arrays += arrays_of(reply)
        return replies


@app.main()
def main(grid: Grid, context: Context) -> None:
    recording = RecordingGrid(grid)
    try:
        server_app.main(recording, context)
    finally:
        with open(str(context.run_config["record-file"]), "wb") as f:
            pickle.dump(recording.arrays, f)
