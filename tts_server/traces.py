"""Search traces: one JSON record per answered request (every candidate, its steps and step
scores, its answer, which one was selected and by which votes, what it cost), written as JSON
lines off the response path, for `tts-server export` to turn into training sets.

Off unless the operator sets a folder (`TTS_TRACE_DIR`). The client's prompt goes in only when
the operator says so (`TTS_TRACE_PROMPTS`); an API key never does (the engine never sees one).
A record is handed to a bounded queue that one writer thread drains: a slow, full or
unwritable disk drops records (logged once per failure spell, counted) and never delays or fails
a request."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, Literal

from tts_server.engine import Outcome
from tts_server.prompting import RenderedPrompt
from tts_server.search_trace import TraceLimits, search_trace
from tts_server.types import ChatPrompt

logger = logging.getLogger("tts_server.traces")

VERSION = 1
TraceOutcome = Literal["written", "dropped", "failed"]
Opener = Callable[[Path], IO[bytes]]


def trace_record(
    outcome: Outcome,
    rendered: RenderedPrompt,
    *,
    request_id: str,
    endpoint: str,
    model: str,
    include_prompt: bool,
    max_nodes: int,
) -> dict[str, Any]:
    """The record of one answered request: who asked and, with `include_prompt`, the prompt
    text (the client's messages or prompt, the question the PRM read, the rendered prompt's
    token ids), then the search trace, the same builder and shape as a response's `tts.trace`
    (tts_server/search_trace.py) with whole texts (an export trains on them)."""
    record: dict[str, Any] = {
        "version": VERSION,
        "id": request_id,
        "created": int(time.time()),
        "endpoint": endpoint,
        "model": model,
        "prompt_included": include_prompt,
    }
    if include_prompt:
        job = outcome.job
        if isinstance(job.prompt, ChatPrompt):
            record["messages"] = [dict(m) for m in job.prompt.messages]
        else:
            record["prompt"] = job.prompt.text
        record["question"] = rendered.question
        record["prompt_token_ids"] = list(rendered.prompt_ids)
    record.update(search_trace(outcome, TraceLimits(max_nodes=max_nodes, max_text_chars=None)))
    return record


def _open_new(path: Path) -> IO[bytes]:
    return path.open("xb")


class TraceSink:
    """Appends records to `directory/traces-<time>-<pid>-<n>.jsonl`, a new file once one reaches
    `max_file_bytes`, from one daemon thread. `opener` opens a new file (tests pass one that
    fails like a full disk); `on_outcome` counts each record's fate."""

    _STOP = object()

    def __init__(
        self,
        directory: Path,
        *,
        max_file_bytes: int,
        queue_size: int,
        opener: Opener = _open_new,
        on_outcome: Callable[[TraceOutcome], None] | None = None,
    ) -> None:
        self.directory = directory
        self.max_file_bytes = max_file_bytes
        self._opener = opener
        self._on_outcome = on_outcome or (lambda _: None)
        self._queue: queue.Queue[object] = queue.Queue(maxsize=queue_size)
        self._file: IO[bytes] | None = None
        self._size = 0
        self._files = 0
        self._failing = False  # a failure was logged; quiet until a record is written again
        self._dropping = False
        self._thread = threading.Thread(target=self._run, name="trace-writer", daemon=True)
        self._thread.start()

    def submit(self, record: dict[str, Any]) -> None:
        """Queue a record; never blocks (a full queue drops it)."""
        try:
            self._queue.put_nowait(record)
            self._dropping = False
        except queue.Full:
            if not self._dropping:
                logger.warning("trace export: the writer is behind; dropping records")
                self._dropping = True
            self._on_outcome("dropped")

    def close(self, timeout_s: float = 5.0) -> None:
        """Write what is queued (up to `timeout_s`), then stop the thread and close the file."""
        try:
            self._queue.put(self._STOP, timeout=timeout_s)
        except queue.Full:
            return  # the daemon thread dies with the process
        self._thread.join(timeout_s)

    def flush(self, timeout_s: float = 5.0) -> None:
        """Wait until every record queued so far is handled (tests and shutdown)."""
        deadline = time.monotonic() + timeout_s
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is self._STOP:
                    self._close_file()
                    return
                assert isinstance(item, dict)
                self._on_outcome("written" if self._write(item) else "failed")
            finally:
                self._queue.task_done()

    def _write(self, record: dict[str, Any]) -> bool:
        line = (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
        try:
            if self._file is None or (
                self._size > 0 and self._size + len(line) > self.max_file_bytes
            ):
                self._rotate()
            assert self._file is not None
            self._file.write(line)
            self._file.flush()
            self._size += len(line)
        except OSError as exc:
            # Not the record: only where and why (its text could hold a prompt).
            if not self._failing:
                logger.warning(
                    "trace export: cannot write to %s (%s); records are dropped until it works",
                    self.directory,
                    exc.strerror or type(exc).__name__,
                )
                self._failing = True
            self._close_file()  # the next record starts a new file
            return False
        if self._failing:
            logger.info("trace export: writing to %s again", self.directory)
            self._failing = False
        return True

    def _rotate(self) -> None:
        self._close_file()
        self.directory.mkdir(parents=True, exist_ok=True)
        self._files += 1
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        name = f"traces-{stamp}-{os.getpid()}-{self._files}.jsonl"
        self._file = self._opener(self.directory / name)
        self._size = 0

    def _close_file(self) -> None:
        if self._file is not None:
            # A full disk may fail the close's flush too: the record is already lost.
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None


def trace_files(paths: list[Path]) -> list[Path]:
    """The trace files among `paths`: a folder's *.jsonl files (sorted), or files as given."""
    found: list[Path] = []
    for path in paths:
        found.extend(sorted(path.glob("*.jsonl")) if path.is_dir() else [path])
    return found


def read_traces(paths: list[Path]) -> Iterator[dict[str, Any]]:
    """Every record in the trace files; a line cut short by a full disk is skipped."""
    for path in trace_files(paths):
        with path.open(encoding="utf-8") as lines:
            for line in lines:
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict) and record.get("version") == VERSION:
                    yield record
