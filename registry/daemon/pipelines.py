"""Pipelines: `[[pipeline]]` rules that derive artifacts as they appear.

A rule matches artifacts by kind, linked base, name glob and tag, and queues a chain for each one it matches:
merge (an adapter into its base), then quantize of what the merge made (a job that runs after the merge and
gets its result, jobs.params_for_run), and tags the last result. Merge and quantize record the lineage
themselves, so the int4 model links to the merged model, which links to the base and the adapter.

Exactly once: each (rule, artifact) is a Trigger row written with its jobs (triggers.fire). Which artifacts a
rule applies to: those registered after the rule was first seen, a watermark kept in a Trigger row of its own
(`rule:<name>:since`), so a new rule does not derive from every old artifact on its first start, and a
restart (even after kill -9) neither forgets nor repeats anything; `existing = true` applies it to every
artifact already there too. Each tick reads the artifacts past an in-memory cursor; the cursor stays
RECENT_SECONDS behind, so an artifact whose transaction committed late (PostgreSQL hands out ids before
commit) or whose base was linked a moment after it registered is still seen.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import logging
import string as string_module
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from .. import jobs, quantize_options
from ..calibration import load_calibration
from ..catalog import base_of, check_name, linked_parent, load, record_event, tags_of
from ..config import load_worker_config
from ..db import db_now
from ..errors import BadInput
from ..models import Artifact, Tag, Trigger
from ..schema import KINDS
from . import triggers
from .options import ConfigErrors, check_keys, duration, string, string_list
from .service import Service

log = logging.getLogger("registry.daemon")

SOURCE = "pipeline"
RECENT_SECONDS = 120.0
SCAN_LIMIT = 1000
DEFAULT_EVERY = 10.0
# From quantize's torch-free part (registry.quantize imports torch, which the daemon process should not load).
BITS = quantize_options.BITS
QUANTIZE_DEFAULTS: dict[str, Any] = dataclasses.asdict(quantize_options.QuantizeOptions())
MERGE_DEFAULTS: dict[str, Any] = {"dtype": "auto", "check": False, "force": False, "allow_pickle": False}
DTYPES = ("auto", "bf16", "fp16", "fp32")
QUANTIZABLE = ("base", "merged", "checkpoint")
TEMPLATE_FIELDS = ("name", "base", "rule", "bits")


@dataclass(frozen=True)
class When:
    """What a rule matches: every given condition must hold."""

    kinds: tuple[str, ...]
    base: str | None = None  # the linked base's name (a glob) or a tag pointing at it
    name: str | None = None  # a glob on the artifact's name
    tag: str | None = None  # a glob: one of the artifact's tags matches


@dataclass(frozen=True)
class PipelineConfig:
    """One `[[pipeline]]` rule."""

    name: str
    when: When
    merge: dict[str, Any] | None = None  # MERGE_DEFAULTS keys, plus `name` (a template) when given
    quantize: dict[str, Any] | None = None  # QUANTIZE_DEFAULTS keys, plus `name` (a template) when given
    tags: tuple[str, ...] = ()  # templates, applied to the last result
    existing: bool = False
    every: float = DEFAULT_EVERY


def parse_pipelines(items: list, problems: list[str]) -> list[PipelineConfig]:
    """`[[pipeline]]` tables -> rules; every problem is appended to `problems`."""
    if not isinstance(items, list):
        problems.append("pipeline: must be a list of [[pipeline]] tables")
        return []
    rules, names = [], set()
    for n, item in enumerate(items):
        rule = _parse_rule(item, f"pipeline[{n}]", problems)
        if rule is None:
            continue
        if rule.name in names:
            problems.append(f"pipeline[{n}].name: {rule.name!r} is used by another rule; names must be unique "
                            "(they key what each rule has done)")
        names.add(rule.name)
        rules.append(rule)
    return rules


def _parse_rule(item: Any, where: str, problems: list[str]) -> PipelineConfig | None:
    t = check_keys(item, ("name", "when", "merge", "quantize", "tag", "existing", "every"), where, problems,
                   required=("name", "when"))
    if not t:
        return None
    name = string(t["name"], f"{where}.name", problems) if "name" in t else ""
    merge = _parse_merge(t["merge"], f"{where}.merge", problems) if "merge" in t else None
    quantize = _parse_quantize(t["quantize"], f"{where}.quantize", problems) if "quantize" in t else None
    if merge is None and quantize is None and "merge" not in t and "quantize" not in t:
        problems.append(f"{where}: has neither merge nor quantize; give at least one step")
    when = _parse_when(t.get("when", {}), f"{where}.when", "merge" in t, problems)
    bits = (quantize or {}).get("bits", 4)
    tags = tuple(string_list(t.get("tag", []), f"{where}.tag", problems))
    for n, template in enumerate(tags):
        _check_template(template, f"{where}.tag" if len(tags) == 1 else f"{where}.tag[{n}]", bits, problems, "tag")
    for step in (merge, quantize):
        if step and "name" in step:
            _check_template(step["name"], f"{where}.{'merge' if step is merge else 'quantize'}.name", bits,
                            problems, "name")
    existing = t.get("existing", False)
    if not isinstance(existing, bool):
        problems.append(f"{where}.existing: {existing!r} must be true or false")
    every = duration(t["every"], f"{where}.every", problems) if "every" in t else DEFAULT_EVERY
    return PipelineConfig(name, when, merge, quantize, tags, existing is True, every)


def _parse_when(value: Any, where: str, merges: bool, problems: list[str]) -> When:
    t = check_keys(value, ("kind", "base", "name", "tag"), where, problems)
    kinds = tuple(string_list(t["kind"], f"{where}.kind", problems)) if "kind" in t else ()
    for kind in kinds:
        if kind not in KINDS:
            problems.append(f"{where}.kind: unknown kind {kind!r}; use one of: {', '.join(KINDS)}")
    if merges:
        if kinds and kinds != ("adapter",):
            problems.append(f"{where}.kind: a rule with merge matches adapters only; write kind = \"adapter\"")
        kinds = ("adapter",)
    else:
        wrong = [k for k in kinds if k not in QUANTIZABLE and k in KINDS]
        if wrong:
            problems.append(f"{where}.kind: {', '.join(wrong)} cannot be quantized; quantize matches "
                            f"{', '.join(QUANTIZABLE)} (add merge = {{}} to derive from adapters)")
        kinds = kinds or QUANTIZABLE
    conditions = {}
    for key in ("base", "name", "tag"):
        if key in t:
            conditions[key] = string(t[key], f"{where}.{key}", problems) or None
    return When(kinds, **conditions)


def _parse_merge(value: Any, where: str, problems: list[str]) -> dict[str, Any]:
    t = check_keys(value, (*MERGE_DEFAULTS, "name"), where, problems)
    opts = dict(MERGE_DEFAULTS)
    if "dtype" in t:
        if t["dtype"] not in DTYPES:
            problems.append(f"{where}.dtype: {t['dtype']!r} is not a dtype; use one of: {', '.join(DTYPES)}")
        else:
            opts["dtype"] = t["dtype"]
    for key in ("check", "force", "allow_pickle"):
        if key in t:
            opts[key] = _bool(t[key], f"{where}.{key}", problems)
    if "name" in t:
        opts["name"] = string(t["name"], f"{where}.name", problems)
    return opts


def _parse_quantize(value: Any, where: str, problems: list[str]) -> dict[str, Any]:
    """The options `registry quantize` takes, checked as it checks them (what needs the model waits for it:
    the group size must divide each layer's input features)."""
    t = check_keys(value, (*QUANTIZE_DEFAULTS, "name"), where, problems)
    opts = dict(QUANTIZE_DEFAULTS)
    if "bits" in t:
        if t["bits"] not in BITS or isinstance(t["bits"], bool):
            problems.append(f"{where}.bits: {t['bits']!r} is not supported; use one of {', '.join(map(str, BITS))}")
        else:
            opts["bits"] = t["bits"]
    if "group_size" in t:
        g = t["group_size"]
        if isinstance(g, bool) or not isinstance(g, int) or (g < 1 and g != -1):
            problems.append(f"{where}.group_size: {g!r} is not valid; use a positive divisor of the layers' input "
                            "features (e.g. 32, 64, 128) or -1 for none")
        else:
            opts["group_size"] = g
    for key in ("desc_act", "sym", "evaluate"):
        if key in t:
            opts[key] = _bool(t[key], f"{where}.{key}", problems)
    for key, low in (("samples", 1), ("seq_len", 8), ("seed", 0)):
        if key in t:
            opts[key] = _int(t[key], f"{where}.{key}", low, problems)
    if "device" in t:
        if t["device"] not in ("auto", "cpu", "cuda"):
            problems.append(f"{where}.device: {t['device']!r} is not a device; use auto, cpu or cuda")
        else:
            opts["device"] = t["device"]
    if "max_ppl_ratio" in t:
        r = t["max_ppl_ratio"]
        if isinstance(r, bool) or not isinstance(r, (int, float)) or r <= 0:
            problems.append(f"{where}.max_ppl_ratio: {r!r} must be a number above 0")
        else:
            opts["max_ppl_ratio"] = float(r)
    if "calibration" in t:
        opts["calibration"] = _calibration(t["calibration"], opts["samples"], opts["seed"], f"{where}.calibration",
                                           problems)
    if "name" in t:
        opts["name"] = string(t["name"], f"{where}.name", problems)
    return opts


def _calibration(value: Any, samples: int | None, seed: int, where: str, problems: list[str]) -> str | None:
    """An absolute path to a calibration file that reads and holds enough samples (the quantize job reads it
    again, on the worker's host)."""
    path = string(value, where, problems)
    if not path:
        return None
    resolved = Path(path).expanduser()
    if not resolved.is_absolute():
        problems.append(f"{where}: {path!r} must be an absolute path (workers run in other folders)")
        return None
    if not resolved.is_file():
        problems.append(f"{where}: {path} does not exist or is not a file")
        return None
    try:
        load_calibration(resolved, samples, seed)
    except BadInput as exc:
        problems.append(f"{where}: {exc}")
    return str(resolved)


def _check_template(template: str, where: str, bits: int, problems: list[str], what: str) -> None:
    """A name or tag template: only the known fields, and a valid name once filled in."""
    try:
        fields = {f for _, f, _, _ in string_module.Formatter().parse(template) if f is not None}
    except ValueError as exc:
        problems.append(f"{where}: {template!r} is not a valid template ({exc}); write e.g. \"{{name}}:int4\"")
        return
    unknown = sorted(fields - set(TEMPLATE_FIELDS))
    if unknown:
        problems.append(f"{where}: unknown field {{{unknown[0]}}} in {template!r}; use "
                        f"{', '.join('{' + f + '}' for f in TEMPLATE_FIELDS)}")
        return
    try:
        check_name(fill(template, "my-model", "base-model", "rule", bits), what)
    except BadInput as exc:
        problems.append(f"{where}: {template!r} gives {exc}")


def fill(template: str, name: str, base: str | None, rule: str, bits: int) -> str:
    return template.format(name=name, base=base or "", rule=rule, bits=bits)


def _bool(value: Any, where: str, problems: list[str]) -> bool:
    if not isinstance(value, bool):
        problems.append(f"{where}: {value!r} must be true or false")
        return False
    return value


def _int(value: Any, where: str, low: int, problems: list[str]) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        problems.append(f"{where}: {value!r} must be a whole number of at least {low}")
        return low
    return value


# --- the service ---

class PipelineService(Service):
    """One rule: each tick reads the artifacts registered since the last look and queues the chain for each
    match not handled yet."""

    def __init__(self, reg, rule: PipelineConfig):
        super().__init__()
        self.reg, self.rule = reg, rule
        self.name, self.interval = f"pipeline:{rule.name}", rule.every
        self.cursor: int | None = None  # every artifact id up to here is decided; None: not looked yet
        self.fired = 0
        self.last_fired: dict[str, Any] | None = None

    def status(self) -> dict[str, Any]:
        last = self.last_fired
        summary = f"fired {self.fired} time(s)" + (
            f"; last: {last['artifact']} -> job(s) {', '.join(map(str, last['jobs']))}" if last else "")
        return {**super().status(), "kind": "pipeline", "rule": self.rule.name, "fired": self.fired,
                "last_fired": last, "summary": summary}

    def tick(self) -> None:
        if self.cursor is None:
            self.cursor = self._watermark()
        with self.reg.read_session() as s:
            now = db_now(s)
            rows = list(s.scalars(select(Artifact).where(Artifact.id > self.cursor, Artifact.status == "ready",
                                                         Artifact.kind.in_(self.rule.when.kinds))
                                  .order_by(Artifact.id).limit(SCAN_LIMIT)))
            candidates = [a.id for a in rows if self._matches(s, a)]
            recent = [a.id for a in rows if a.created_at > now - timedelta(seconds=RECENT_SECONDS)]
            handled = self._handled(s, candidates)
        # Move past what is old enough to have committed for sure: the rest is read again next time.
        if rows:
            self.cursor = (min(recent) - 1) if recent else rows[-1].id
        for artifact_id in candidates:
            if artifact_id not in handled:
                self._fire(artifact_id)

    def _watermark(self) -> int:
        """The newest artifact id when the rule was first seen, recorded once; 0 (all) with `existing`."""
        subject = f"rule:{self.rule.name}:since"
        with self.reg.read_session() as s:
            row = triggers.seen(s, SOURCE, subject)
        if row is None:
            with self.reg.session() as s:
                last = s.scalar(select(func.max(Artifact.id))) or 0
                triggers.fire(s, SOURCE, subject, lambda _s: None, {"after_artifact_id": last,
                                                                     "rule": self.rule.name})
                row = triggers.seen(s, SOURCE, subject)  # another daemon may have written it first: its value
        return 0 if self.rule.existing else int(row.detail.get("after_artifact_id", 0))

    def _matches(self, s, artifact) -> bool:
        when = self.rule.when
        if when.name and not fnmatch.fnmatchcase(artifact.name, when.name):
            return False
        if when.tag:
            if not any(fnmatch.fnmatchcase(t, when.tag) for t in tags_of(s, artifact.id)):
                return False
        if self.rule.merge is not None or when.base:
            base = _base(s, artifact)
            if base is None:  # an adapter whose base is not registered yet: looked at again while recent
                return False
            if when.base and not _names_base(s, base, when.base):
                return False
        return True

    def _handled(self, s, artifact_ids: list[int]) -> set[int]:
        if not artifact_ids:
            return set()
        keys = {triggers.trigger_key(self._subject(i)): i for i in artifact_ids}
        found = s.scalars(select(Trigger.key).where(Trigger.source == SOURCE, Trigger.key.in_(list(keys))))
        return {keys[k] for k in found}

    def _subject(self, artifact_id: int) -> str:
        return f"rule:{self.rule.name}:artifact:{artifact_id}"

    def _fire(self, artifact_id: int) -> None:
        with self.reg.session() as s:
            artifact = load(s, artifact_id)
            queued: list[int] = []
            job = triggers.fire(s, SOURCE, self._subject(artifact_id),
                                lambda s: queue_chain(s, self.rule, artifact, queued),
                                {"rule": self.rule.name, "artifact": artifact.name, "digest": artifact.digest})
            if job is None:
                return
            record_event(s, "pipeline_fired", artifact.id, job.id, rule=self.rule.name, jobs=queued)
            self.fired += 1
            self.last_fired = {"artifact": artifact.name, "jobs": queued}
        log.info("pipeline %s: %s -> jobs %s", self.rule.name, artifact.name, ", ".join(map(str, queued)))


def _base(s, artifact):
    return base_of(s, artifact) if artifact.kind == "adapter" else linked_parent(s, artifact, "base")


def _names_base(s, base, wanted: str) -> bool:
    """`wanted` names this base: its name (a glob), or a tag that points at it."""
    if fnmatch.fnmatchcase(base.name, wanted):
        return True
    tag = s.get(Tag, wanted)
    return tag is not None and tag.artifact_id == base.id


def queue_chain(s, rule: PipelineConfig, artifact, queued: list[int]):
    """Queue the rule's jobs for `artifact` in this transaction; returns the last one (its ids go in `queued`).

    The merge job has the params and dedup key `registry merge` gives it (so it joins an identical request);
    the quantize job runs after it and takes its result as `source_id`. Tags go on the last job."""
    base = _base(s, artifact)
    bits = (rule.quantize or {}).get("bits", 4)
    fields = {"name": artifact.name, "base": base.name if base is not None else None, "rule": rule.name, "bits": bits}
    tags = sorted({fill(t, **fields) for t in rule.tags})
    job = None
    if rule.merge is not None:
        name = fill(rule.merge["name"], **fields) if "name" in rule.merge else None
        params = {**{k: v for k, v in rule.merge.items() if k != "name"}, "base_id": base.id,
                  "adapter_id": artifact.id, "name": name}
        key = "merge:" + "|".join(str(params[k]) for k in sorted(params))  # as `registry merge` builds it
        if rule.quantize is None and tags:
            params["tags"], key = tags, None  # its own job: one queued by hand would not tag
        job, _ = jobs.enqueue(s, "merge", params, key)
        queued.append(job.id)
    if rule.quantize is not None:
        options = {k: v for k, v in rule.quantize.items() if k != "name"}
        name = fill(rule.quantize["name"], **fields) if "name" in rule.quantize else None
        params = {"name": name, "options": options, "tags": tags}
        if job is not None:
            params["from_after"] = "source_id"
            job, _ = jobs.enqueue(s, "quantize", params, None, after=job.id)
        else:
            params["source_id"] = artifact.id
            job, _ = jobs.enqueue(s, "quantize", params, None)
        queued.append(job.id)
    return job


def pipeline_services(reg, pipelines: list[PipelineConfig]) -> list[Service]:
    """One service per rule. A calibration file outside the workers' allowed roots (config.toml) is refused
    now, not by every quantize job later."""
    problems = []
    config = load_worker_config(reg.home)
    for rule in pipelines:  # named, not numbered: the supervisor makes each rule's services on its own
        calibration = (rule.quantize or {}).get("calibration")
        if calibration:
            try:
                config.check_path(calibration, "calibration file")
            except BadInput as exc:
                problems.append(f"pipeline {rule.name!r}: quantize.calibration: {exc}")
    if problems:
        raise ConfigErrors(problems, "daemon.toml")
    return [PipelineService(reg, rule) for rule in pipelines]
