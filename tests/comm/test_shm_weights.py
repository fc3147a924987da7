"""Same-node weight transport through a shared-memory file (comm/shm_weights.py): exact round
trips, file reuse and re-layout, the version and state checks, tee, and a reader in another process."""

import multiprocessing as mp
import os
import pickle
import threading

import pytest
import torch

from comm.shm_weights import (ALIGN_BYTES, NothingWrittenError, SharedMemoryWeightReader,
                                 SharedMemoryWeightWriter, SharedWeightsError, VersionMismatchError)


def odd_weights(seed: int = 0, rows: int = 7):
    """Tensors of several dtypes and awkward shapes, some non-contiguous, as a parameter walk yields them."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(rows, 13, generator=g)
    return {
        "embed.weight": torch.randn(rows, 5, 3, generator=g),
        "norm.weight": torch.randn(13, generator=g).to(torch.bfloat16),
        "proj.weight.T": base.t(),  # non-contiguous transpose
        "strided": torch.randn(9, 11, generator=g)[::2, 1::3],  # non-contiguous slice
        "bf16.T": torch.randn(3, rows, generator=g).to(torch.bfloat16).t(),
        "steps": torch.randint(-2**40, 2**40, (3, 1, 2), generator=g, dtype=torch.int64),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        "odd_bytes": torch.arange(5, dtype=torch.uint8),
    }


def metas_of(weights):
    return [(name, tuple(t.shape), str(t.dtype).removeprefix("torch.")) for name, t in weights.items()]


def read_clone(reader, expected_version=None):
    version, it = reader.read(expected_version)
    return version, {name: t.clone() for name, t in it}


def assert_same(got, want):
    assert list(got) == list(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape, name
        assert torch.equal(got[name], t), name


def test_round_trip_is_exact_for_every_dtype_and_layout(tmp_path):
    weights = odd_weights()
    writer, reader = SharedMemoryWeightWriter(tmp_path), SharedMemoryWeightReader(tmp_path)
    stats = writer.write(metas_of(weights), (t for t in weights.values()), version=3)
    assert stats.version == 3 and stats.bytes == sum(t.numel() * t.element_size() for t in weights.values())
    version, got = read_clone(reader, expected_version=3)
    assert version == 3
    assert_same(got, weights)


def test_views_are_aligned_zero_copy_and_read_only(tmp_path):
    weights = odd_weights()
    SharedMemoryWeightWriter(tmp_path).write(metas_of(weights), weights.values(), 1)
    _, it = SharedMemoryWeightReader(tmp_path).read()
    views = dict(it)
    base = views["embed.weight"].untyped_storage().data_ptr()
    for name, v in views.items():
        assert v.untyped_storage().data_ptr() == base, f"{name} is not a view of the one mapping"
        assert (v.data_ptr() - base) % ALIGN_BYTES == 0, name
    data_file = str(next(tmp_path.glob("weights-*.bin")))
    with open("/proc/self/maps") as maps:
        perms = {line.split()[1] for line in maps if line.rstrip().endswith(data_file)}
    assert perms == {"r--s"}, f"the reader maps {data_file} as {perms}, not read-only shared"


def test_file_is_reused_for_an_unchanged_layout_and_replaced_for_a_new_one(tmp_path):
    writer, reader = SharedMemoryWeightWriter(tmp_path), SharedMemoryWeightReader(tmp_path)
    w1 = odd_weights(seed=1)
    writer.write(metas_of(w1), w1.values(), 1)
    first = writer.data_path
    ino, size = os.stat(first).st_ino, os.stat(first).st_size
    _, stale_it = reader.read(1)
    stale = dict(stale_it)["embed.weight"]

    w2 = odd_weights(seed=2)  # same shapes, new values
    writer.write(metas_of(w2), w2.values(), 2)
    assert writer.data_path == first and os.stat(first).st_ino == ino and os.stat(first).st_size == size
    _, got = read_clone(reader, 2)
    assert_same(got, w2)
    assert torch.equal(stale, w2["embed.weight"]), "a kept view shows the newest bytes of its file"

    w3 = odd_weights(seed=3, rows=9)  # shapes change: a new file, the old one removed
    writer.write(metas_of(w3), w3.values(), 3)
    assert writer.data_path != first and not first.exists()
    assert sorted(p.name for p in tmp_path.glob("weights-*.bin")) == [writer.data_path.name]
    assert os.stat(writer.data_path).st_size >= sum(t.numel() * t.element_size() for t in w3.values())
    _, got = read_clone(reader, 3)
    assert_same(got, w3)


def test_version_mismatch_names_both_versions(tmp_path):
    weights = odd_weights()
    SharedMemoryWeightWriter(tmp_path).write(metas_of(weights), weights.values(), 5)
    with pytest.raises(VersionMismatchError, match=r"expected weights version 6.*holds version 5"):
        SharedMemoryWeightReader(tmp_path).read(expected_version=6)


def test_reading_before_any_write_says_nothing_written(tmp_path):
    with pytest.raises(NothingWrittenError, match="nothing written yet"):
        SharedMemoryWeightReader(tmp_path / "never").read()
    SharedMemoryWeightWriter(tmp_path)  # a writer that has not written yet publishes nothing
    with pytest.raises(NothingWrittenError):
        SharedMemoryWeightReader(tmp_path).read()


def test_truncated_file_and_partial_writes_are_refused(tmp_path):
    weights = odd_weights()
    writer, reader = SharedMemoryWeightWriter(tmp_path), SharedMemoryWeightReader(tmp_path)
    writer.write(metas_of(weights), weights.values(), 1)
    good_size = os.stat(writer.data_path).st_size
    os.truncate(writer.data_path, 64)
    with pytest.raises(SharedWeightsError, match="shorter than"):
        reader.read()
    os.truncate(writer.data_path, good_size)

    gen = writer.tee(metas_of(weights), weights.values(), 2)  # same layout: overwritten in place
    next(gen)
    with pytest.raises(SharedWeightsError, match="being written"):
        reader.read()
    with pytest.raises(SharedWeightsError, match="only 1 of"):
        writer.commit()
    wrong = dict(weights, **{"norm.weight": weights["norm.weight"].float()})
    with pytest.raises(SharedWeightsError, match="norm.weight"):
        writer.write(metas_of(weights), wrong.values(), 3)


def test_overwrite_during_a_read_is_detected(tmp_path):
    weights = odd_weights()
    writer, reader = SharedMemoryWeightWriter(tmp_path), SharedMemoryWeightReader(tmp_path)
    writer.write(metas_of(weights), weights.values(), 1)
    _, it = reader.read(1)
    next(it)
    writer.write(metas_of(weights), weights.values(), 2)  # breaks the protocol on purpose
    with pytest.raises(SharedWeightsError, match="overwritten"):
        list(it)


def test_tee_passes_every_tensor_through_and_commit_publishes(tmp_path):
    weights = odd_weights()
    writer, reader = SharedMemoryWeightWriter(tmp_path), SharedMemoryWeightReader(tmp_path)
    gen = writer.tee(metas_of(weights), iter(weights.values()), 4)
    passed = [next(gen) for _ in weights]  # taken as WeightTransport.send takes them: never exhausted
    assert all(p is t for p, t in zip(passed, weights.values()))
    with pytest.raises(NothingWrittenError):
        reader.read()  # nothing published before commit
    assert writer.commit().version == 4
    _, got = read_clone(reader, 4)
    assert_same(got, weights)
    writer.remove()
    assert not tmp_path.exists()


def _read_in_child(folder, version, queue):
    _, got = read_clone(SharedMemoryWeightReader(folder), version)
    queue.put(pickle.dumps(got))  # by value: torch's queue reducers would share fds the exiting child closes


def test_a_reader_in_another_process_sees_what_was_written(tmp_path):
    weights = odd_weights(seed=7)
    SharedMemoryWeightWriter(tmp_path).write(metas_of(weights), weights.values(), 9)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_read_in_child, args=(str(tmp_path), 9, queue))
    child.start()
    got = pickle.loads(queue.get(timeout=60))
    child.join(timeout=30)
    assert child.exitcode == 0
    assert_same(got, weights)


def test_one_walk_feeds_the_gloo_group_and_the_file(tmp_path):
    from comm.transport import WeightTransport, free_port

    weights = {name: t.contiguous() for name, t in odd_weights(seed=5).items()}
    port, received = free_port(), {}

    def receive():
        version, stream = WeightTransport("127.0.0.1", port, 1, 2, timeout_s=30).receive()
        received.update({name: t.clone() for name, t in stream}, version=version)

    receiver = threading.Thread(target=receive)
    receiver.start()
    writer = SharedMemoryWeightWriter(tmp_path)
    sender = WeightTransport("127.0.0.1", port, 0, 2, timeout_s=30)
    sender.send(metas_of(weights), writer.tee(metas_of(weights), weights.values(), 6), 6, bucket_bytes=256)
    writer.commit()
    receiver.join(timeout=30)
    assert received.pop("version") == 6
    assert_same(received, weights)
    assert_same(read_clone(SharedMemoryWeightReader(tmp_path), 6)[1], weights)


def test_folders_of_writers_that_are_gone_are_removed_and_live_ones_kept(tmp_path):
    import subprocess
    import sys

    from comm.shm_weights import OWNER_NAME, SharedMemoryWeightWriter, remove_orphans

    live = SharedMemoryWeightWriter(tmp_path / "realsr-r1-live")  # this process: alive
    live.write([("w", (4,), "float32")], [torch.ones(4)], 1)
    gone = tmp_path / "realsr-r1-gone"
    SharedMemoryWeightWriter(gone).write([("w", (4,), "float32")], [torch.ones(4)], 1)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (gone / OWNER_NAME).write_text(str(dead.pid))  # as if written by a process that has exited
    foreign = tmp_path / "realsr-r1-foreign"
    foreign.mkdir()  # no owner recorded: not ours to judge
    assert remove_orphans(tmp_path) == [gone]
    assert not gone.exists() and (tmp_path / "realsr-r1-live" / "header.json").exists() and foreign.exists()
    live.remove()
    assert not (tmp_path / "realsr-r1-live").exists()
