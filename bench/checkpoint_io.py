"""Checkpoints written in the background: the training thread snapshots the payload's
tensors to host memory and goes on; a writer thread serialises the snapshot once and
writes it atomically to each of its files (`best.pt` and `last.pt` get the same bytes),
then runs a follow-up (the engine writes `history.jsonl` there, so the history never
names an epoch whose `last.pt` is not on disk).

The guarantee is the synchronous one's: every file is complete or absent (temporary name,
fsync, rename), at most one write is in flight (the next snapshot waits for it), and the
engine waits for it at the end of training, on an error and before it words what was
kept. The files are byte for byte those `torch.save(payload, file)` writes from the
training thread, except that tensors from a GPU are recorded as CPU tensors (loading
with `map_location`, as `load_checkpoint` does, gives the same contents).

The snapshot must be taken at once: the next optimizer step changes the live parameters.
It copies each storage once (views and shared storages stay views of one copy, as
torch.save writes them), a plain clone on the CPU and, from a GPU, a non-blocking copy
into pinned host memory that the writer waits for (a CUDA event) before reading it.
"""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench.records import (
    CheckpointWriteError,
    atomic_torch_save,
    atomic_write_bytes,
    serialise_checkpoint,
)

_ATOMS = (str, bytes, int, float, bool, complex, type(None), torch.dtype, torch.device)


class _Snapshot:
    """A copy of a payload whose tensors live in host memory of their own; containers and
    storages keep their identities (a memo, as `copy.deepcopy` keeps), so that pickling
    the copy gives the bytes pickling the original would."""

    def __init__(self, pool: dict[tuple[int, bool], list[torch.Tensor]] | None = None) -> None:
        self.pool = pool or {}  # free host buffers by (bytes, pinned), from the last snapshot
        self.memo: dict[int, Any] = {}
        self.storages: dict[int, torch.Tensor] = {}  # storage -> its bytes on the host
        self.buffers: list[tuple[tuple[int, bool], torch.Tensor]] = []  # (pool key, buffer)
        self.keep: list[Any] = []  # the originals, alive while their ids key the memo
        self.gpu_devices: set[torch.device] = set()  # copies still in flight from these

    def copy(self, obj: Any) -> Any:
        if isinstance(obj, _ATOMS):
            return obj
        key = id(obj)
        if key in self.memo:
            return self.memo[key]
        self.keep.append(obj)
        kind = type(obj)
        if kind in (torch.Tensor, nn.Parameter) and _plain_strided(obj):
            out = self.memo[key] = self.tensor(obj)
        elif kind in (dict, OrderedDict):
            out = self.memo[key] = kind()
            for k, v in obj.items():
                out[self.copy(k)] = self.copy(v)
            attributes = getattr(obj, "__dict__", None)
            if attributes:  # a state_dict's `_metadata`
                out.__dict__.update(self.copy(attributes))
        elif kind is list:
            out = self.memo[key] = []
            out.extend(self.copy(v) for v in obj)
        elif kind is tuple:
            out = self.memo[key] = tuple(self.copy(v) for v in obj)
        else:  # anything else (rare in a payload): deepcopy, which shares this memo
            out = self.memo[key] = copy.deepcopy(obj, self.memo)
        return out

    def tensor(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        host = self.storages.get(storage._cdata)
        if host is None:
            raw = torch.empty(0, dtype=torch.uint8, device=t.device).set_(
                storage, 0, (storage.nbytes(),), (1,))
            on_gpu = t.device.type != "cpu"
            key = (raw.numel(), on_gpu)
            free = self.pool.get(key)
            host = free.pop() if free else torch.empty(raw.shape, dtype=torch.uint8,
                                                       pin_memory=on_gpu)
            host.copy_(raw, non_blocking=on_gpu)
            if on_gpu:
                self.gpu_devices.add(t.device)
            self.storages[storage._cdata] = host
            self.buffers.append((key, host))
        out = torch.empty(0, dtype=t.dtype).set_(
            host.untyped_storage(), t.storage_offset(), t.size(), t.stride())
        if type(t) is nn.Parameter:
            out = nn.Parameter(out, requires_grad=t.requires_grad)
        elif t.requires_grad:
            out.requires_grad_(True)
        attributes = getattr(t, "__dict__", None)
        if attributes:
            out.__dict__.update(self.copy(attributes))
        return out

    def ready_events(self) -> list:
        """One CUDA event per device with copies in flight, recorded after them."""
        events = []
        for device in self.gpu_devices:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(device))
            events.append(event)
        return events


def _plain_strided(t: torch.Tensor) -> bool:
    return (t.layout == torch.strided and not t.is_quantized and not t.is_conj()
            and not t.is_neg() and t.device.type != "meta")


def snapshot(payload: Any, pool: dict | None = None) -> tuple[Any, list, list]:
    """A host copy of `payload` (see the module doc), the CUDA events to wait for before
    reading it (none on the CPU) and the host buffers it lives in, as (pool key, buffer)
    pairs. Buffers of the right size are taken from `pool` (those of an earlier snapshot
    no longer read) instead of allocated: new host memory costs page faults, and pinned
    memory a driver call."""
    snap = _Snapshot(pool)
    out = snap.copy(payload)
    return out, snap.ready_events(), snap.buffers


class CheckpointWriter:
    """Writes one checkpoint at a time in a background thread (see the module doc)."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None
        self._what = ""
        self._where = ""
        self._buffers: list = []  # (pool key, host buffer) of the write in flight
        self._pool: dict[tuple[int, bool], list[torch.Tensor]] = {}  # free after a write

    def submit(self, payload: dict, paths: Iterable[Path], then: Callable[[], None] | None = None,
               what: str = "the checkpoint", background: bool = True) -> None:
        """Wait for the previous write (raising its failure), snapshot `payload` now, and
        write it to each of `paths` in order, then call `then`, in the background. With
        `background=False` the same is done at once on this thread, from the payload
        itself (nothing trains meanwhile, so no snapshot is needed), and a failure is
        raised here."""
        self.wait()
        paths = [Path(p) for p in paths]
        self._what = f"{what} ({', '.join(str(p) for p in paths)})"
        self._where = " in the background writer" if background else ""
        if not background:
            self._write(payload, [], paths, then, stream=True)
            self.wait()
            return
        data, events, self._buffers = snapshot(payload, self._pool)
        self._pool = {}  # what the snapshot did not take is freed
        self._thread = threading.Thread(target=self._write, args=(data, events, paths, then),
                                        name="checkpoint-writer")
        self._thread.start()  # not a daemon: the interpreter waits for it at exit

    def _write(self, data: Any, events: list, paths: list[Path],
               then: Callable[[], None] | None, stream: bool = False) -> None:
        """Write `data` to each path, then call `then`; a failure is kept for `wait`.
        `stream`: torch.save straight into each file (on the training thread: overlapping
        serialisation with the disk beats serialising once and writing the bytes twice,
        measured on the CPU); else serialise once into memory and write those bytes."""
        try:
            for event in events:
                event.synchronize()
            if stream:
                for path in paths:
                    atomic_torch_save(data, path)
            else:
                serialised = serialise_checkpoint(data)
                del data
                for path in paths:
                    atomic_write_bytes(path, serialised)
            if then is not None:
                then()
        except BaseException as exc:  # handed to the training thread by wait()/check()
            self._failure = exc

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def settle(self) -> None:
        """Wait for the write in flight, if any; keep its failure for `wait` to raise."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            for key, buffer in self._buffers:  # no longer read: the next snapshot reuses them
                self._pool.setdefault(key, []).append(buffer)
            self._buffers = []

    def check(self) -> None:
        """Raise the failure of a write that has already ended; never waits."""
        if not self.busy:
            self.wait()

    def wait(self) -> None:
        """Wait for the write in flight; raise CheckpointWriteError if it failed."""
        self.settle()
        failure, self._failure = self._failure, None
        if failure is not None:
            raise CheckpointWriteError(
                f"writing {self._what} failed{self._where}: "
                f"{type(failure).__name__}: {failure}; the files it did not replace keep "
                "their previous contents. Fix the cause (e.g. free disk space), then run "
                "the same command again to resume from the last checkpoint on disk"
            ) from failure
