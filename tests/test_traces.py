"""The trace sink on its own: rotation by size, a full disk (the kernel's /dev/full answers every
write with ENOSPC) logged once and recovered from, a writer that falls behind dropping records
instead of blocking the caller."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import IO

import pytest

from tts_server.traces import VERSION, TraceOutcome, TraceSink, read_traces


def _record(i: int) -> dict[str, object]:
    return {"version": VERSION, "id": f"r{i}", "pad": "x" * 150}


def test_records_rotate_by_size_and_load_back_in_order(tmp_path: Path) -> None:
    fates: list[TraceOutcome] = []
    sink = TraceSink(tmp_path, max_file_bytes=1024, queue_size=100, on_outcome=fates.append)
    for i in range(20):
        sink.submit(_record(i))
    sink.close()
    files = sorted(tmp_path.glob("traces-*.jsonl"))
    assert len(files) >= 3
    assert all(f.stat().st_size <= 1024 for f in files)
    assert [r["id"] for r in read_traces([tmp_path])] == [f"r{i}" for i in range(20)]
    assert fates == ["written"] * 20


def test_a_full_disk_is_logged_once_and_writing_resumes_when_it_can(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    full = True

    def opener(path: Path) -> IO[bytes]:
        return open("/dev/full", "wb") if full else path.open("xb")

    fates: list[TraceOutcome] = []
    caplog.set_level(logging.INFO, logger="tts_server.traces")
    sink = TraceSink(
        tmp_path, max_file_bytes=1 << 20, queue_size=100, opener=opener, on_outcome=fates.append
    )
    for i in range(5):
        sink.submit(_record(i))
    sink.flush()
    assert fates == ["failed"] * 5
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "No space left on device" in warnings[0].getMessage()
    assert "r0" not in caplog.text  # where and why, never the record
    full = False
    sink.submit(_record(5))
    sink.close()
    assert fates[-1] == "written"
    assert [r["id"] for r in read_traces([tmp_path])] == ["r5"]
    assert "writing to" in caplog.records[-1].getMessage()


def test_a_writer_that_falls_behind_drops_records_without_blocking(tmp_path: Path) -> None:
    release = threading.Event()

    def slow_opener(path: Path) -> IO[bytes]:
        release.wait(5)
        return path.open("xb")

    fates: list[TraceOutcome] = []
    sink = TraceSink(
        tmp_path, max_file_bytes=1 << 20, queue_size=2, opener=slow_opener, on_outcome=fates.append
    )
    started = time.perf_counter()
    for i in range(10):
        sink.submit(_record(i))
    elapsed = time.perf_counter() - started
    release.set()
    sink.close()
    assert elapsed < 1.0  # never waited on the stuck writer
    assert fates.count("dropped") >= 7
    assert fates.count("written") == len(list(read_traces([tmp_path]))) >= 1


def test_a_line_cut_short_is_skipped_on_reading(tmp_path: Path) -> None:
    (tmp_path / "traces-a.jsonl").write_text(
        '{"version": 1, "id": "a"}\n{"version": 1, "id": "b", "cand\n{"version": 99, "id": "c"}\n'
    )
    assert [r["id"] for r in read_traces([tmp_path])] == ["a"]
