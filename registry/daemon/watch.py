"""Watch folders (daemon.toml `[[watch]]`): register what is copied into a drop folder, and what a Hugging Face
Trainer writes into its output_dir, each folder once and only when it is complete.

A tick looks at the folders (stats only), waits until a folder's files have not changed for `quiet_seconds`,
checks its safetensors headers and indexes, and then queues one import job for it with a Trigger row keyed by
the folder and the fingerprint of its files (relpath, size, mtime_ns): a rescan, a restart after kill -9 or a
second daemon finds the trigger and queues nothing. A folder that is quiet but broken becomes one failed
import job saying why; changing its files (a new fingerprint) lets it be tried again. A watchdog observer wakes
the service on file system events; the periodic rescan catches what inotify misses (network file systems).

A queued import that fails on a full disk pauses the watch (event `watch_paused`): no new imports until the
store's file system has room again, checked every `disk_full_retry`; then `watch_resumed` and the failed
folders are queued again (once each: the retry's trigger names the failed job).
"""
from __future__ import annotations

import logging
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from sqlalchemy import select
from sqlalchemy.orm import Session

from .. import jobs
from ..catalog import check_name, record_event, resolve
from ..config import load_worker_config
from ..db import db_now
from ..errors import BadInput, NotFound
from ..models import Event, Job, Trigger
from . import folders
from .options import ConfigErrors, check_keys, duration, string, string_list
from .service import Service
from .triggers import fire, seen

log = logging.getLogger("registry.daemon")

MODES = ("drop", "training")
WATCH_KEYS = ("path", "mode", "quiet_seconds", "rescan", "base", "name", "tags", "exclude", "link",
              "disk_full_retry")
FINISHED = ("succeeded", "failed", "cancelled")


@dataclass
class WatchConfig:
    """One `[[watch]]` table. `base`: lineage of every import (drop: unless registry.json names one);
    `name`: the training run's name (default: the output_dir's name); `tags`: tags every import gets (moved
    from an earlier artifact, e.g. "run-a:latest"); `exclude`: globs of files not imported (e.g.
    "optimizer.pt"); `link`: hardlink files into the store."""

    path: Path
    mode: str = "drop"
    quiet_seconds: float = 30.0
    rescan: float = 60.0
    base: str | None = None
    name: str | None = None
    tags: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    link: bool = False
    disk_full_retry: float = 300.0


def parse_watches(items: list, problems: list[str]) -> list[WatchConfig]:
    """Each `[[watch]]` table as a WatchConfig; every problem (one line each) is appended to `problems`."""
    watches: list[WatchConfig] = []
    if not isinstance(items, list):
        problems.append(f"watch: expected [[watch]] tables, got {type(items).__name__}")
        return watches
    for i, item in enumerate(items):
        where = f"watch[{i}]"
        table = check_keys(item, WATCH_KEYS, where, problems, required=("path",))
        if not table or "path" not in table:
            continue
        raw = string(table["path"], f"{where}.path", problems)
        if not raw:
            continue
        path = Path(raw).expanduser()
        if not path.is_absolute():
            problems.append(f"{where}.path: {raw!r} must be an absolute path")
        elif not path.is_dir():
            problems.append(f"{where}.path: {raw} is not a folder; create it or fix the path")
        mode = table.get("mode", "drop")
        if mode not in MODES:
            problems.append(f"{where}.mode: {mode!r} must be one of {', '.join(MODES)}")
            mode = "drop"
        config = WatchConfig(path=path.resolve(), mode=mode)
        if "quiet_seconds" in table:
            config.quiet_seconds = duration(table["quiet_seconds"], f"{where}.quiet_seconds", problems)
        if "rescan" in table:
            config.rescan = duration(table["rescan"], f"{where}.rescan", problems)
        if "disk_full_retry" in table:
            config.disk_full_retry = duration(table["disk_full_retry"], f"{where}.disk_full_retry", problems)
        for key in ("base", "name"):
            if key in table:
                value = string(table[key], f"{where}.{key}", problems)
                if value and key == "name":
                    _check(check_name, value, f"{where}.name", problems)
                setattr(config, key, value or None)
        if config.name and mode != "training":
            problems.append(f"{where}.name: names a training run; a drop folder's imports are named after "
                            "their folders (or a registry.json in them)")
        if "tags" in table:
            config.tags = string_list(table["tags"], f"{where}.tags", problems)
            for tag in config.tags:
                _check(lambda t: check_name(t, "tag"), tag, f"{where}.tags", problems)
        if "exclude" in table:
            config.exclude = string_list(table["exclude"], f"{where}.exclude", problems)
        if "link" in table:
            if isinstance(table["link"], bool):
                config.link = table["link"]
            else:
                problems.append(f"{where}.link: {table['link']!r} must be true or false")
        watches.append(config)
    _check_overlaps(watches, problems)
    return watches


def _check(checker: Callable[[str], Any], value: str, where: str, problems: list[str]) -> None:
    try:
        checker(value)
    except BadInput as exc:
        problems.append(f"{where}: {exc}")


def _check_overlaps(watches: list[WatchConfig], problems: list[str]) -> None:
    """A folder watched twice (the same path, or one inside another) would be imported twice."""
    for i, a in enumerate(watches):
        for j, b in enumerate(watches[:i]):
            if overlap(a.path, b.path):
                problems.append(f"watch[{i}].path: {a.path} overlaps watch[{j}].path ({b.path}); "
                                "watch each folder once")


def overlap(a: Path, b: Path) -> bool:
    """The same folder, or one inside the other."""
    return a == b or a.is_relative_to(b) or b.is_relative_to(a)


def watch_services(reg: Any, watches: list[WatchConfig]) -> list[Service]:
    """One service per watch. Workers import only under their `[paths] allowed_roots` (config.toml), so a
    watch outside them is refused here, at start, instead of failing every import it would queue."""
    worker_config = load_worker_config(reg.home)
    problems = []
    for watch in watches:  # the supervisor passes one at a time: the message names the path, not an index
        try:
            worker_config.check_path(watch.path, "watch folder")
        except BadInput as exc:
            problems.append(str(exc))
    if problems:
        raise ConfigErrors(problems, "watch folders")
    return [WatchService(reg, w) for w in watches]


@dataclass
class Candidate:
    """A folder a watch may import: a dropped folder, a checkpoint, or a training run's final model."""

    folder: Path
    role: str  # "drop", "checkpoint" or "final"
    look_exclude: tuple[str, ...]  # what the fingerprint leaves out
    import_exclude: list[str]  # what the import leaves out (registry.json: settings, not model)
    step: int | None = None


@dataclass
class Pending:
    fingerprint: str
    since: float  # monotonic time this fingerprint was first seen
    why: str = "waiting for writes to stop"


@dataclass
class Retry:
    """A folder whose import failed on a full disk: queued again when space is back."""

    job_id: int
    subject: str
    params: dict[str, Any]
    size: int


class WatchService(Service):
    """Looks at one watched folder each tick and queues imports; see the module docstring."""

    def __init__(self, reg: Any, config: WatchConfig, observe: bool = True):
        super().__init__()
        self.reg, self.config, self.observe = reg, config, observe
        self.name = f"watch:{config.path}"
        self.interval = self.rescan = config.rescan
        self.source = "drop" if config.mode == "drop" else "training"
        self.pending: dict[Path, Pending] = {}
        self.done: dict[Path, str] = {}  # folder -> fingerprint already handled (its trigger exists)
        self.outstanding: dict[int, str] = {}  # job id -> trigger subject, for jobs not finished yet
        self.retries: list[Retry] = []
        self.paused_reason: str | None = None
        self.next_space_check = 0.0
        self.events_seen = self.folders_queued = self.failures = self.pauses = 0
        self._restored = False
        self._observer = None
        self._debounce: threading.Timer | None = None
        self._lock = threading.Lock()

    # -- the watchdog observer: events only wake the service; the tick decides --------------------------------

    def start(self) -> None:
        if not self.observe:
            return
        try:
            from watchdog.events import FileSystemEventHandler
            from watchdog.observers import Observer
        except ImportError:  # pragma: no cover - watchdog is a dependency; the rescan still works without it
            log.warning("%s: watchdog is not installed; relying on the rescan every %gs", self.name, self.rescan)
            return
        service = self

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event) -> None:
                # Our own reads (safetensors headers) open files: only writes, moves and deletes matter.
                if event.event_type in ("opened", "closed_no_write"):
                    return
                service.file_event()

        try:
            self._observer = Observer()
            self._observer.schedule(Handler(), str(self.config.path), recursive=True)
            self._observer.daemon = True
            self._observer.start()
        except OSError as exc:  # e.g. the inotify watch limit: say so and rely on the rescan
            log.warning("%s: cannot watch for file events (%s); relying on the rescan every %gs", self.name, exc,
                        self.rescan)
            self._observer = None

    def stop(self) -> None:
        if self._debounce is not None:
            self._debounce.cancel()
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None

    def file_event(self) -> None:
        """Count the event and wake the service soon: a copy writes thousands of events, one tick is enough."""
        with self._lock:
            self.events_seen += 1
            if self._debounce is not None and self._debounce.is_alive():
                return
            self._debounce = threading.Timer(min(1.0, max(0.05, self.config.quiet_seconds / 4)), self.wake)
            self._debounce.daemon = True
            self._debounce.start()

    # -- the tick -----------------------------------------------------------------------------------------------

    def tick(self) -> None:
        if not self._restored:
            self._restore()
            self._restored = True
        self._check_outstanding()
        if self.paused_reason is not None and not self._try_resume():
            self.interval = self.config.disk_full_retry
            return
        now = time.monotonic()
        seen_now = set()
        for candidate in self._candidates():
            seen_now.add(candidate.folder)
            self._consider(candidate, now)
            if self.paused_reason is not None:
                break
        for gone in set(self.pending) - seen_now:  # removed before it was complete
            del self.pending[gone]
        # Tick again when the first waiting folder may have become quiet, not only at the rescan.
        soonest = min((p.since + self.config.quiet_seconds - now for p in self.pending.values()
                       if p.why == "waiting for writes to stop"), default=self.rescan)
        self.interval = max(0.05, min(self.rescan, soonest + 0.05))

    def _candidates(self) -> list[Candidate]:
        root, exclude = self.config.path, tuple(self.config.exclude)
        subfolders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if self.config.mode == "drop":
            return [Candidate(p, "drop", exclude, [*exclude, folders.REGISTRY_JSON]) for p in subfolders]
        found = [Candidate(p, "checkpoint", exclude, list(exclude), step)
                 for p in subfolders if (step := folders.checkpoint_step(p.name)) is not None]
        # The final model: the output_dir's own top-level files (its subfolders are checkpoints and logs).
        return [*found, Candidate(root, "final", (*exclude, "*/"), [*exclude, "*/"])]

    def _consider(self, candidate: Candidate, now: float) -> None:
        folder = candidate.folder
        seen_files = folders.look(folder, candidate.look_exclude)
        if seen_files is None or not seen_files.files:  # changing under us, or nothing in it yet
            self.pending.pop(folder, None)
            return
        fingerprint = seen_files.fingerprint
        if self.done.get(folder) == fingerprint:
            return
        pending = self.pending.get(folder)
        if pending is None or pending.fingerprint != fingerprint:
            if self._handled(f"{folder}|{fingerprint}"):  # after a restart: known at once, no quiet wait
                self.done[folder] = fingerprint
                self.pending.pop(folder, None)
            else:
                self.pending[folder] = Pending(fingerprint, now)
            return
        quiet = self.config.quiet_seconds
        if now - pending.since < quiet or time.time() - seen_files.newest_write < quiet:
            return  # seen unchanged for less than quiet_seconds (by us, and by the files' mtimes)
        if candidate.role == "checkpoint" and folders.TRAINER_STATE not in seen_files.files:
            pending.why = f"waiting for {folders.TRAINER_STATE} (the Trainer writes it last)"
            return
        if candidate.role == "final" and not folders.final_model_files(seen_files):
            pending.why = "no final model yet (config.json and weights in the output folder)"
            return
        params, problem = self._import_params(candidate, seen_files)
        base = params.get("base")
        if problem is None and base is not None and not self._base_known(base):
            pending.why = f"waiting for base {base} to be registered"
            return
        if problem is None:
            problem = folders.first_problem(folders.FolderLook(folder, {
                rel: v for rel, v in seen_files.files.items() if rel != folders.REGISTRY_JSON}))
        self._fire(candidate, f"{folder}|{fingerprint}", params, problem, seen_files.size)
        self.done[folder] = fingerprint
        self.pending.pop(folder, None)

    def _handled(self, subject: str) -> bool:
        with self.reg.read_session() as s:
            return seen(s, self.source, subject) is not None

    def _base_known(self, base: str) -> bool:
        with self.reg.read_session() as s:
            try:
                resolve(s, base)
            except NotFound:
                return False
            except BadInput:  # ambiguous or malformed: let the import say so
                return True
        return True

    def _import_params(self, candidate: Candidate, seen_files: folders.FolderLook) -> tuple[dict, str | None]:
        """The import job's params, and why the folder cannot be imported (None: it can)."""
        config, folder = self.config, candidate.folder
        params: dict[str, Any] = {"folder": str(folder), "name": folder.name, "kind": None, "base": config.base,
                                  "link": config.link, "tags": list(config.tags),
                                  "exclude": candidate.import_exclude or None,
                                  "meta": {"watch": {"path": str(config.path), "mode": config.mode}}}
        try:
            if candidate.role == "drop":
                settings = folders.read_registry_json(folder)
                params.update({k: v for k, v in (("name", settings.name), ("kind", settings.kind),
                                                 ("base", settings.base)) if v is not None})
                params["tags"] = [*params["tags"], *(t for t in settings.tags or () if t not in params["tags"])]
            else:
                run = config.name or config.path.name
                adapter = "adapter_config.json" in {r for r in seen_files.files if "/" not in r}
                if candidate.role == "checkpoint":
                    params["name"] = f"{run}-step-{candidate.step}"
                    params["kind"] = "adapter" if adapter else "checkpoint"
                    state_file = folder / folders.TRAINER_STATE
                else:
                    params["name"] = run
                    state_file = self._final_state_file()
                facts = folders.training_facts(state_file) if state_file is not None else {}
                if candidate.role == "checkpoint":
                    facts["step"] = candidate.step
                params["meta"]["training"] = {"run": run, "output_dir": str(config.path), **facts,
                                              **({"final": True} if candidate.role == "final" else {})}
            check_name(params["name"])
        except BadInput as exc:
            return params, str(exc)
        except OSError as exc:
            return params, f"cannot read {exc.filename or folder}: {exc.strerror or exc}"
        return params, None

    def _final_state_file(self) -> Path | None:
        """The final model's trainer state: in the output_dir (trainer.save_state), else the last checkpoint's."""
        root = self.config.path
        if (root / folders.TRAINER_STATE).is_file():
            return root / folders.TRAINER_STATE
        steps = sorted((s, p) for p in root.iterdir() if (s := folders.checkpoint_step(p.name)) is not None
                       and (p / folders.TRAINER_STATE).is_file())
        return steps[-1][1] / folders.TRAINER_STATE if steps else None

    def _fire(self, candidate: Candidate, subject: str, params: dict, problem: str | None, size: int) -> None:
        detail = {"watch": str(self.config.path), "folder": str(candidate.folder), "role": candidate.role,
                  "size": size}

        def queue(session: Session) -> Job:
            if problem is not None:
                job = failed_job(session, params, f"{candidate.folder}: {problem}")
                record_event(session, "watch_failed", None, job.id, reason=problem, **detail)
                return job
            job, _ = jobs.enqueue(session, "import", params)
            kind = "drop_queued" if candidate.role == "drop" else "checkpoint_queued"
            record_event(session, kind, None, job.id, name=params["name"], **detail)
            return job

        with self.reg.session() as s:
            job = fire(s, self.source, subject, queue, detail)
            job_id = job.id if job is not None else None
        if job_id is None:
            return  # handled before (a rescan after a restart, another daemon)
        if problem is not None:
            self.failures += 1
            log.warning("%s: %s not imported: %s (job %s)", self.name, candidate.folder, problem, job_id)
        else:
            self.folders_queued += 1
            self.outstanding[job_id] = subject
            log.info("%s: queued import job %s for %s as %s", self.name, job_id, candidate.folder, params["name"])

    # -- outcomes, disk full -------------------------------------------------------------------------------------

    def _check_outstanding(self) -> None:
        if not self.outstanding:
            return
        with self.reg.read_session() as s:
            finished = list(s.scalars(select(Job).where(Job.id.in_(list(self.outstanding)),
                                                        Job.state.in_(FINISHED))))
            rows = [(j.id, j.state, j.error, dict(j.params)) for j in finished]
        for job_id, state, error, params in rows:
            subject = self.outstanding.pop(job_id)
            if state == "succeeded":
                continue
            self.failures += 1
            if is_disk_full(error):
                self._pause(Retry(job_id, subject, params, _folder_size(params)), error or "disk full")

    def _pause(self, retry: Retry, reason: str, record: bool = True) -> None:
        self.retries.append(retry)
        if self.paused_reason is not None:
            return
        self.paused_reason = reason
        self.pauses += 1
        self.next_space_check = time.monotonic() + self.config.disk_full_retry
        if record:
            with self.reg.session() as s:
                record_event(s, "watch_paused", None, retry.job_id, watch=str(self.config.path), reason=reason)
        log.warning("%s: paused: %s; new imports wait until the store has room again (checked every %gs)",
                    self.name, reason, self.config.disk_full_retry)

    def _try_resume(self) -> bool:
        """Whether the store's file system has room again for the largest folder waiting; if so queue them."""
        if time.monotonic() < self.next_space_check:
            return False
        self.next_space_check = time.monotonic() + self.config.disk_full_retry
        needed = max((r.size for r in self.retries), default=0)
        try:
            free = shutil.disk_usage(self.reg.settings.blobs_dir).free
        except OSError:
            free = needed  # cannot tell: try again; a full disk pauses the watch again
        if free < needed:
            return False
        with self.reg.session() as s:
            record_event(s, "watch_resumed", None, None, watch=str(self.config.path), free_bytes=free,
                         retried=[r.job_id for r in self.retries])
            queued = []
            for retry in self.retries:
                detail = {"watch": str(self.config.path), "folder": retry.params.get("folder"), "retry_of": retry.job_id}
                job = fire(s, self.source, f"{retry.subject}|retry-{retry.job_id}",
                           lambda session, r=retry: jobs.enqueue(session, "import", r.params)[0], detail)
                if job is not None:
                    queued.append((job.id, f"{retry.subject}|retry-{retry.job_id}"))
        for job_id, subject in queued:
            self.outstanding[job_id] = subject
            self.folders_queued += 1
        log.info("%s: resumed (%d bytes free); queued %d import(s) again", self.name, free, len(queued))
        self.paused_reason, self.retries = None, []
        return True

    def _restore(self) -> None:
        """After a restart: follow the jobs this watch queued that have not finished, and pick up imports that
        failed on a full disk and were not queued again (the watch stays paused until there is room)."""
        root = str(self.config.path)
        with self.reg.read_session() as s:
            rows = s.execute(select(Trigger.subject, Job.id, Job.state, Job.params, Job.error)
                             .join(Job, Job.id == Trigger.job_id)
                             .where(Trigger.source == self.source,
                                    Trigger.subject.startswith(root, autoescape=True),
                                    Job.state.in_(("queued", "running", "failed")))).all()
            # Subjects are "<folder>|<fingerprint>": this root's own (a final model) or a folder under it.
            rows = [r for r in rows if r[0].startswith((root + "/", root + "|"))]
            retries = [(subject, job_id, dict(params), error) for subject, job_id, state, params, error
                       in rows if state == "failed" and is_disk_full(error)
                       and seen(s, self.source, f"{subject}|retry-{job_id}") is None]
            last = _last_pause_event(s, str(self.config.path))
        for subject, job_id, state, *_ in rows:
            if state in ("queued", "running"):
                self.outstanding[job_id] = subject
        for subject, job_id, params, error in retries:
            self._pause(Retry(job_id, subject, params, _folder_size(params)), error or "disk full",
                        record=last != "watch_paused")

    def status(self) -> dict[str, Any]:
        waiting = [{"folder": str(f), "why": p.why} for f, p in sorted(self.pending.items())[:20]]
        counts = {"events_seen": self.events_seen, "folders_queued": self.folders_queued,
                  "failures": self.failures, "pauses": self.pauses}
        return {**super().status(), "kind": "watch", "path": str(self.config.path), "mode": self.config.mode,
                **counts, "counts": counts, "paused": self.paused_reason is not None,
                "paused_reason": self.paused_reason, "waiting": waiting, "observer": self._observer is not None,
                "summary": self.summary()}

    def summary(self) -> str:
        """One line for `registry daemon status` (which lists the waiting folders under it)."""
        parts = [f"{self.config.mode}: {self.events_seen} file event(s), {self.folders_queued} import(s) queued, "
                 f"{self.failures} failed"]
        if self.paused_reason is not None:
            parts.append(f"paused: {self.paused_reason}")
        if self.pending:
            parts.append(f"{len(self.pending)} folder(s) waiting")
        return "; ".join(parts)


def is_disk_full(error: str | None) -> bool:
    """Whether a failed job ran out of space: every DiskFull (errors.py) the store, the ingest and the catalog
    raise says "disk full while ..." first, and the job records that message as its error."""
    return bool(error) and error.startswith("disk full")


def failed_job(session: Session, params: dict[str, Any], error: str, exit_code: int = 2) -> Job:
    """An import job recorded as failed without running: the folder is broken as it is (bad header, bad
    registry.json), and `registry jobs` shows why, like any failed import. Never retried."""
    now = db_now(session)
    job = Job(type="import", params=params, state="failed", attempts=0, max_attempts=1, run_after=now,
              created_at=now, finished_at=now, error=error, exit_code=exit_code)
    session.add(job)
    session.flush()
    return job


def _folder_size(params: dict[str, Any]) -> int:
    folder = params.get("folder")
    found = folders.look(Path(folder), tuple(params.get("exclude") or ())) if folder else None
    return found.size if found is not None else 0


def _last_pause_event(session: Session, watch: str) -> str | None:
    recent = session.scalars(select(Event).where(Event.kind.in_(("watch_paused", "watch_resumed")))
                             .order_by(Event.id.desc()).limit(200))
    return next((e.kind for e in recent if (e.detail or {}).get("watch") == watch), None)
