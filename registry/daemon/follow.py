"""Follow: `[[follow]]` hub repos whose revision is checked every interval; a commit not pulled yet is pulled
by the same job `registry pull` queues (same params and dedup key), so the mirror stays current and every
commit pulled stays registered (the new one named REPO_ID@<commit>, the REPO_ID:REVISION tag moved to it).

Exactly once: the Trigger row `follow:<endpoint>:<repo>@<commit>` is written with the pull job; a pull that
failed for a reason that may pass (exit 1: the hub or the network) is queued again at a later check. Trust: the
daemon and its workers talk only to endpoints the host's worker configuration trusts (`[[endpoints]]` in
`<home>/config.toml`, which also says where the token comes from), the public hub, or the daemon's own
HF_ENDPOINT; an untrusted endpoint is refused when the daemon starts.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import select

from .. import hub, jobs
from ..catalog import KINDS, check_name, record_event
from ..config import load_worker_config
from ..errors import BadInput, OperationFailed
from ..models import Artifact, Job
from ..pull import check_pull, pull_filter
from . import triggers
from .options import ConfigErrors, check_keys, duration, positive_int, string, string_list
from .service import Service

log = logging.getLogger("registry.daemon")

SOURCE = "follow"
KEYS = ("repo", "revision", "every", "endpoint", "include", "exclude", "kind", "tag", "workers")


@dataclass(frozen=True)
class FollowConfig:
    """One `[[follow]]` table."""

    repo: str
    revision: str = "main"
    every: float = 3600.0
    endpoint: str | None = None  # None: the daemon's HF_ENDPOINT, else the public hub
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    kind: str | None = None
    tags: tuple[str, ...] = ()
    workers: int = 8


def parse_follows(items: list, problems: list[str]) -> list[FollowConfig]:
    """`[[follow]]` tables -> FollowConfig; every problem is appended to `problems`."""
    if not isinstance(items, list):
        problems.append("follow: must be a list of [[follow]] tables")
        return []
    follows, seen = [], {}
    for n, item in enumerate(items):
        follow = _parse_follow(item, f"follow[{n}]", problems)
        if follow is None:
            continue
        same = (follow.repo, follow.revision, follow.endpoint, follow.include, follow.exclude)
        if same in seen:
            problems.append(f"follow[{n}]: follows {follow.repo}@{follow.revision} as follow[{seen[same]}] does; "
                            "remove one")
        seen.setdefault(same, n)
        follows.append(follow)
    return follows


def _parse_follow(item: Any, where: str, problems: list[str]) -> FollowConfig | None:
    t = check_keys(item, KEYS, where, problems, required=("repo",))
    if not t:
        return None
    ref = string(t["repo"], f"{where}.repo", problems) if "repo" in t else ""
    repo, revision = ref, "main"
    if ref:
        try:
            repo, revision = hub.parse_repo_ref(ref)
        except BadInput as exc:
            problems.append(f"{where}.repo: {exc}")
    if "revision" in t:
        if "@" in ref:
            problems.append(f"{where}.revision: the repo already names a revision ({ref}); give one of the two")
        revision = string(t["revision"], f"{where}.revision", problems) or "main"
    every = duration(t.get("every", "1h"), f"{where}.every", problems)
    endpoint = None
    if "endpoint" in t:
        endpoint = string(t["endpoint"], f"{where}.endpoint", problems)
        parts = urlsplit(endpoint)
        if endpoint and (parts.scheme not in ("http", "https") or not parts.hostname):
            problems.append(f"{where}.endpoint: {endpoint!r} must be an http:// or https:// URL with a host")
        elif parts.username is not None or parts.password is not None:
            # It would be in job params, events, logs and `daemon status`: the credential goes in config.toml.
            problems.append(f"{where}.endpoint: must not hold a user or password (user:password@); give the "
                            "endpoint's token with token_file or token_env in its [[endpoints]] entry of config.toml")
        endpoint = endpoint.rstrip("/") or None
    kind = t.get("kind")
    if kind is not None and kind not in KINDS:
        problems.append(f"{where}.kind: unknown kind {kind!r}; use one of: {', '.join(KINDS)}")
    tags = string_list(t.get("tag", []), f"{where}.tag", problems)
    for tag in tags:
        try:
            check_name(tag, "tag")
        except BadInput as exc:
            problems.append(f"{where}.tag: {exc}")
    workers = positive_int(t["workers"], f"{where}.workers", problems) if "workers" in t else 8
    include = tuple(sorted(string_list(t.get("include", []), f"{where}.include", problems)))
    exclude = tuple(sorted(string_list(t.get("exclude", []), f"{where}.exclude", problems)))
    if not ref:
        return None
    return FollowConfig(repo, revision, every, endpoint,
                        include, exclude, kind, tuple(sorted(set(tags))), workers)


class FollowService(Service):
    """One followed repo@revision: each tick asks the endpoint which commit the revision is and queues its
    pull when it is new. A hub that cannot be reached, refuses, or lost the repo is this service's
    last_error (in `registry daemon status`) until a tick succeeds; the daemon carries on."""

    def __init__(self, reg, follow: FollowConfig):
        super().__init__()
        self.reg, self.follow = reg, follow
        self.endpoint = hub.endpoint_url(follow.endpoint)
        self.name, self.interval = f"follow:{follow.repo}@{follow.revision}", follow.every
        self.last_commit: str | None = None
        self.last_job_id: int | None = None
        self.queued = 0

    def status(self) -> dict[str, Any]:
        f = self.follow
        summary = f"{self.endpoint} every {self.interval:g}s" + (
            f"; at commit {self.last_commit[:12]}" if self.last_commit else "") + (
            f"; last pull: job {self.last_job_id}" if self.last_job_id else "")
        return {**super().status(), "kind": "follow", "repo": f.repo, "revision": f.revision,
                "endpoint": self.endpoint, "last_commit": self.last_commit, "last_job_id": self.last_job_id,
                "queued": self.queued, "summary": summary}

    def subject(self, commit: str) -> str:
        f = self.follow
        subject = f"follow:{self.endpoint}:{f.repo}@{commit}"
        if f.include or f.exclude:  # another filter of the same commit is another pull
            subject += f"|include={','.join(f.include)}|exclude={','.join(f.exclude)}"
        return subject

    def tick(self) -> None:
        f = self.follow
        if hub.offline():
            raise OperationFailed("HF_HUB_OFFLINE is set: not asking the hub; unset it to follow "
                                  f"{f.repo}@{f.revision}")
        token = hub.token_for(load_worker_config(self.reg.home), self.endpoint)
        commit = hub.resolve_commit(self.endpoint, f.repo, f.revision, token)
        self.last_commit = commit
        todo = self._todo(commit)
        if todo is not None:
            self._queue(commit, retry=todo == "retry")

    def _todo(self, commit: str) -> str | None:
        """"pull" for a commit not registered (with this filter) nor queued; "retry" when its pull failed for a
        reason that may pass (exit 1: the hub or the network; not bad input, not a cancel); else None."""
        f = self.follow
        wanted = pull_filter(list(f.include), list(f.exclude))
        with self.reg.read_session() as s:
            pulled = s.scalars(select(Artifact).where(Artifact.source_repo == f.repo,
                                                      Artifact.source_revision == commit,
                                                      Artifact.status != "deleted"))
            if any((a.provenance or {}).get("pull_filter") == wanted for a in pulled):
                return None
            trigger = triggers.seen(s, SOURCE, self.subject(commit))
            if trigger is None:
                return "pull"
            job = s.get(Job, trigger.job_id) if trigger.job_id is not None else None
            return "retry" if job is not None and job.state == "failed" and job.exit_code == 1 else None

    def _queue(self, commit: str, retry: bool) -> None:
        f = self.follow
        # Names and tags the pull would refuse: refused now, as `registry pull` does, with no job queued.
        check_pull(self.reg, f.repo, f.revision, commit, None, list(f.include), list(f.exclude), list(f.tags))
        params, key = pull_job(f.repo, f.revision, commit, self.endpoint, list(f.include), list(f.exclude),
                               None, f.kind, f.workers, list(f.tags))
        with self.reg.session() as s:
            if retry:  # the trigger stays; it points at the new job (the dedup key: one retry at a time)
                job, created = jobs.enqueue(s, "pull", params, key)
                trigger = triggers.seen(s, SOURCE, self.subject(commit))
                if not created or trigger is None:
                    return
                trigger.job_id = job.id
            else:
                job = triggers.fire(s, SOURCE, self.subject(commit),
                                    lambda s: jobs.enqueue(s, "pull", params, key)[0],
                                    {"repo": f.repo, "revision": f.revision, "commit": commit,
                                     "endpoint": self.endpoint})
                if job is None:
                    return
            record_event(s, "follow_queued", None, job.id, repo=f.repo, revision=f.revision, commit=commit,
                         endpoint=self.endpoint, retry=retry)
            self.last_job_id = job.id
        self.queued += 1
        log.info("follow %s@%s: %s %s, pull queued as job %s", f.repo, f.revision,
                 "pulling again, after a failed pull, commit" if retry else "new commit", commit[:12], job.id)


def pull_job(repo_id: str, revision: str, commit: str, endpoint: str, include: list[str], exclude: list[str],
             name: str | None, kind: str | None, workers: int, tags: list[str]) -> tuple[dict[str, Any], str]:
    """The params and dedup key of a pull job, as `registry pull` queues it (registry/cli/artifacts.py)."""
    params = {"repo_id": repo_id, "revision": revision, "commit": commit, "endpoint": endpoint,
              "include": sorted(include), "exclude": sorted(exclude), "name": name, "kind": kind,
              "workers": workers, "tags": sorted(set(tags))}
    key = "pull:" + "|".join(str(params[k]) for k in ("endpoint", "repo_id", "commit", "include", "exclude",
                                                       "name", "kind", "revision", "tags"))
    return params, key


def follow_services(reg, follows: list[FollowConfig]) -> list[Service]:
    """One service per followed repo. An endpoint the worker configuration does not trust is refused here,
    at start: the pull jobs would all be refused by the workers."""
    config = load_worker_config(reg.home)
    services = [FollowService(reg, f) for f in follows]
    # Named, not numbered: the supervisor makes each follow's service on its own.
    problems = [f"follow {svc.follow.repo}@{svc.follow.revision}: endpoint {svc.endpoint} is not trusted by this "
                f"host's worker configuration; add [[endpoints]] url = \"{svc.endpoint}\" (with token_file = "
                f"\"...\" if it needs a token) to {config.path}"
                for svc in services if not hub.is_trusted(config, svc.endpoint)]
    if problems:
        raise ConfigErrors(problems, "daemon.toml")
    return services
