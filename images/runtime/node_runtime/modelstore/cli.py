"""`node-runtime model`: download, verify, distribute, list and remove models under the model root.

Exit codes: 0 ok, 1 a failed check or operation (one line saying what to do), 2 bad usage
(node_runtime/errors.py). Tokens only from the environment: HF_TOKEN (HF_ENDPOINT selects a
mirror), MODELSCOPE_API_TOKEN.
"""

from __future__ import annotations

import enum
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from node_runtime.errors import exits_cleanly
from node_runtime.modelstore.download import DownloadRequest, download as run_download
from node_runtime.modelstore.manifest import verify_manifest
from node_runtime.modelstore.store import ModelStoreError, human_size, list_models, remove_model
from node_runtime.modelstore.sync.receiver import receive
from node_runtime.modelstore.sync.sender import SyncProgress, sync as run_sync
from node_runtime.modelstore.sync.transport import EventWriter, Node, SshSettings, relay_agent

app = typer.Typer(no_args_is_help=True, help=__doc__, add_completion=False)
fails_cleanly = exits_cleanly(on_interrupt="interrupted; run the same command again to resume")


class Source(str, enum.Enum):
    huggingface = "huggingface"
    modelscope = "modelscope"
    local = "local"


class HashMode(str, enum.Enum):
    none = "none"
    sample = "sample"
    full = "full"


ModelDirArg = Annotated[Path, typer.Argument(help="The model directory, e.g. /data/models/Llama-3-8B-Instruct.")]
ModelRootOpt = Annotated[Path, typer.Option("--model-root", help="Directory holding one sub-directory per model.")]
HashOpt = Annotated[HashMode, typer.Option("--hash", help="Content check besides sizes: none, sample (a few MiB per file) or full.")]
RemoteExecOpt = Annotated[str, typer.Option("--remote-exec", help="Prefix that runs node-runtime on a node, e.g. 'docker run --rm -i -v /models:/models IMAGE'; empty: node-runtime on the node's PATH.")]
SshConfigOpt = Annotated[Optional[Path], typer.Option("--ssh-config", help="ssh_config file (ssh -F) used for every hop; it must exist at that path on the nodes too.")]


def _endpoint(value: Optional[str]) -> Optional[str]:
    """An endpoint option: an http(s) URL; empty means the default."""
    if not value:
        return None
    if not value.startswith(("http://", "https://")):
        raise typer.BadParameter(f"{value!r} is not an http:// or https:// URL")
    return value.rstrip("/")


@app.command()
@fails_cleanly
def download(
    repo_id: Annotated[str, typer.Option("--repo-id", help="Repository id, e.g. meta-llama/Llama-3-8B-Instruct.")],
    model_root: ModelRootOpt,
    source: Annotated[Source, typer.Option("--source", help="Where the model comes from.")] = Source.huggingface,
    revision: Annotated[Optional[str], typer.Option("--revision", help="Commit, branch or tag (pin a commit).")] = None,
    name: Annotated[Optional[str], typer.Option("--name", help="Directory name under the model root (default: the repo's base name).")] = None,
    allow: Annotated[Optional[list[str]], typer.Option("--allow", help="Only files matching this glob (repeatable).")] = None,
    ignore: Annotated[Optional[list[str]], typer.Option("--ignore", help="Skip files matching this glob (repeatable).")] = None,
    local_dir: Annotated[Optional[Path], typer.Option("--local-dir", help="With --source local: the directory to adopt.")] = None,
    hf_endpoint: Annotated[Optional[str], typer.Option("--hf-endpoint", callback=_endpoint, help="Hugging Face endpoint or mirror, e.g. https://hf-mirror.com (default: $HF_ENDPOINT, else https://huggingface.co).")] = None,
    modelscope_endpoint: Annotated[Optional[str], typer.Option("--modelscope-endpoint", callback=_endpoint, help="ModelScope endpoint or mirror (default: $MODELSCOPE_ENDPOINT, else https://modelscope.cn).")] = None,
) -> None:
    """Download a model into MODEL_ROOT/NAME, complete with its manifest (resumes an interrupted run).

    Each endpoint option applies to its own source only, so both may always be given.
    """
    if local_dir is not None and source is not Source.local:
        raise typer.BadParameter("--local-dir only goes with --source local", param_hint="--local-dir")
    if source is Source.local and local_dir is None:
        raise typer.BadParameter("--source local needs --local-dir PATH (the directory to adopt)", param_hint="--local-dir")
    result = run_download(DownloadRequest(
        source=source.value, repo_id=repo_id, model_root=model_root, revision=revision, name=name,
        allow=allow or [], ignore=ignore or [], local_dir=local_dir,
        hf_endpoint=hf_endpoint, modelscope_endpoint=modelscope_endpoint,
    ))
    state = "already present" if result.already_present else "downloaded"
    typer.echo(f"{state}: {result.path} ({repo_id}@{result.revision}, {human_size(result.size)})")


@app.command()
@fails_cleanly
def verify(model_dir: ModelDirArg, hash: HashOpt = HashMode.sample) -> None:
    """Check a model directory against its manifest; one line per missing or corrupt file."""
    report = verify_manifest(model_dir, hash.value)
    for problem in report.problems:
        typer.echo(problem)
    if not report.ok:
        typer.echo(f"error: {model_dir} failed verification ({len(report.problems)} problem(s))", err=True)
        raise typer.Exit(1)
    typer.echo(f"ok: {model_dir} ({report.files_checked} files, {human_size(report.bytes_checked)}, hash {hash.value})")


@app.command()
@fails_cleanly
def sync(
    model_dir: ModelDirArg,
    node: Annotated[list[str], typer.Option("--node", help="USER@HOST[:PORT] of a worker (repeatable).")],
    identity: Annotated[Optional[Path], typer.Option("--identity", help="The relay key; loaded into a private ssh-agent and forwarded along the chain, never copied.")] = None,
    remote_exec: RemoteExecOpt = "",
    ssh_config: SshConfigOpt = None,
    hash: HashOpt = HashMode.sample,
) -> None:
    """Copy MODEL_DIR to the same absolute path on every node along a relay chain, verify it there."""
    try:
        nodes = [Node.parse(spec) for spec in node]
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--node") from None
    if len({n.spec for n in nodes}) != len(nodes):
        raise typer.BadParameter("a node is listed twice", param_hint="--node")
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    with relay_agent(identity) as agent_socket, Progress(
        TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
        console=Console(stderr=True),
    ) as bars:
        tasks: dict[str, int] = {}
        hooks = SyncProgress(
            started=lambda n, total: tasks.__setitem__(n, bars.add_task(n, total=total)),
            advanced=lambda n, done: bars.update(tasks[n], completed=done) if n in tasks else None,
        )
        settings = SshSettings(remote_exec=remote_exec, ssh_config=ssh_config, agent_socket=agent_socket)
        results = run_sync(model_dir, nodes, settings, hash.value, hooks)
    for result in results:
        typer.echo(str(result))
    failed = [r.node for r in results if not r.ok]
    if failed:
        raise ModelStoreError(f"sync of {model_dir} failed on {', '.join(failed)}; fix them and run the sync again (it resumes)")



@app.command("list")
@fails_cleanly
def list_command(model_root: ModelRootOpt, as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False) -> None:
    """List the models under MODEL_ROOT: id, source, revision, size, complete or not."""
    rows = list_models(model_root)
    if as_json:
        typer.echo(json.dumps([r.model_dump() for r in rows], indent=1))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("name", "id", "source", "revision", "size", "status", box=None)
    for r in rows:
        table.add_row(r.name, r.id or "-", r.source or "-", (r.revision or "-")[:12], human_size(r.size or 0), r.status)
    Console(width=200).print(table)


@app.command()
@fails_cleanly
def remove(model_dir: ModelDirArg, yes: Annotated[bool, typer.Option("--yes", help="Really delete the model's files.")] = False) -> None:
    """Delete a model directory — the only command that deletes model files."""
    if not yes:
        raise typer.BadParameter(f"removing {model_dir} deletes its files; pass --yes to confirm", param_hint="--yes")
    remove_model(model_dir)
    typer.echo(f"removed: {model_dir}")


@app.command("_receive", hidden=True)
def receive_command(
    model_dir: ModelDirArg,
    me: Annotated[str, typer.Option("--as")],
    next_nodes: Annotated[Optional[list[str]], typer.Option("--next")] = None,
    remote_exec: RemoteExecOpt = "",
    ssh_config: SshConfigOpt = None,
    hash: HashOpt = HashMode.sample,
) -> None:
    """Node side of sync: answer what this node lacks, relay the stream to --next, keep what it lacks; events on stdout."""
    settings = SshSettings(remote_exec=remote_exec, ssh_config=ssh_config, agent_socket=os.environ.get("SSH_AUTH_SOCK"))
    chain = [Node.parse(spec) for spec in next_nodes or []]
    ok = receive(Path(os.path.abspath(model_dir)), me, chain, settings, hash.value, sys.stdin.buffer, EventWriter(sys.stdout.buffer))
    raise typer.Exit(0 if ok else 1)


if __name__ == "__main__":
    app()
