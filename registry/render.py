"""Turning results into text for people or JSON for programs; the CLI's only output code."""
from __future__ import annotations

import json
import textwrap
from typing import Any

import click


def human_size(n: int | None) -> str:
    """1536 -> '1.5 KiB'."""
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def emit_json(data: Any) -> None:
    """Print JSON on stdout."""
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


def table(rows: list[list[str]], headers: list[str]) -> None:
    """Print a left-aligned table."""
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    for row in [headers, *rows]:
        click.echo("  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip())


def replacing(replaced: list[dict[str, Any]]) -> str:
    """', replacing tiny sha256:1505495d1851 (removed)': the parent links a link, import or pull dropped."""
    if not replaced:
        return ""
    return ", replacing " + ", ".join(f"{p['name']} {p['digest'][:19]}{' (removed)' if p['removed'] else ''}"
                                      for p in replaced)


def linked_base(name: str, linked: dict[str, Any] | None) -> None:
    """The line import and pull print when registering again repaired an artifact's base link."""
    if linked:
        click.echo(f"linked {name} -> {linked['parent']} (base){replacing(linked['replaced'])}")


def artifact_list(items: list[dict[str, Any]]) -> None:
    """The `registry list` table."""
    if not items:
        click.echo("no artifacts; add one with: registry import DIR --name NAME")
        return
    table([[a["name"], a["kind"], a["status"], a["digest"][:19], human_size(a["size"]), ",".join(a["tags"])]
           for a in items], ["NAME", "KIND", "STATUS", "DIGEST", "SIZE", "TAGS"])


def artifact_details(d: dict[str, Any]) -> None:
    """The `registry show` text."""
    click.echo(f"{d['name']}  ({d['kind']}, {d['status']})")
    click.echo(f"digest:   {d['digest']}")
    click.echo(f"size:     {human_size(d['size'])} in {d['files']} files")
    click.echo(f"created:  {d['created_at']}")
    src = d["source"]
    if src["repo"]:
        click.echo(f"source:   {src['repo']}@{src['revision']}")
    elif src["path"]:
        click.echo(f"source:   {src['path']}")
    if d["tags"]:
        click.echo(f"tags:     {', '.join(d['tags'])}")
    meta = d["metadata"]
    for key in ("model_type", "architectures", "dtype", "parameter_count"):
        if key in meta:
            click.echo(f"{key + ':':<17}{meta[key]}")
    for key in ("peft_config", "quantization_config"):
        if isinstance(meta.get(key), dict):
            click.echo(f"{key}:")
            for line in nested_lines(meta[key], "  "):
                click.echo(line)
        elif key in meta:
            click.echo(f"{key + ':':<17}{_scalar(meta[key])}")
    prov = d.get("provenance") or {}
    q = prov.get("quantization")
    if q:
        c = q["calibration"]
        click.echo(f"quantization:    GPTQ int{q['bits']} group {q['group_size']} on {q['device']}, calibration "
                   f"{c['source']} ({c['samples']} samples, {c['digest'][:19]}), seed {q['seed']}")
    g, c = meta.get("gguf"), prov.get("conversion")
    if isinstance(g, dict) and isinstance(g.get("files"), dict):  # several GGUF files, none chosen
        listed = ", ".join(f"{path} ({outtype or 'unknown type'})" for path, outtype in g["files"].items())
        click.echo(f"gguf:            {len(g['files'])} files: {listed}")
    elif isinstance(g, dict):
        types = ", ".join(f"{k} x{v}" for k, v in sorted((g.get("tensor_types") or {}).items(), key=lambda kv: -kv[1]))
        click.echo(f"gguf:            {g.get('outtype')} {g.get('architecture')}, context {g.get('context_length')}, "
                   f"tokenizer {g.get('tokenizer_model')}/{g.get('pre_tokenizer')}, "
                   f"chat template {'yes' if g.get('chat_template') else 'none'}; tensors {types}")
    if c:
        t = c.get("tokenizer") or {}
        click.echo(f"conversion:      llama.cpp converter of llama-cpp-python {c['converter'].get('llama_cpp_python')}"
                   f" ({t.get('handling') or t.get('model')})")
        for warning in c.get("warnings") or []:
            click.echo(f"warning:         {warning}")
    e = prov.get("evaluation")
    if e:
        click.echo(f"evaluation:      perplexity {e['perplexity_quantized']} vs {e['perplexity_source']} for the "
                   f"source ({e['perplexity_ratio']}x); weights {e['size_reduction'] * 100:.0f}% smaller")
    if e and e.get("tokenizer"):
        t, greedy = e["tokenizer"], e.get("greedy") or {}
        click.echo(f"tokenizer check: {t['strings'] - t['mismatches']} of {t['strings']} strings as the source; greedy "
                   f"{greedy.get('equal')} of {greedy.get('tokens')} tokens equal")
    m = prov.get("merge")
    if m:
        click.echo(f"merge:           r {m['r']}, alpha {m['lora_alpha']}, scaling {m['scaling']} "
                   f"(base {m['base_digest'][:19]}, adapter {m['adapter_digest'][:19]})")
    if m and m.get("check"):
        click.echo(f"merge check:     largest logit difference against peft {m['check']['max_logit_diff']:.3g}")
    made = [f"{k} {prov[k]}" for k in ("job_id", "host", "created_at") if prov.get(k) is not None]
    if made:
        click.echo(f"provenance:      {', '.join(made).replace('job_id', 'job')}")
    if meta.get("unsafe_files"):
        click.echo(f"UNSAFE (pickle): {', '.join(meta['unsafe_files'])}")
    click.echo("files:")
    for f in d["file_list"]:
        click.echo(f"  {f['sha256'][:12]}  {human_size(f['size']):>10}  {f['path']}")
    for direction, label in (("parents", "derived from"), ("children", "used by")):
        for edge in d["lineage"][direction]:
            click.echo(f"{label}: {edge['name']} ({edge['role']}, {edge['digest'][:19]}, {edge['status']})")
    if d["jobs"]:
        click.echo("jobs:")
        for j in d["jobs"]:
            click.echo(f"  #{j['id']} {j['type']} {j['state']}")
    click.echo("events:")
    for e in d["events"]:
        tag = f" {e['detail']['tag']}" if e["kind"] == "tagged" and (e.get("detail") or {}).get("tag") else ""
        by = f"  by {e['actor']}" if e.get("actor") else ""  # a token, for changes made through `registry serve`
        click.echo(f"  {e['at']}  {e['kind']}{tag}{by}")


def nested_lines(data: dict[str, Any], indent: str, width: int = 100) -> list[str]:
    """A nested config (peft, quantization) as indented `key: value` lines, sorted by key, long lists wrapped.

    Unset fields (None, empty lists, dicts and strings) are left out: peft writes thirty keys, most of them
    unset, and `show --json` still has every field.
    """
    items = [(k, v) for k, v in sorted(data.items()) if v is not None and v != {} and v != [] and v != ""]
    pad = min(max((len(k) for k, _ in items), default=0) + 2, 28)
    lines = []
    for key, value in items:
        head = f"{indent}{(key + ':').ljust(pad - 1)} "
        if isinstance(value, dict):
            lines.append(f"{indent}{key}:")
            lines.extend(nested_lines(value, indent + "  ", width))
            continue
        text = ", ".join(_scalar(v) for v in value) if isinstance(value, list) else _scalar(value)
        lines.extend(textwrap.wrap(text, width, initial_indent=head, subsequent_indent=" " * len(head),
                                   break_on_hyphens=False, break_long_words=False) or [head.rstrip()])
    return lines


def _scalar(value: Any) -> str:
    """Strings as they are; numbers, booleans and anything nested as JSON (true, 0.05, {"a": 1})."""
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def verify_reports(reports: list[dict[str, Any]]) -> None:
    """One line per file: ok, MISMATCH (expected and actual), MISSING, WRONG SIZE, CHANGED."""
    for r in reports:
        how = "stat stamps only, bytes not read" if r["quick"] else f"{human_size(r['bytes_read'])} re-hashed"
        click.echo(f"{r['name']} {r['digest'][:19]}: {'ok' if r['ok'] else 'FAILED'} ({how})")
        for f in r["files"]:
            click.echo("  " + _file_line(f))
        if r.get("also_corrupt"):
            click.echo(f"  also marked corrupt (they share the damaged files): {', '.join(r['also_corrupt'])}")


def _file_line(f: dict[str, Any]) -> str:
    status, path = f["status"], f["path"]
    if status == "ok":
        return f"ok          {path}"
    if status == "mismatch":
        return f"MISMATCH    {path}  expected {f['expected']}  actual {f['actual']}"
    if status == "missing":
        return f"MISSING     {path}  blob {f['expected'][:12]} is not in the store"
    if status == "wrong_size":
        return f"WRONG SIZE  {path}  expected {f['expected_size']} bytes, found {f['actual_size']}"
    return f"CHANGED     {path}  stat differs from the last verify; run a full verify to re-hash"


def fsck_report(r) -> None:
    """`registry fsck`: one line per disagreement between the catalog and the store."""
    for m in r.missing_blobs:
        click.echo(f"MISSING BLOB    {m['name']}: {m['path']} (blob {m['sha256'][:12]} is not in the store)")
    for name in r.written:
        click.echo(f"record written  {name}")
    for name in r.unrecorded:
        click.echo(f"NO RECORD       {name} (run registry fsck --write-records)")
    for name in r.orphan_records:
        click.echo(f"ORPHAN RECORD   {name} (in the store, not in the catalog)")
    for name in r.damaged_records:
        click.echo(f"DAMAGED RECORD  {name}")
    # An empty catalog beside records is a lost catalog: rebuild it, do not overwrite the records.
    remedy = "registry fsck --rebuild-catalog" if r.artifacts == 0 and r.records else "registry fsck --write-records"
    for tag in r.tag_mismatches:
        click.echo(f"TAG DIFFERS     {tag} (catalog and store disagree; run {remedy})")
    verdict = "ok" if r.ok else "PROBLEMS FOUND"
    click.echo(f"{r.artifacts} artifacts, {r.records} records: {verdict}")
    if r.artifacts == 0 and r.records:
        click.echo("the catalog is empty but the store holds artifact records: run registry fsck --rebuild-catalog")


def job_line(j: dict[str, Any]) -> list[str]:
    """A row of the `registry jobs` table."""
    p = j["progress"]
    progress = f"{p['done']}/{p['total']} {p['unit'] or ''}".strip() if p["total"] else ""
    return [str(j["id"]), j["type"], j["state"], f"{j['attempts']}/{j['max_attempts']}", progress,
            (j["error"] or j["message"] or "")[:60]]


def job_details(j: dict[str, Any]) -> None:
    """The `registry job ID` text."""
    for key in ("id", "type", "state", "attempts", "max_attempts", "lease_owner", "created_at", "started_at",
                "finished_at", "message", "error", "exit_code", "result_artifact_id"):
        if j.get(key) is not None:
            click.echo(f"{key + ':':<20}{j[key]}")
    click.echo(f"{'params:':<20}{json.dumps(j['params'], sort_keys=True)}")
    p = j["progress"]
    if p["total"]:
        click.echo(f"{'progress:':<20}{p['done']}/{p['total']} {p['unit'] or ''}")


def upstream_reports(checks) -> None:
    """`verify --upstream`: one line per file, then whether the branch moved."""
    for c in checks:
        click.echo(f"{c.name}: {c.repo_id}@{c.commit[:12]} {'matches the hub' if c.ok else 'DIFFERS from the hub'} "
                   f"at {c.endpoint}" + (" (no endpoint recorded; --endpoint URL asks another)"
                                         if c.endpoint_source == "default" else ""))
        for f in c.files:
            extra = f"  expected {f['expected']}  actual {f['actual']}" if f["status"] == "mismatch" else ""
            click.echo(f"  {f['status'].upper() if f['status'] != 'ok' else 'ok':<12}{f['path']}{extra}")
        if c.moved:
            click.echo(f"  {c.ref} has moved: pinned {c.commit[:12]}, now {c.ref_now[:12]}; "
                       f"pull {c.repo_id}@{c.ref} to update")
        elif c.ref and c.ref != c.commit:
            click.echo(f"  {c.ref} still points at {c.commit[:12]}")
