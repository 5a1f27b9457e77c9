"""The compute-thread setting and the pipeline stage that runs an iterator ahead in a thread."""

from __future__ import annotations

import sys
import threading
import time

import pytest
import torch

from geoswc.core import threads
from geoswc.core.config import RunConfig
from geoswc.core.errors import SettingError
from geoswc.core.stage_clock import StageClock


def test_ahead_keeps_order_and_overlaps_the_producer():
    seen_threads = set()

    def produce():
        for i in range(20):
            seen_threads.add(threading.current_thread().name)
            time.sleep(0.002)
            yield i

    assert list(threads.ahead(produce(), depth=3, name="t-ahead")) == list(range(20))
    assert seen_threads == {"t-ahead"}


def test_ahead_raises_the_producers_error_after_its_items():
    def produce():
        yield 1
        yield 2
        raise ValueError("bad shard")

    got = []
    with pytest.raises(ValueError, match="bad shard"):
        for x in threads.ahead(produce()):
            got.append(x)
    assert got == [1, 2]


def test_closing_ahead_early_stops_and_closes_the_producer():
    closed = threading.Event()

    def produce():
        try:
            yield from range(10**6)
        finally:
            closed.set()

    it = threads.ahead(produce(), depth=2)
    assert next(it) == 0
    it.close()
    assert closed.wait(5), "the producer was not closed"
    assert not any(t.name == "geoswc-ahead" and t.is_alive() for t in threading.enumerate())


def test_set_threads_sets_torch_and_a_loaded_faiss(monkeypatch):
    before = torch.get_num_threads()
    calls = []

    class FakeFaiss:
        @staticmethod
        def omp_set_num_threads(n):
            calls.append(n)

    monkeypatch.setitem(sys.modules, "faiss", FakeFaiss)
    try:
        assert threads.set_threads(1) == 1 and torch.get_num_threads() == 1 and calls == [1]
        assert threads.threads_set() == 1
    finally:
        torch.set_num_threads(before)


def test_auto_threads_leaves_the_decoding_workers_their_cores(monkeypatch):
    monkeypatch.setattr(threads, "usable_cores", lambda: 16)
    assert threads.auto_threads(0) == 16 and threads.auto_threads(4) == 12 and threads.auto_threads(99) == 1
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    assert threads.auto_threads(0) == 1


def test_auto_threads_shares_the_cores_among_torchruns_processes(monkeypatch):
    monkeypatch.setattr(threads, "usable_cores", lambda: 64)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert threads.auto_threads(0) == 8 and threads.auto_threads(4) == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "junk")
    assert threads.auto_threads(0) == 64


@pytest.mark.parametrize("bad", [-1, 10**6, 1.5, "2"])
def test_run_threads_out_of_range_is_a_setting_error(bad):
    with pytest.raises((SettingError, TypeError)):
        RunConfig(threads=bad)


def test_stage_clock_sums_stages_across_threads():
    clock = StageClock()

    def work():
        with clock.stage("x"):
            time.sleep(0.01)

    ts = [threading.Thread(target=work) for _ in range(3)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert clock.calls["x"] == 3 and clock.seconds["x"] >= 0.03
    assert list(clock.timed("y", iter([1, 2]))) == [1, 2] and clock.calls["y"] == 3  # two items and the end


def test_set_threads_is_exported_without_loading_torch_at_import():
    import subprocess

    code = "import sys, geoswc; assert 'torch' not in sys.modules; assert geoswc.set_threads(2) == 2"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.slow
def test_a_command_sets_the_threads_it_is_given(tmp_path):
    """``--run.threads`` reaches torch (and through it onnxruntime) in the command's process."""
    from geoswc import workflow
    from geoswc.options import Photos

    from .conftest import KAUAI

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        summary = workflow.locate(Photos(files=[KAUAI]), output=tmp_path / "out.jsonl", run=RunConfig(threads=1))
        assert torch.get_num_threads() == 1 and threads.threads_set() == 1
        assert summary.located == 1
    finally:
        torch.set_num_threads(before)


def test_pipeline_threads_compute_with_the_process_setting():
    """OpenMP keeps its thread count per thread (what BLAS and FAISS read): a stage started by ahead() computes
    with the count set_threads gave, not OpenMP's default of one thread per core."""
    import ctypes

    omp_max_threads = ctypes.CDLL(None).omp_get_max_threads  # torch's libgomp, loaded with torch
    before = torch.get_num_threads()
    seen = []

    def stage():
        seen.append(omp_max_threads())
        yield 1

    try:
        threads.set_threads(1)
        assert list(threads.ahead(stage())) == [1] and seen == [1]
    finally:
        torch.set_num_threads(before)


def test_faiss_loaded_after_the_setting_takes_it():
    """FAISS has its own OpenMP runtime: loaded after set_threads (as a command loads it, with the gallery), it
    still computes with the count set."""
    import subprocess

    code = (
        "import sys; from geoswc.core.threads import set_threads; set_threads(1); assert 'faiss' not in sys.modules;"
        "from geoswc.gallery.codes import train_codebook, check_codes; import geoswc.gallery.codes as c;"
        "f = c._faiss(); assert f.omp_get_max_threads() == 1, f.omp_get_max_threads()"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_auto_threads_gives_work_without_a_pipeline_every_core(monkeypatch):
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    assert threads.auto_threads(0, pipelined=False) == 2 and threads.auto_threads(0) == 1
    assert threads.auto_threads(1, pipelined=False) == 1


@pytest.mark.parametrize("count", [1, 3])
def test_each_does_every_item_once_with_one_blas_thread_a_worker(monkeypatch, count):
    import threadpoolctl

    def blas_threads():  # BLAS pools of their own (an OpenMP-threaded one follows the thread's OpenMP count)
        info = threadpoolctl.threadpool_info()
        return [d["num_threads"] for d in info if d["user_api"] == "blas" and d.get("threading_layer") != "openmp"]

    monkeypatch.setitem(threads._state, "count", count)
    done, seen, where = [], set(), set()
    lock = threading.Lock()

    def work(i):
        with lock:
            done.append(i)
            seen.update(blas_threads())
            where.add(threading.current_thread().name)
        time.sleep(0.01)  # the items overlap: each worker takes some

    before = blas_threads()
    threads.each(work, range(10))
    assert sorted(done) == list(range(10))
    if count > 1:
        assert seen <= {1} and len(where) > 1 and threading.current_thread().name not in where
    else:
        assert where == {threading.current_thread().name}  # one thread: the caller's own
    assert blas_threads() == before  # restored after


def test_each_raises_a_workers_error(monkeypatch):
    monkeypatch.setitem(threads._state, "count", 2)

    def work(i):
        if i == 3:
            raise ValueError("item 3")

    with pytest.raises(ValueError, match="item 3"):
        threads.each(work, range(6))
