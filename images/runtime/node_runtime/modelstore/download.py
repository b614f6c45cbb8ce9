"""Download a model into the model root: Hugging Face, ModelScope, or adopt a local directory.

Nothing half-written ever sits where a complete model is expected: files land in
`{root}/.staging/{dir}` (kept between runs, so an interrupted download resumes), the manifest
is written there last, and the directory is renamed to `{root}/{dir}` in one step. A per-model
file lock (`{root}/.locks/{dir}.lock`) serialises concurrent downloads of the same model.
An existing `{root}/{dir}` is never overwritten: the same model is reported as present,
anything else is an error that says how to proceed.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from filelock import FileLock, Timeout

from node_runtime.modelstore.manifest import ManifestError, read_manifest, verify_against, write_manifest
from node_runtime.modelstore.store import LOCKS_DIR, STAGING_DIR, ModelStoreError, human_size

SOURCES = ("huggingface", "modelscope", "local")
# Room left free beyond the model itself, for the manifest, filesystem overhead and the OS.
FREE_DISK_MARGIN = 64 << 20


@dataclass
class DownloadRequest:
    source: str
    repo_id: str
    model_root: Path
    revision: str | None = None
    name: str | None = None
    allow: list[str] = field(default_factory=list)
    ignore: list[str] = field(default_factory=list)
    local_dir: Path | None = None

    @property
    def dir_name(self) -> str:
        return model_dir_name(self.repo_id, self.name)


@dataclass
class DownloadResult:
    path: Path
    revision: str
    size: int
    already_present: bool


def model_dir_name(repo_id: str, name: str | None = None) -> str:
    """`meta-llama/Llama-3-8B-Instruct` → `Llama-3-8B-Instruct`, unless a name is given."""
    dir_name = name or repo_id.rstrip("/").rsplit("/", 1)[-1]
    if not dir_name or "/" in dir_name or dir_name.startswith(".") or dir_name in ("..",):
        raise ModelStoreError(f"invalid model directory name {dir_name!r}: use a plain name without '/' or a leading '.' (--name)")
    return dir_name


def check_free_disk(path: Path, needed: int) -> None:
    free = shutil.disk_usage(path).free
    if needed + FREE_DISK_MARGIN > free:
        raise ModelStoreError(
            f"not enough free disk at {path}: the download needs {human_size(needed)} "
            f"(+{human_size(FREE_DISK_MARGIN)} margin), {human_size(free)} free; free space or choose another --model-root"
        )


def prepare_root(model_root: Path) -> None:
    try:
        for sub in (model_root, model_root / STAGING_DIR, model_root / LOCKS_DIR):
            sub.mkdir(parents=True, exist_ok=True)
        if not os.access(model_root / STAGING_DIR, os.W_OK):
            raise PermissionError
    except PermissionError:
        raise ModelStoreError(
            f"permission denied writing to model root {model_root}: run as a user that may write there, or choose another --model-root"
        ) from None


def download(request: DownloadRequest) -> DownloadResult:
    if request.source not in SOURCES:
        raise ModelStoreError(f"unknown source {request.source!r}: use one of {', '.join(SOURCES)} (--source)")
    model_root = request.model_root.absolute()
    target = model_root / request.dir_name
    if request.source == "local" and request.local_dir is not None and request.local_dir.absolute() == target:
        return _adopt_in_place(request, target)
    prepare_root(model_root)
    lock = FileLock(model_root / LOCKS_DIR / f"{request.dir_name}.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"waiting for another download of {request.dir_name} to finish ...", file=sys.stderr)
        lock.acquire()
    try:
        present = _existing_model(request, target)
        if present:
            return present
        staging = model_root / STAGING_DIR / request.dir_name
        fetch = {"huggingface": _fetch_huggingface, "modelscope": _fetch_modelscope, "local": _fetch_local}[request.source]
        revision = fetch(request, staging)
        # A second look after the (possibly long) fetch: the lock covers us, but not a user's `mv`.
        if target.exists():
            raise ModelStoreError(f"{target} appeared during the download; the new copy stays in {staging}")
        manifest = write_manifest(staging, source=request.source, repo_id=request.repo_id, revision=revision)
        os.rename(staging, target)
        return DownloadResult(target, revision, manifest.total_size, already_present=False)
    finally:
        lock.release()


def _existing_model(request: DownloadRequest, target: Path) -> DownloadResult | None:
    """The model already at `target` if it is this one (complete), or an error if it is anything else."""
    if not target.exists():
        return None
    try:
        manifest = read_manifest(target)
    except ManifestError:
        raise ModelStoreError(
            f"{target} exists but is not a complete model (no manifest); adopt it with `--source local --local-dir {target}`, "
            f"remove it with `node-runtime model remove {target} --yes`, or choose another --name"
        ) from None
    # A branch or tag name matches whatever commit is present (checking would need the hub, which
    # an air-gapped re-run may not reach); pin a commit to make the check exact.
    same_revision = (
        request.revision is None
        or manifest.revision == request.revision
        or (re.fullmatch(r"[0-9a-f]{7,40}", request.revision) is None and request.source != "local")
        or manifest.revision.startswith(request.revision)
    )
    if manifest.repo_id != request.repo_id or not same_revision:
        raise ModelStoreError(
            f"{target} already holds {manifest.repo_id}@{manifest.revision}; remove it with "
            f"`node-runtime model remove {target} --yes` or choose another --name"
        )
    report = verify_against(target, manifest, "none")
    if not report.ok:
        raise ModelStoreError(f"{target} holds {manifest.repo_id} but fails verification ({report.problems[0]}); "
                              f"remove it with `node-runtime model remove {target} --yes` and download again")
    return DownloadResult(target, manifest.revision, manifest.total_size, already_present=True)


def _adopt_in_place(request: DownloadRequest, target: Path) -> DownloadResult:
    if not target.is_dir():
        raise ModelStoreError(f"--local-dir {target} is not a directory")
    try:
        manifest = read_manifest(target)
        return DownloadResult(target, manifest.revision, manifest.total_size, already_present=True)
    except ManifestError:
        pass
    revision = request.revision or "local"
    try:
        manifest = write_manifest(target, source="local", repo_id=request.repo_id, revision=revision)
    except PermissionError as exc:
        raise ModelStoreError(f"permission denied adopting {target}: {exc.filename or exc}") from None
    return DownloadResult(target, revision, manifest.total_size, already_present=False)


def _fetch_local(request: DownloadRequest, staging: Path) -> str:
    source = request.local_dir
    if source is None:
        raise ModelStoreError("--source local needs --local-dir PATH (the directory to adopt)")
    if not source.is_dir():
        raise ModelStoreError(f"--local-dir {source} is not a directory")
    needed = sum(f.stat().st_size for f in source.rglob("*") if f.is_file())
    check_free_disk(staging.parent, needed)
    try:
        shutil.copytree(source, staging, dirs_exist_ok=True, symlinks=False)
    except PermissionError as exc:
        raise ModelStoreError(f"permission denied copying {source}: {exc.filename or exc}") from None
    return request.revision or "local"


def _fetch_huggingface(request: DownloadRequest, staging: Path) -> str:
    """Download with huggingface_hub into `staging`; returns the commit the revision resolved to.

    The token comes only from the environment (`HF_TOKEN`, read by huggingface_hub itself);
    `HF_ENDPOINT` selects a mirror. huggingface_hub keeps partial files in
    `staging/.cache/huggingface/` and resumes them with HTTP range requests.
    """
    import httpx
    from huggingface_hub import HfApi, constants, snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    endpoint = constants.ENDPOINT
    revision = request.revision or "main"
    patterns = {"allow_patterns": request.allow or None, "ignore_patterns": request.ignore or None}
    try:
        commit = HfApi().repo_info(request.repo_id, revision=revision).sha
        planned = snapshot_download(request.repo_id, revision=commit, local_dir=staging, dry_run=True, **patterns)
        if not planned:
            raise ModelStoreError(f"no files of {request.repo_id}@{revision} match --allow/--ignore; check the patterns")
        check_free_disk(staging.parent, sum(f.file_size or 0 for f in planned if f.will_download))
        snapshot_download(request.repo_id, revision=commit, local_dir=staging, **patterns)
    except RevisionNotFoundError:
        raise ModelStoreError(f"revision {revision!r} not found in {request.repo_id} on {endpoint}; check --revision") from None
    except GatedRepoError:
        raise ModelStoreError(f"{request.repo_id} is gated on {endpoint}: accept its terms there and set HF_TOKEN to a token with access") from None
    except RepositoryNotFoundError:
        raise ModelStoreError(
            f"repository {request.repo_id} not found on {endpoint}; check --repo-id, and if it is private set HF_TOKEN in the environment"
        ) from None
    except (LocalEntryNotFoundError, httpx.TransportError) as exc:
        raise ModelStoreError(f"cannot download from {endpoint} ({type(exc).__name__}); check the network, or set HF_ENDPOINT to a reachable mirror") from None
    except HfHubHTTPError as exc:
        raise ModelStoreError(f"download of {request.repo_id} from {endpoint} failed: {str(exc).splitlines()[0]}") from None
    except PermissionError as exc:
        raise ModelStoreError(f"permission denied writing {exc.filename}") from None
    return commit


def _fetch_modelscope(request: DownloadRequest, staging: Path) -> str:
    """Download with the modelscope package's own `snapshot_download` (optional dependency)."""
    try:
        from modelscope.hub.api import HubApi
        from modelscope.hub.snapshot_download import snapshot_download
    except ImportError:
        raise ModelStoreError(
            "--source modelscope needs the modelscope package: pip install 'node-runtime[modelscope]'"
        ) from None
    revision = request.revision or "master"
    api = HubApi()
    token = os.environ.get("MODELSCOPE_API_TOKEN")
    try:
        if token:
            api.login(token)
        files = api.get_model_files(request.repo_id, revision=revision, recursive=True)
        check_free_disk(staging.parent, sum(f.get("Size", 0) for f in files if f.get("Type") != "tree"))
        snapshot_download(
            request.repo_id, revision=revision, local_dir=str(staging),
            allow_patterns=request.allow or None, ignore_patterns=request.ignore or None,
        )
    except ModelStoreError:
        raise
    except Exception as exc:  # modelscope raises plain exceptions (HTTPError, ValueError, NotExistError ...)
        raise ModelStoreError(f"ModelScope download of {request.repo_id}@{revision} failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    return revision
