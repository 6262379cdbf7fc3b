"""Progress reporting: a rich bar (bytes, rate, ETA) on a terminal, silence in a pipe."""
from __future__ import annotations

import contextlib
import os
import sys
import threading
from typing import Protocol


class Reporter(Protocol):
    """What long operations call to report progress; implementations must be thread-safe."""

    def start(self, total: int | None, unit: str = "B", description: str = "") -> None: ...
    def advance(self, amount: int) -> None: ...
    def finish(self) -> None: ...
    def file_started(self, name: str, total: int) -> object: ...
    def file_advance(self, handle: object, amount: int) -> None: ...
    def file_finished(self, handle: object) -> None: ...


class NullReporter:
    """Reports nothing; counts what it was told so callers can read it back."""

    def __init__(self) -> None:
        self.done = 0
        self.total: int | None = None
        self.unit = "B"
        self._lock = threading.Lock()

    def start(self, total: int | None, unit: str = "B", description: str = "") -> None:
        self.total, self.unit, self.done = total, unit, 0

    def advance(self, amount: int) -> None:
        with self._lock:
            self.done += amount

    def finish(self) -> None:
        pass

    def file_started(self, name: str, total: int) -> object:
        return None

    def file_advance(self, handle: object, amount: int) -> None:
        pass

    def file_finished(self, handle: object) -> None:
        pass


class RichReporter(NullReporter):
    """A rich progress bar on stderr with bytes, rate and ETA."""

    def __init__(self) -> None:
        super().__init__()
        self._progress = None
        self._task = None

    def start(self, total: int | None, unit: str = "B", description: str = "") -> None:
        from rich.console import Console
        from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeRemainingColumn)

        super().start(total, unit, description)
        self.finish()
        # Binary units (KiB, MiB), as every summary line prints sizes; rich's defaults are decimal (kB, MB).
        amount = [DownloadColumn(binary_units=True), _binary_speed_column()] if unit == "B" \
            else [MofNCompleteColumn()]
        self._progress = Progress(TextColumn("{task.description}"), BarColumn(), *amount, TimeRemainingColumn(),
                                  console=Console(stderr=True), transient=False)
        self._progress.start()
        self._task = self._progress.add_task(description or "working", total=total)

    def advance(self, amount: int) -> None:
        super().advance(amount)
        if self._progress is not None:
            self._progress.update(self._task, advance=amount)

    def finish(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def file_started(self, name: str, total: int) -> object:
        """A line of its own for a file in flight (parallel downloads)."""
        if self._progress is None:
            return None
        return self._progress.add_task(f"  {name}", total=total)

    def file_advance(self, handle: object, amount: int) -> None:
        if self._progress is not None and handle is not None:
            self._progress.update(handle, advance=amount)

    def file_finished(self, handle: object) -> None:
        if self._progress is not None and handle is not None:
            self._progress.remove_task(handle)


def _binary_speed_column():
    """rich's TransferSpeedColumn, in KiB/s and MiB/s."""
    from rich import filesize
    from rich.progress import ProgressColumn
    from rich.text import Text

    class BinarySpeedColumn(ProgressColumn):
        def render(self, task) -> Text:
            speed = task.finished_speed or task.speed
            if speed is None:
                return Text("?", style="progress.data.speed")
            unit, suffix = filesize.pick_unit_and_suffix(int(speed), ["B", "KiB", "MiB", "GiB", "TiB"], 1024)
            return Text(f"{speed / unit:.1f} {suffix}/s", style="progress.data.speed")

    return BinarySpeedColumn()


def terminal_reporter() -> NullReporter:
    """A rich bar when stderr is a terminal, otherwise a silent reporter."""
    return RichReporter() if sys.stderr.isatty() else NullReporter()


@contextlib.contextmanager
def engine_output():
    """Keep the engine's chatter off stdout (JSON goes there): stderr on a terminal, nowhere in a pipe."""
    if sys.stderr.isatty():
        with contextlib.redirect_stdout(sys.stderr):
            yield
        return
    # Native code (torch's C++ logging) writes to the file descriptors directly: silence those too.
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    sink = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(sink, 1)
        os.dup2(sink, 2)
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, sink):
            os.close(fd)
