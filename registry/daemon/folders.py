"""What a watch needs to know about a folder without importing it: its files and their fingerprint, whether it
is complete (safetensors headers and indexes consistent), what a registry.json in it asks for, and the facts a
Hugging Face Trainer's trainer_state.json holds. Only stats and headers are read here, never whole files."""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..catalog import check_name
from ..errors import BadInput
from ..folder import SKIP_DIRS, WEIGHT_SUFFIXES, excluded, read_safetensors_header
from ..models import KINDS

REGISTRY_JSON = "registry.json"  # a drop folder's own settings; never part of the artifact
REGISTRY_JSON_KEYS = ("name", "kind", "base", "tags")
MAX_REGISTRY_JSON = 64 * 1024
CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE = "trainer_state.json"


@dataclass
class FolderLook:
    """A folder's files as seen by one walk: relative path -> (size, mtime_ns)."""

    path: Path
    files: dict[str, tuple[int, int]]

    @property
    def fingerprint(self) -> str:
        """Changes when any file appears, goes, grows or is written: sha256 of (relpath, size, mtime_ns)."""
        h = hashlib.sha256()
        for rel, (size, mtime_ns) in sorted(self.files.items()):
            h.update(f"{rel}\0{size}\0{mtime_ns}\n".encode("utf-8", "surrogateescape"))
        return h.hexdigest()

    @property
    def newest_write(self) -> float:
        """time.time() of the last write to any file (0 for an empty folder)."""
        return max((m for _, m in self.files.values()), default=0) / 1e9

    @property
    def size(self) -> int:
        return sum(s for s, _ in self.files.values())

    def has_weights(self) -> bool:
        return any(rel.endswith(WEIGHT_SUFFIXES) for rel in self.files)


def look(folder: Path, exclude: tuple[str, ...] = ()) -> FolderLook | None:
    """Stat every file under `folder` (following no links), leaving out what `exclude` leaves out of the
    import; None when the folder changed under the walk (a file vanished: someone is still moving things)."""
    files: dict[str, tuple[int, int]] = {}
    try:
        for dirpath, dirnames, filenames in os.walk(folder, followlinks=False, onerror=_raise):
            base = Path(dirpath).relative_to(folder).as_posix()
            rel_of = (lambda n: n) if base == "." else (lambda n: f"{base}/{n}")  # noqa: E731
            dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not excluded(rel_of(d), True, exclude)]
            for name in filenames:
                rel = rel_of(name)
                st = os.lstat(os.path.join(dirpath, name))
                if not excluded(rel, False, exclude):
                    files[rel] = (st.st_size, st.st_mtime_ns)
    except FileNotFoundError:
        return None
    return FolderLook(folder, files)


def _raise(exc: OSError) -> None:
    raise exc


def first_problem(folder_look: FolderLook) -> str | None:
    """Why a quiet folder cannot be imported as it is (a model file missing, a safetensors header broken, an
    index naming a shard or tensor that is not there), or None. A folder still being written shows the same
    faults; the caller asks only once the folder has been quiet for quiet_seconds."""
    folder = folder_look.path
    if not folder_look.has_weights():
        return (f"no model files ({', '.join(WEIGHT_SUFFIXES[:5])}, ...) in {folder}; copy in a folder saved with "
                "save_pretrained")
    headers: dict[str, set[str]] = {}
    try:
        for rel in sorted(folder_look.files):
            if rel.endswith(".safetensors"):
                header, _ = read_safetensors_header(folder / rel, rel)
                headers[rel] = {k for k in header if k != "__metadata__"}
        for rel in sorted(folder_look.files):
            if rel.endswith(".safetensors.index.json"):
                problem = _index_problem(folder, rel, headers)
                if problem:
                    return problem
    except BadInput as exc:
        return str(exc)
    except OSError as exc:
        return f"cannot read {exc.filename or folder}: {exc.strerror or exc}"
    return None


def _index_problem(folder: Path, rel: str, headers: dict[str, set[str]]) -> str | None:
    try:
        index = json.loads((folder / rel).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        return f"{rel} is not valid JSON ({exc}); fix or remove it"
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        return f"{rel} has no weight_map; it is not a safetensors index"
    here = rel.rsplit("/", 1)[0] + "/" if "/" in rel else ""
    for tensor, shard in sorted(weight_map.items()):
        shard_rel = here + shard if isinstance(shard, str) else None
        if shard_rel is None or shard_rel not in headers:
            return f"{rel} maps tensor {tensor!r} to {shard!r}, which is not a safetensors file in the folder"
        if tensor not in headers[shard_rel]:
            return f"{rel} maps tensor {tensor!r} to {shard}, whose header has no such tensor"
    return None


@dataclass
class DropSettings:
    """What a drop folder's registry.json asks for (each None when not given)."""

    name: str | None = None
    kind: str | None = None
    base: str | None = None
    tags: list[str] | None = None


def read_registry_json(folder: Path) -> DropSettings:
    """Parse and check a drop folder's registry.json; BadInput names the key and what it must be."""
    path = folder / REGISTRY_JSON
    if path.is_symlink():  # the daemon reads it: a link could point it at any file on the host
        raise BadInput(f"{REGISTRY_JSON} is a symlink; write it as a file in the folder")
    if not path.is_file():
        return DropSettings()
    size = path.stat().st_size
    if size > MAX_REGISTRY_JSON:  # checked before reading: the daemon must not load a huge file into memory
        raise BadInput(f"{REGISTRY_JSON} is {size} bytes; it holds only {', '.join(REGISTRY_JSON_KEYS)}")
    raw = path.read_bytes()[:MAX_REGISTRY_JSON + 1]
    try:
        data = json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadInput(f"{REGISTRY_JSON} is not valid JSON ({exc}); fix it or remove it") from None
    if not isinstance(data, dict):
        raise BadInput(f"{REGISTRY_JSON} must be a JSON object with keys {', '.join(REGISTRY_JSON_KEYS)}")
    unknown = sorted(set(data) - set(REGISTRY_JSON_KEYS))
    if unknown:
        raise BadInput(f"{REGISTRY_JSON}: unknown key {unknown[0]!r}; known keys: {', '.join(REGISTRY_JSON_KEYS)}")
    for key in ("name", "kind", "base"):
        if key in data and not isinstance(data[key], str):
            raise BadInput(f"{REGISTRY_JSON}: {key} must be a string, got {json.dumps(data[key])[:40]}")
    tags = data.get("tags")
    if tags is not None and (not isinstance(tags, list) or not all(isinstance(t, str) for t in tags)):
        raise BadInput(f"{REGISTRY_JSON}: tags must be a list of strings, got {json.dumps(tags)[:40]}")
    if "name" in data:
        check_name(data["name"])
    for tag in tags or ():
        check_name(tag, "tag")
    if data.get("kind") is not None and data["kind"] not in KINDS:
        raise BadInput(f"{REGISTRY_JSON}: unknown kind {data['kind']!r}; use one of: {', '.join(KINDS)}")
    return DropSettings(data.get("name"), data.get("kind"), data.get("base"), tags)


def _finite(value: Any) -> Any:
    """JSON-safe: the Trainer writes NaN and Infinity for a diverged loss; those are not JSON, so None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def training_facts(state_file: Path) -> dict[str, Any]:
    """step, epoch, loss, learning_rate, eval metrics and best metric from a trainer_state.json (the last logged
    values at or before the saved step). BadInput when the file is not a trainer state."""
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadInput(f"{state_file.name} is not valid JSON ({exc})") from None
    if not isinstance(state, dict) or not isinstance(state.get("log_history", []), list):
        raise BadInput(f"{state_file.name} is not a Trainer state (no log_history list)")
    step = state.get("global_step")
    facts: dict[str, Any] = {"step": step if isinstance(step, int) else None, "epoch": _finite(state.get("epoch"))}
    evals: dict[str, Any] = {}
    for entry in state.get("log_history", []):
        if not isinstance(entry, dict):
            continue
        if isinstance(step, int) and isinstance(entry.get("step"), int) and entry["step"] > step:
            continue
        if "loss" in entry:
            facts["loss"] = _finite(entry["loss"])
            if "learning_rate" in entry:
                facts["learning_rate"] = _finite(entry["learning_rate"])
        if "train_loss" in entry:  # the summary the Trainer logs when training ends
            facts["train_loss"] = _finite(entry["train_loss"])
        found = {k: _finite(v) for k, v in entry.items() if k.startswith("eval_") and isinstance(v, (int, float))}
        if found:
            evals = {**found, "step": entry.get("step")}
    if evals:
        facts["eval"] = evals
    if isinstance(state.get("best_metric"), (int, float)):
        facts["best_metric"] = _finite(state["best_metric"])
    return {k: v for k, v in facts.items() if v is not None}


def checkpoint_step(name: str) -> int | None:
    match = CHECKPOINT_DIR.match(name)
    return int(match.group(1)) if match else None


def final_model_files(folder_look: FolderLook) -> bool:
    """Whether a training output_dir's top level holds a saved model: a config and weights."""
    top = {rel for rel in folder_look.files if "/" not in rel}
    has_config = "config.json" in top or "adapter_config.json" in top
    return has_config and any(rel.endswith(WEIGHT_SUFFIXES) and rel != "training_args.bin" for rel in top)
