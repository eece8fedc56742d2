import contextlib
import json
import mmap
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path

import numpy as np
import pytest

from engine import processes
from engine.processes import batches_computed_ahead, computed_ahead


def test_computed_ahead_keeps_the_order():
    assert list(computed_ahead(abs, [-i for i in range(50)], workers=2, ahead=3)) == list(range(50))


def threads(_):
    import librosa  # noqa: F401 - what the engine's jobs load: scipy and its own BLAS
    import sklearn.decomposition  # noqa: F401
    import threadpoolctl
    import torch

    return torch.get_num_threads(), max(p["num_threads"] for p in threadpoolctl.threadpool_info())


def test_pool_workers_compute_on_one_thread_each():
    # one process per core: a worker using every core's threads would fight the others
    assert set(computed_ahead(threads, range(4), workers=2, ahead=2)) == {(1, 1)}


def test_computed_ahead_cancels_what_nobody_collects(tmp_path):
    """Stopped after one result, the pool runs the items already started or queued to its
    workers, and none of the rest that were submitted ahead."""
    commands = [["sh", "-c", f"touch {tmp_path}/{i}; sleep 0.3"] for i in range(12)]
    results = computed_ahead(subprocess.call, commands, workers=2, ahead=11)
    assert next(results) == 0  # 11 submitted by now
    results.close()
    time.sleep(2)  # what was started has finished
    assert 1 < len(list(tmp_path.iterdir())) < 8


def numbered(i):
    # Every tenth item is slow: the items after it that are in flight finish first, and one
    # given the slow one's slot too early would have its result overwritten.
    time.sleep(0.1 if i % 10 == 5 else 0)
    return np.full((3, 4), i, np.float32)


class RecordedSharedMemory(SharedMemory):
    """Real shared memory whose blocks' names the test can see."""

    created: list[str] = []

    def __init__(self, name=None, create=False, size=0):
        super().__init__(name, create, size)
        if create:
            self.created.append(self.name)


@pytest.mark.parametrize("shared", [True, False], ids=["shared memory", "pipe"])
def test_batches_computed_ahead_keep_the_order_and_free_their_memory(shared, monkeypatch):
    """50 items through 9 slots: a slot is written again only once its item is copied."""
    monkeypatch.setattr(processes, "SharedMemory", RecordedSharedMemory)
    monkeypatch.setattr(RecordedSharedMemory, "created", [])
    if not shared:  # no shared memory where the engine looks for it: the pool's pipe
        monkeypatch.setattr(processes, "SHARED_MEMORY_DIR", "/nonexistent")
    batches = batches_computed_ahead(numbered, list(range(50)), 2, batch_size=3, shape=(3, 4))
    first = next(batches)
    blocks = RecordedSharedMemory.created
    assert sum(Path("/dev/shm", name).exists() for name in blocks) == int(shared)  # in use
    got = [first, *batches]
    assert [start for start, _ in got] == list(range(0, 50, 3))
    values = np.concatenate([batch for _, batch in got])
    assert values.shape == (50, 3, 4) and (values == np.arange(50)[:, None, None]).all()
    assert not any(Path("/dev/shm", name).exists() for name in blocks)  # unlinked


def test_batches_computed_ahead_stopped_early_free_their_memory_and_the_pool_goes_on(
    monkeypatch,
):
    monkeypatch.setattr(processes, "SharedMemory", RecordedSharedMemory)
    monkeypatch.setattr(RecordedSharedMemory, "created", [])
    batches = batches_computed_ahead(numbered, list(range(40)), 2, batch_size=4, shape=(3, 4))
    start, batch = next(batches)
    batches.close()
    (name,) = RecordedSharedMemory.created
    assert not Path("/dev/shm", name).exists()
    again = list(batches_computed_ahead(numbered, [7, 8], 2, batch_size=4, shape=(3, 4)))
    assert start == 0 and (batch[:, 0, 0] == [0, 1, 2, 3]).all()
    assert len(again) == 1 and (again[0][1][:, 0, 0] == [7, 8]).all()


def filled(i):
    return np.full(100_000, i, np.float32)


TOO_SMALL = """
import numpy as np
from engine.processes import batches_computed_ahead
from tests.engine.test_processes import filled
got = list(batches_computed_ahead(filled, list(range(8)), 2, batch_size=2, shape=(100_000,)))
values = np.concatenate([batch for _, batch in got])
assert (values == np.arange(8)[:, None]).all(), values[:, 0]
print("ok")
"""


@pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("unshare"), reason="mounts a small /dev/shm: root"
)
def test_a_dev_shm_too_small_for_the_slots_leaves_the_results_to_the_pipe():
    """A 1 MB /dev/shm (a container's is 64 MB) for 2.4 MB of slots: written into pages that
    cannot be had, a worker would die of SIGBUS."""
    small = f"mount -t tmpfs -o size=1m tmpfs /dev/shm && exec {sys.executable} -c '{TOO_SMALL}'"
    done = subprocess.run(
        ["unshare", "--mount", "sh", "-c", small], capture_output=True, text=True, timeout=120
    )
    if "mount:" in done.stderr:
        pytest.skip(f"cannot mount here: {done.stderr.strip()}")
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def mapped_by_any_process(name: str) -> bool:
    for maps in Path("/proc").glob("[0-9]*/maps"):
        with contextlib.suppress(OSError):
            if name in maps.read_text():
                return True
    return False


def test_no_worker_keeps_a_finished_calls_shared_memory(monkeypatch):
    """Unlinked but still mapped, a block would hold its pages (134 MB at batch 32) until
    each worker's next call, and leave that call no room for its own."""
    monkeypatch.setattr(processes, "SharedMemory", RecordedSharedMemory)
    monkeypatch.setattr(RecordedSharedMemory, "created", [])
    list(batches_computed_ahead(numbered, list(range(12)), 2, batch_size=2, shape=(3, 4)))
    (name,) = RecordedSharedMemory.created
    assert not Path("/dev/shm", name).exists() and not mapped_by_any_process(name)


KILLED_OWNER = """
import json, os, time
from engine import processes
from engine.processes import batches_computed_ahead
from tests.engine.test_processes import filled
batches = batches_computed_ahead(filled, list(range(100)), 2, batch_size=2, shape=(100_000,))
next(batches)
(pool,) = processes._shared.values()
maps = open("/proc/self/maps").read().split()
blocks = {os.path.basename(p) for p in maps if p.startswith("/dev/shm/psm_")}
print(json.dumps({"workers": list(pool._processes), "blocks": sorted(blocks)}), flush=True)
time.sleep(600)
"""


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_workers_end_with_a_killed_owner_and_free_its_shared_memory():
    """Killed outright (the OOM killer, say), an owner leaves workers that would wait for
    work forever, holding their memory and its shared memory block."""
    owner = subprocess.Popen(
        [sys.executable, "-c", KILLED_OWNER], stdout=subprocess.PIPE, text=True
    )
    try:
        started = json.loads(owner.stdout.readline())
    finally:
        owner.kill()
        owner.wait()
    assert len(started["workers"]) == 2 and len(started["blocks"]) == 1, started
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        left = [pid for pid in started["workers"] if running(pid)]
        blocks = [name for name in started["blocks"] if Path("/dev/shm", name).exists()]
        if not left and not blocks:
            break
        time.sleep(0.2)
    for pid in left:  # not to leave them to the next test either
        os.kill(pid, signal.SIGKILL)
    assert not left and not blocks, f"still running: {left}, still in /dev/shm: {blocks}"


def failing_at_5(i):
    if i == 5:
        raise RuntimeError("item 5 cannot be read")
    return np.full((3, 4), i, np.float32)


def test_an_items_error_reaches_the_caller_with_nothing_left_pointing_into_freed_memory(
    monkeypatch,
):
    monkeypatch.setattr(processes, "SharedMemory", RecordedSharedMemory)
    monkeypatch.setattr(RecordedSharedMemory, "created", [])
    batches = batches_computed_ahead(failing_at_5, list(range(20)), 2, batch_size=2, shape=(3, 4))
    with pytest.raises(RuntimeError, match="item 5 cannot be read") as error:
        list(batches)
    (name,) = RecordedSharedMemory.created
    assert not Path("/dev/shm", name).exists()
    # The traceback keeps its frames' variables (a debugger, an error report reads them): a
    # view of the block there would read unmapped memory (a segmentation fault).
    for frame, _ in traceback.walk_tb(error.tb):
        for value in frame.f_locals.values():
            assert not views_a_mapping(value), f"{frame.f_code.co_name} holds a view of it"


def views_a_mapping(value) -> bool:
    """Whether an array or memoryview is (a view of) a memory mapping."""
    while isinstance(value, np.ndarray | memoryview):
        value = value.base if isinstance(value, np.ndarray) else value.obj
    return isinstance(value, mmap.mmap)


def test_a_result_of_another_shape_is_an_error_naming_its_item():
    with pytest.raises(ValueError, match=r"the result for 3 has shape \(3, 4\), not \(2, 2\)"):
        list(batches_computed_ahead(numbered, [3, 4], 2, batch_size=2, shape=(2, 2)))
