"""Checkpoints written in the background (bench/checkpoint_io.py): the files are the bytes
a synchronous `torch.save` of the payload writes, taken when the write was asked for (not
when the thread got to it); one write at a time; a failed write surfaces as one clear
error; history.jsonl never names an epoch whose last.pt is not on disk; a crash leaves a
loadable last.pt of the last completed epoch."""

from __future__ import annotations

import io
import threading
import time
from collections import OrderedDict

import pytest
import torch
from conftest import with_train
from invariants import PROBE_CARD, train

import bench.checkpoint_io as checkpoint_io
import bench.engine as engine
from bench.checkpoint_io import CheckpointWriter, snapshot
from bench.config import DefenseSpec, RunSpec
from bench.engine import Trainer
from bench.errors import DefenseError
from bench.records import CheckpointWriteError, load_checkpoint, read_history
from defenses.base import Defense


@pytest.fixture(autouse=True)
def background_on_the_cpu(monkeypatch):
    """The engine writes in the background on CUDA only; these tests exercise that path."""
    monkeypatch.setattr(Trainer, "background_checkpoints_on", ("cuda", "cpu"))


def sync_bytes(payload) -> bytes:
    """What the synchronous engine wrote: torch.save of the payload into a file handle."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


def engine_payload(tmp_path, suite, splits) -> tuple[Trainer, dict]:
    """A real payload: the smoke model after two AWP-AT steps (momentum buffers set), with
    extras that torch.save stores specially (a view, a shared storage, a repeated list)."""
    spec = RunSpec(suite.name, "at", (DefenseSpec("awp"),), 0)
    trainer = Trainer(spec, suite, splits, tmp_path, device=torch.device("cpu"),
                      progress=False)
    state = trainer.build()
    for _, (x, y, index) in zip(range(2), trainer.loader):
        trainer.train_step(state, x, y, index)
        state.step += 1
    history = [{"epoch": 1, "val_robust": 0.25, "seconds": 1.5}]
    payload = trainer._payload(state, history, {"epoch": 1, "val_robust": 0.25}, 1.5)
    big = torch.arange(24.0).reshape(4, 6)
    shared = [1, 2, "three"]
    payload["extras"] = {"big": big, "rows": big[1:3], "column": big[:, 2],
                         "list": shared, "again": shared,
                         "od": OrderedDict(a=torch.ones(3).to(torch.bfloat16))}
    return trainer, payload


def test_background_files_are_the_synchronous_bytes_as_of_the_request(
        tmp_path, smoke_suite, smoke_splits, monkeypatch):
    trainer, payload = engine_payload(tmp_path / "run", smoke_suite, smoke_splits)
    expected = sync_bytes(payload)
    gate = threading.Event()
    original = checkpoint_io.serialise_checkpoint

    def serialise_late(data):  # the thread serialises only after the live state moved on
        assert gate.wait(10)
        return original(data)

    monkeypatch.setattr(checkpoint_io, "serialise_checkpoint", serialise_late)
    writer = CheckpointWriter()
    paths = [tmp_path / "best.pt", tmp_path / "last.pt"]
    writer.submit(payload, paths, what="the test checkpoint")
    with torch.no_grad():  # the next training step changes everything in place
        for p in trainer.model.parameters():
            p.add_(1.0)
        for buf in trainer.optimizer.state.values():
            buf["momentum_buffer"].mul_(-3.0)
        payload["extras"]["big"].zero_()
    payload["extras"]["list"].append("four")
    gate.set()
    writer.wait()
    for path in paths:
        assert path.read_bytes() == expected, path
    # the next write reuses the host buffers of this one, and still writes its own bytes
    assert writer._buffers == [] and writer._pool  # returned to the pool once written
    pooled = {id(b) for buffers in writer._pool.values() for b in buffers}
    expected_next = sync_bytes(payload)
    writer.submit(payload, [tmp_path / "next.pt"])
    assert {id(buffer) for _, buffer in writer._buffers} <= pooled
    writer.wait()
    assert (tmp_path / "next.pt").read_bytes() == expected_next != expected
    loaded = load_checkpoint(paths[1])
    assert loaded["extras"]["rows"].untyped_storage().data_ptr() == \
        loaded["extras"]["big"].untyped_storage().data_ptr()  # still one storage
    assert loaded["extras"]["list"] == [1, 2, "three"]


def test_snapshot_keeps_strides_views_and_identities():
    base = torch.randn(2, 3, 4, 4).to(memory_format=torch.channels_last)
    view = base[1]
    lst = [base]
    data = {"a": base, "v": view, "l1": lst, "l2": lst,
            "p": torch.nn.Parameter(torch.ones(2))}
    copy, events, buffers = snapshot(data)
    assert events == [] and len(buffers) == 2  # nothing in flight on the CPU; 2 storages
    assert copy["a"].stride() == base.stride() and torch.equal(copy["a"], base)
    assert copy["v"].storage_offset() == view.storage_offset() and torch.equal(copy["v"], view)
    assert copy["a"].untyped_storage().data_ptr() == copy["v"].untyped_storage().data_ptr()
    assert copy["a"].untyped_storage().data_ptr() != base.untyped_storage().data_ptr()
    assert copy["l1"] is copy["l2"] and copy["l1"] is not lst
    assert isinstance(copy["p"], torch.nn.Parameter) and copy["p"].requires_grad


def test_the_next_write_waits_for_the_one_in_flight(tmp_path, monkeypatch):
    original = checkpoint_io.atomic_write_bytes
    spans = []

    def first_is_slow(path, data):
        epoch = torch.load(io.BytesIO(data), weights_only=True)["epoch"]
        start = time.perf_counter()
        if epoch == 1:
            time.sleep(0.5)
        original(path, data)
        spans.append((epoch, start, time.perf_counter()))

    monkeypatch.setattr(checkpoint_io, "atomic_write_bytes", first_is_slow)
    writer = CheckpointWriter()
    writer.submit({"epoch": 1}, [tmp_path / "last.pt"])
    writer.submit({"epoch": 2}, [tmp_path / "last.pt"])
    writer.wait()
    for thread in threading.enumerate():  # any other writer thread, were there one
        if thread.name == "checkpoint-writer":
            thread.join()
    (first, _, first_end), (second, second_start, _) = spans
    assert (first, second) == (1, 2) and second_start >= first_end  # one after the other
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 2  # not overwritten by epoch 1


def _failing_second_write(monkeypatch):
    original = checkpoint_io.atomic_write_bytes
    writes = []

    def write(path, data):
        writes.append(path.name)
        if len([w for w in writes if w == "last.pt"]) == 2 and path.name == "last.pt":
            raise OSError(28, "No space left on device")
        original(path, data)

    monkeypatch.setattr(checkpoint_io, "atomic_write_bytes", write)


def test_a_failed_background_write_stops_training_with_one_clear_error(
        tmp_path, smoke_suite, smoke_splits, monkeypatch):
    _failing_second_write(monkeypatch)
    suite = with_train(smoke_suite, epochs=3)
    with pytest.raises(CheckpointWriteError, match=r"writing the checkpoint after epoch 2 "
                       r"\(.*last\.pt\) failed in the background writer: OSError: .*No space "
                       r"left on device.*resume from the last checkpoint on disk"):
        train(tmp_path, suite, smoke_splits)
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 1  # the previous one, intact
    assert len(read_history(tmp_path / "history.jsonl")) == 1
    assert not list(tmp_path.glob(".*.tmp"))  # no half-written file left behind
    # and the run resumes from it
    monkeypatch.undo()
    train(tmp_path, suite, smoke_splits)
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 3


class FailsInEpoch2(Defense):
    name = "fails_in_epoch_2"
    card = PROBE_CARD

    def after_step(self, state):
        if state.epoch == 1:
            raise RuntimeError("boom")


def test_a_crash_waits_for_the_write_in_flight_and_names_it(tmp_path, smoke_suite,
                                                            smoke_splits, monkeypatch):
    original = checkpoint_io.atomic_write_bytes

    def slow_write(path, data):  # still writing epoch 1 when epoch 2 crashes
        time.sleep(0.4)
        original(path, data)

    monkeypatch.setattr(checkpoint_io, "atomic_write_bytes", slow_write)
    with pytest.raises(DefenseError, match=r"boom.*kept: the checkpoint after epoch 1"):
        train(tmp_path, with_train(smoke_suite, epochs=3), smoke_splits,
              instances=[FailsInEpoch2()])
    ckpt = load_checkpoint(tmp_path / "last.pt")
    assert ckpt["epoch"] == 1 and ckpt["history"][0]["epoch"] == 1
    assert [r["epoch"] for r in read_history(tmp_path / "history.jsonl")] == [1]


def test_history_never_names_an_epoch_whose_last_checkpoint_is_not_on_disk(
        tmp_path, smoke_suite, smoke_splits, monkeypatch):
    original = engine.write_history
    seen = []

    def checked_write_history(path, rows):
        on_disk = load_checkpoint(path.parent / "last.pt")["epoch"]
        seen.append((len(rows), on_disk))
        original(path, rows)

    monkeypatch.setattr(engine, "write_history", checked_write_history)
    train(tmp_path, with_train(smoke_suite, epochs=3), smoke_splits)
    assert seen == [(1, 1), (2, 2), (3, 3)]
    best = load_checkpoint(tmp_path / "best.pt")
    assert best["best"]["epoch"] == best["epoch"]  # best.pt: the same payload as last.pt was


def test_a_crash_during_a_failing_write_keeps_its_error_and_notes_the_write(
        tmp_path, smoke_suite, smoke_splits, monkeypatch):
    def slow_failing_write(path, data):  # epoch 1's write is in flight and will fail
        time.sleep(0.4)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint_io, "atomic_write_bytes", slow_failing_write)
    with pytest.raises(DefenseError, match=r"boom.*nothing of this run was kept") as caught:
        train(tmp_path, with_train(smoke_suite, epochs=3), smoke_splits,
              instances=[FailsInEpoch2()])
    (note,) = caught.value.__notes__
    assert "writing the checkpoint after epoch 1" in note and "No space left" in note
    assert not (tmp_path / "last.pt").exists() and not (tmp_path / "history.jsonl").exists()


class LooksForLastEpoch(Defense):
    name = "looks_for_last_epoch"
    card = PROBE_CARD
    seen: list = []

    def on_epoch_start(self, state):
        path = state_dir[0] / "last.pt"
        self.seen.append(load_checkpoint(path)["epoch"] if path.exists() else 0)


state_dir: list = []


def test_on_the_cpu_each_checkpoint_is_on_disk_before_the_next_epoch(
        tmp_path, smoke_suite, smoke_splits, monkeypatch):
    """A process killed at any point of epoch k + 1 resumes from epoch k (no write overlaps
    training on the CPU)."""
    monkeypatch.setattr(Trainer, "background_checkpoints_on", ("cuda",))
    original = checkpoint_io.atomic_torch_save

    def slow_write(data, path):  # a background write would still be in flight
        time.sleep(0.3)
        original(data, path)

    monkeypatch.setattr(checkpoint_io, "atomic_torch_save", slow_write)
    state_dir[:] = [tmp_path]
    LooksForLastEpoch.seen = []
    train(tmp_path, with_train(smoke_suite, epochs=3), smoke_splits,
          instances=[LooksForLastEpoch()])
    assert LooksForLastEpoch.seen == [0, 1, 2]


def test_a_failed_write_on_the_cpu_stops_training_at_once(tmp_path, smoke_suite, smoke_splits,
                                                          monkeypatch):
    monkeypatch.setattr(Trainer, "background_checkpoints_on", ("cuda",))
    original = checkpoint_io.atomic_torch_save
    writes = []

    def write(data, path):  # the second last.pt fails
        writes.append(path.name)
        if writes.count("last.pt") == 2 and path.name == "last.pt":
            raise OSError(28, "No space left on device")
        original(data, path)

    monkeypatch.setattr(checkpoint_io, "atomic_torch_save", write)
    with pytest.raises(CheckpointWriteError, match=r"writing the checkpoint after epoch 2 "
                       r"\(.*last\.pt\) failed: OSError: .*No space left on device"):
        train(tmp_path, with_train(smoke_suite, epochs=3), smoke_splits)
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 1
    assert len(read_history(tmp_path / "history.jsonl")) == 1
