"""Commands on artifacts: import, pull, list, show, manifest, export, path, tag, rm, link."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from .. import remote, render
from ..errors import BadInput
from ..manifest import canonical_json, sha256sum_lines
from ..schema import KINDS
from . import cli
from . import remote as remote_cli
from .common import _reg, _result, _run, _trust_command_line_endpoint, detach_option, int_range, json_option
from .common import _fast_read, catalog  # catalog: imported on first use (common.py says why)


@cli.command("import")
@click.argument("folder", required=False, type=click.Path(file_okay=False, path_type=Path))
@click.option("--name", help="Artifact name (required for a folder; default for --hf-cache: the repo id).")
@click.option("--kind", type=click.Choice(KINDS), help="Override the detected kind.")
@click.option("--base", help="Ref of the base model an adapter was trained on.")
@click.option("--link", is_flag=True, help="Hardlink files into the store instead of copying (same file system; "
                                           "the source files become read-only).")
@click.option("--hf-cache", "hf_cache", metavar="REPO_ID", help="Import a snapshot from a Hugging Face cache.")
@click.option("--revision", default="main", show_default=True, help="Branch, tag or commit with --hf-cache.")
@click.option("--cache-dir", type=click.Path(file_okay=False), help="Hugging Face cache folder (default: HF_HUB_CACHE).")
@detach_option
@json_option
def import_(folder, name, kind, base, link, hf_cache, revision, cache_dir, detach, as_json) -> None:
    """Register a local Hugging Face style model folder (or a cached snapshot).

    \b
    Examples:
      registry import ./llama-7b --name llama-7b
      registry import ./my-lora --name my-lora --base llama-7b
      registry import --hf-cache meta-llama/Llama-2-7b-hf
    """
    if remote.configured():
        remote_cli.refuse("registry import", "reads files on this machine, which the server cannot read")
    if hf_cache:
        if folder is not None:
            raise BadInput("give either a FOLDER or --hf-cache REPO_ID, not both")
        params = {"hf_cache_repo": hf_cache, "revision": revision, "name": name,
                  "cache_dir": cache_dir and str(Path(cache_dir).absolute())}
    else:
        if folder is None or not name:
            raise BadInput("usage: registry import FOLDER --name NAME (or --hf-cache REPO_ID)")
        params = {"folder": str(folder.absolute()), "name": name}
        with _reg().read_session() as s:
            catalog.check_new_name(s, name)  # queue no doomed job (the import checks again)
    params.update(kind=kind, base=base, link=link)
    key = "import:" + "|".join(f"{k}={params[k]}" for k in sorted(params))
    r = _result(_run("import", params, key, detach, as_json), as_json)
    if r is not None:
        verb = "registered" if r["created"] else "already registered"
        click.echo(f"{verb} {r['name']} ({r['kind']}) {r['digest']}: {r['files']} files, "
                   f"{render.human_size(r['size'])}, {render.human_size(r['bytes_added'])} added to the store")
        render.linked_base(r["name"], r.get("linked"))  # the import repaired the lineage of an earlier artifact


@cli.command()
@click.argument("repo")
@click.option("--include", multiple=True, metavar="GLOB", help="Only files matching (repeatable).")
@click.option("--exclude", multiple=True, metavar="GLOB", help="Skip files matching (repeatable).")
@click.option("--endpoint", help="Hub or mirror URL (default: HF_ENDPOINT, else the public hub).")
@click.option("--token-file", type=click.Path(dir_okay=False), help="File holding the access token for this "
              "command (default: HF_TOKEN, else the huggingface_hub login; a worker uses its config.toml).")
@click.option("--name", help="Artifact name (default: the repo id).")
@click.option("--kind", type=click.Choice(KINDS), help="Override the detected kind.")
@click.option("--workers", default=8, show_default=True, type=int_range(1, 64), help="Parallel downloads.")
@click.option("--tag", "tags", multiple=True, metavar="TAG", help="Also point TAG at the result (repeatable). A "
              "filtered pull (--include/--exclude) gets no other tag: REPO_ID:REVISION stays on the whole commit.")
@detach_option
@json_option
def pull(repo, include, exclude, endpoint, token_file, name, kind, workers, tags, detach, as_json) -> None:
    """Download REPO_ID[@REVISION] from the hub, verifying every file as it arrives.

    The whole commit is named REPO_ID (REPO_ID@<commit> when that name holds another commit) and tagged
    REPO_ID:REVISION. A filtered pull is named REPO_ID@<commit>-filtered-<digest> and tagged only with --tag.

    \b
    Examples:
      registry pull meta-llama/Llama-2-7b-hf
      registry pull org/model@v1.0 --include '*.safetensors' --include '*.json'
      registry pull org/model --exclude '*.bin' --tag org/model:safetensors-only
      HF_ENDPOINT=https://mirror.example registry pull org/model
    """
    if remote.configured():
        remote_cli.refuse_host_path("--token-file", token_file)
        _server_decides("--workers")
        body = {"type": "pull", "repo": repo, "include": list(include), "exclude": list(exclude), "name": name,
                "kind": kind, "tags": list(tags), "endpoint": endpoint}
        return _pulled(remote_cli.run(body, detach, as_json), as_json)
    from .. import hub
    from ..pull import pull_offline
    from ..submit import pull_request

    repo_id, revision = hub.parse_repo_ref(repo)
    for t in tags:  # syntax only, before any request (offline too); pull_request checks them again
        catalog.check_name(t, "tag")
    if hub.offline():
        found = pull_offline(_reg(), repo_id, revision, list(include), list(exclude))
        render.emit_json(found) if as_json else click.echo(
            f"offline: {repo_id}@{revision} is already registered as {found['name']} {found['digest']}")
        return
    endpoint = _trust_command_line_endpoint(endpoint, token_file)
    if detach and token_file:
        click.echo("warning: --token-file is used by this command only; the worker that runs the job uses the "
                   "token its own config.toml gives this endpoint", err=True)
    req = pull_request(_reg(), repo, include, exclude, endpoint, name, kind, workers, tags)  # resolves the commit
    _pulled(_run(req.type, req.params, req.dedup_key, detach, as_json), as_json)


def _pulled(job, as_json: bool) -> None:
    r = _result(job, as_json)
    if r is not None:
        click.echo(_pull_summary(r))
        render.linked_base(r["name"], r.get("linked"))  # pulled again: the adapter's base link was repaired


def _server_decides(option: str) -> None:
    """An option that a catalog server's workers set for themselves: said once, then ignored."""
    from click.core import ParameterSource

    ctx = click.get_current_context()
    param = next(p for p in ctx.command.params if option in p.opts)
    if ctx.get_parameter_source(param.name) == ParameterSource.COMMANDLINE:
        click.echo(f"warning: {option} is ignored with {remote.URL_ENV}: the server's workers decide it", err=True)


def _files(n: int) -> str:
    return f"{n} file" if n == 1 else f"{n} files"


def _pull_summary(r: dict) -> str:
    """One line: what was pulled, what crossed the network, and the tags it got."""
    n, total = r["files_downloaded"], r["files"]
    got = f"downloaded {_files(n)} ({render.human_size(r['bytes_downloaded'])})"
    if n == 0:
        got += ", every file was already in the store"
    elif n < total:
        rest = "the other file was" if total - n == 1 else f"the other {total - n} files were"
        got += f"; {rest} already in the store"
    tags = r.get("tags", [r["tag"]] if r.get("tag") else [])
    if tags:
        tagged = f"tagged {', '.join(tags)}"
    else:
        tagged = f"not tagged (a filtered pull leaves {r['repo_id']}'s tags alone; --tag TAG tags it)"
    return (f"pulled {r['repo_id']}@{r['commit'][:12]} as {r['name']} ({r['kind']}) {r['digest']}: "
            f"{_files(total)}, {render.human_size(r['size'])}; {got}; {tagged}")


@cli.command("list")
@click.option("--kind", type=click.Choice(KINDS), help="Only artifacts of this kind.")
@click.option("--deleted", is_flag=True, help="Include deleted artifacts.")
@json_option
def list_(kind: str | None, deleted: bool, as_json: bool) -> None:
    """List registered artifacts, newest first.

    \b
    Examples:
      registry list
      registry list --kind adapter --json
      registry list --deleted
    """
    if remote.configured():
        items = remote_cli.artifact_list(kind, deleted)
    else:
        items = _fast_read(lambda c: c.summaries(kind, deleted))  # SQLite without the ORM, when it can (fastread.py)
    if items is None:
        with _reg().read_session() as s:
            items = [catalog.summary(s, a) for a in catalog.list_artifacts(s, kind, deleted)]
    render.emit_json(items) if as_json else render.artifact_list(items)


@cli.command()
@click.argument("ref")
@json_option
def show(ref: str, as_json: bool) -> None:
    """Show an artifact: metadata, files, lineage up and down, jobs and events.

    REF is a name, a tag, or a digest prefix such as sha256:1a2b3c4d.

    \b
    Examples:
      registry show llama-7b
      registry show sha256:1a2b3c4d --json
    """
    if remote.configured():
        data = remote_cli.details(ref)
    else:
        data = _fast_read(lambda c: c.details(ref))  # SQLite without the ORM, when it can (fastread.py)
    if data is None:
        with _reg().session() as s:
            data = catalog.details(s, catalog.resolve(s, ref))
    render.emit_json(data) if as_json else render.artifact_details(data)


@cli.command()
@click.argument("ref")
@click.option("--format", "fmt", type=click.Choice(["json", "sha256sum"]), default="json", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print {digest, manifest, metadata, provenance} as JSON.")
def manifest(ref: str, fmt: str, as_json: bool) -> None:
    """Print an artifact's canonical manifest: its kind and files (its digest is the SHA-256 of these bytes).

    `--format sha256sum` prints lines that `sha256sum -c` accepts inside an exported folder. `--json` adds the
    metadata and provenance, which are not part of the digest.

    \b
    Examples:
      registry manifest llama-7b | sha256sum
      cd ./out && registry manifest llama-7b --format sha256sum | sha256sum -c
      registry manifest llama-7b --json
    """
    if remote.configured():
        extra = remote_cli.manifest(ref)
        data = extra.pop("manifest")
    else:
        with _reg().session() as s:
            artifact = catalog.resolve(s, ref)
            data = catalog.artifact_manifest(artifact)
            extra = {"digest": artifact.digest, "metadata": artifact.meta, "provenance": artifact.provenance}
    if as_json:
        render.emit_json({"manifest": data, **extra})
    elif fmt == "sha256sum":
        click.echo(sha256sum_lines(data), nl=False)
    else:
        # No newline in a pipe, so `registry manifest REF | sha256sum` prints the artifact's digest.
        click.echo(canonical_json(data).decode(), nl=sys.stdout.isatty())


@cli.command()
@click.argument("ref")
@click.argument("dest", type=click.Path(path_type=Path))
@click.option("--copy", is_flag=True, help="Write independent, writable files: reflinks where the file system "
                                           "supports them (no extra space), else copies; never hardlinks.")
@click.option("--ollama", is_flag=True, help="For a GGUF artifact: also write a Modelfile (FROM, TEMPLATE from its "
                                             "chat template, stop tokens, PARAMETERs) for `ollama create`.")
def export(ref: str, dest: Path, copy: bool, ollama: bool) -> None:
    """Write an artifact to a new folder that transformers' from_pretrained loads.

    Each file is a reflink (copy-on-write, on btrfs/xfs) where possible, else a hardlink to the store's
    read-only blob, else a copy. DEST must not exist, or be an empty folder. With --ollama (GGUF artifacts
    only) DEST gets the .gguf file and a Modelfile beside it.

    \b
    Examples:
      registry export llama-7b ./llama-7b
      registry export llama-7b:prod /srv/models/llama --copy
      registry export llama-7b-gguf-q4_k_m ./llama-ollama --ollama && ollama create llama -f ./llama-ollama/Modelfile
    """
    if remote.configured():
        remote_cli.refuse("registry export", "writes from a local store; from a catalog server, download with "
                          "`HF_ENDPOINT=$REGISTRY_URL HF_TOKEN=$REGISTRY_TOKEN hf download REPO --local-dir DEST`")
    if ollama:
        from ..gguf.ollama import export_ollama

        folder = export_ollama(_reg(), ref, dest, copy)
        click.echo(str(folder))
        click.echo(f"make the Ollama model with: ollama create NAME -f {folder / 'Modelfile'}", err=True)
        return
    from ..export import export_artifact

    click.echo(str(export_artifact(_reg(), ref, dest, copy)))


@cli.command()
@click.argument("ref")
@click.option("--json", "as_json", is_flag=True, help="Print {ref, digest, path} as JSON.")
def path(ref: str, as_json: bool) -> None:
    """Print a stable read-only snapshot folder of an artifact (for from_pretrained).

    The folder is <home>/snapshots/<digest>, made once; `registry gc` removes it once no artifact has that
    digest.

    \b
    Examples:
      registry path llama-7b
      python -c "from transformers import AutoModel; AutoModel.from_pretrained('$(registry path llama-7b)')"
      registry path llama-7b --json
    """
    if remote.configured():
        remote_cli.refuse("registry path", "names a folder in a local store; from a catalog server, download with "
                          "`HF_ENDPOINT=$REGISTRY_URL HF_TOKEN=$REGISTRY_TOKEN hf download REPO`")
    from ..export import snapshot_path

    folder = snapshot_path(_reg(), ref)
    if as_json:
        render.emit_json({"ref": ref, "digest": f"sha256:{folder.name}", "path": str(folder)})
    else:
        click.echo(str(folder))


@cli.command()
@click.argument("ref")
@click.argument("tag")
def tag(ref: str, tag: str) -> None:
    """Point TAG (e.g. llama-7b:prod) at an artifact, moving it if it exists.

    \b
    Examples:
      registry tag llama-7b llama-7b:prod
      registry tag sha256:1a2b3c4d llama-7b:prod
    """
    if remote.configured():
        t = remote_cli.set_tag(ref, tag)
        name, digest, previous = t["name"], t["digest"], t["previous"]
    else:
        with _reg().session() as s:
            artifact, previous = catalog.set_tag(s, ref, tag)
            name, digest = artifact.name, artifact.digest
    moved = f" (moved from {previous[:19]})" if previous and previous != digest else ""
    click.echo(f"{tag} -> {name} {digest[:19]}{moved}")


@cli.command()
@click.argument("ref")
@click.option("--force", is_flag=True, help="Remove even though other artifacts derive from it.")
def rm(ref: str, force: bool) -> None:
    """Remove an artifact from the catalog; its blobs are freed by `registry gc`.

    Refused (exit 2) while other artifacts derive from it, unless --force.

    \b
    Examples:
      registry rm llama-7b-old && registry gc
      registry rm llama-7b --force
    """
    if remote.configured():
        removed = remote_cli.remove(ref, force)
        name, digest, tags = removed["name"], removed["digest"], removed["tags"]
    else:
        with _reg().session() as s:
            tags = catalog.tags_of(s, catalog.resolve(s, ref).id)
            artifact = catalog.remove_artifact(s, ref, force)
            name, digest = artifact.name, artifact.digest
    dropped = f" and its tags {', '.join(tags)}" if tags else ""
    click.echo(f"removed {name} {digest[:19]}{dropped}; run registry gc to free its blobs")


@cli.command("link")
@click.argument("child")
@click.argument("parent")
@click.option("--role", type=click.Choice(["base", "adapter"]), default="base", show_default=True,
              help="base: the model CHILD was trained on or made from; adapter: the adapter a merged CHILD holds.")
@click.option("--force", is_flag=True, help="Replace a live parent CHILD is already linked to in this role.")
@json_option
def link_(child: str, parent: str, role: str, force: bool, as_json: bool) -> None:
    """Record that CHILD derives from PARENT (lineage), e.g. an adapter and the base it was trained on.

    A child has one parent per role. Linking again is a no-op; a link to a removed parent is replaced (a base
    removed and imported again); a live one only with --force. Self-links and cycles are refused.

    \b
    Examples:
      registry link my-lora llama-7b --role base
      registry link my-lora llama-7b-v2 --role base --force
      registry link my-lora-merged my-lora --role adapter
    """
    if remote.configured():
        remote_cli.refuse("registry link", "is not offered by a catalog server (lineage is recorded by its jobs)")
    with _reg().session() as s:
        result = catalog.link(s, catalog.resolve(s, child), catalog.resolve(s, parent), role, force)
    if as_json:
        render.emit_json(result.to_dict())
    elif not result.changed:
        click.echo(f"{result.child} -> {result.parent} ({role}) was already linked; nothing changed")
    else:
        click.echo(f"linked {result.child} -> {result.parent} ({role}, {result.parent_digest[:19]})"
                   f"{render.replacing(result.replaced)}")
