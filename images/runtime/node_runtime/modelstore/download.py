"""Download a model into the model root: Hugging Face, ModelScope, or adopt a local directory.

Nothing half-written ever sits where a complete model is expected: files land in
`{root}/.staging/{dir}` (kept between runs, so an interrupted download resumes), the manifest
is written there last, and the directory is renamed to `{root}/{dir}` in one step. A per-model
file lock (`{root}/.locks/{dir}.lock`) serialises concurrent downloads of the same model.
An existing `{root}/{dir}` is never overwritten: the same model is reported as present,
anything else is an error that says how to proceed.

Resuming: a file is only ever in staging under its own name once complete; the bytes of the
file in flight stay beside it (Hugging Face: `.partial/{path}.part`, ModelScope: the SDK's own
`{path}.incomplete`) and the next attempt asks the hub for the rest with an HTTP Range request —
after a broken connection within a run, and after a killed run. `.partial/origin.json` records
what the staging directory is a download of (source, repository, resolved revision, patterns):
a staging directory left by a download of anything else is discarded, never mixed in.

Endpoints (mirrors): `hf_endpoint` / `modelscope_endpoint`, else the SDK's own environment
variable read when the download starts (HF_ENDPOINT, MODELSCOPE_ENDPOINT), else the public hub.
"""

from __future__ import annotations

import fnmatch
import importlib
import os
import re
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from filelock import FileLock, Timeout
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from node_runtime.modelstore.manifest import ManifestError, atomic_write_bytes, read_manifest, verify_against, write_manifest
from node_runtime.modelstore.store import LOCKS_DIR, PARTIAL_DIR, STAGING_DIR, ModelStoreError, human_size

SOURCES = ("huggingface", "modelscope", "local")
HF_ENDPOINT_ENV = "HF_ENDPOINT"
MODELSCOPE_ENDPOINT_ENV = "MODELSCOPE_ENDPOINT"
MODELSCOPE_TOKEN_ENV = "MODELSCOPE_API_TOKEN"
ORIGIN_FILE = "origin.json"
HF_PARALLEL_FILES = 8
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
    hf_endpoint: str | None = None
    modelscope_endpoint: str | None = None

    @property
    def dir_name(self) -> str:
        return model_dir_name(self.repo_id, self.name)


class Origin(BaseModel):
    """What a staging directory is a download of; bytes of another origin are never reused."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    source: str
    repo_id: str
    revision: str = Field(description="as resolved: the commit on Hugging Face, the branch or tag on ModelScope")
    allow: tuple[str, ...]
    ignore: tuple[str, ...]
    local_dir: str | None = None

    @classmethod
    def of(cls, request: DownloadRequest, revision: str) -> Origin:
        local_dir = str(request.local_dir.absolute()) if request.local_dir else None
        return cls(source=request.source, repo_id=request.repo_id, revision=revision, allow=tuple(request.allow),
                   ignore=tuple(request.ignore), local_dir=local_dir)


def claim_staging(staging: Path, origin: Origin) -> None:
    """Make `staging` the download of `origin`: keep what it holds if it is, start over if not."""
    marker = staging / PARTIAL_DIR / ORIGIN_FILE
    try:
        held = Origin.model_validate_json(marker.read_bytes())
    except (OSError, ValidationError):
        held = None
    if held != origin and staging.exists():
        if held or any(staging.iterdir()):
            print(f"starting over: {staging} held an unfinished download of something else", file=sys.stderr)
        shutil.rmtree(staging)
    marker.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(marker, origin.model_dump_json().encode())


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
        shutil.rmtree(staging / PARTIAL_DIR, ignore_errors=True)
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
    claim_staging(staging, Origin.of(request, request.revision or "local"))
    needed = sum(f.stat().st_size for f in source.rglob("*") if f.is_file())
    check_free_disk(staging.parent, needed)
    try:
        shutil.copytree(source, staging, dirs_exist_ok=True, symlinks=False)
    except PermissionError as exc:
        raise ModelStoreError(f"permission denied copying {source}: {exc.filename or exc}") from None
    return request.revision or "local"


def hf_endpoint(request: DownloadRequest) -> str:
    """The Hugging Face endpoint of this download, read now: huggingface_hub reads HF_ENDPOINT once, at import."""
    from huggingface_hub import constants

    return (request.hf_endpoint or os.environ.get(HF_ENDPOINT_ENV) or constants.ENDPOINT).rstrip("/")


def _fetch_huggingface(request: DownloadRequest, staging: Path) -> str:
    """Download with huggingface_hub into `staging`; returns the commit the revision resolved to.

    Works with huggingface_hub 0.30 (on requests: what transformers 4.x, in the vendor images, pins
    below 1.0) up to 2.x (on httpx2). The revision is resolved and the files listed and chosen as
    snapshot_download does (its tree listing, its allow/ignore rules); each file then comes through
    its `http_get`, into `.partial/{path}.part`, which a later run continues, and is moved to its
    place once whole. A connection broken mid-file is resumed from the bytes kept (`http_get` writes
    10 MiB at a time): by `http_get` itself in 2.x, here for what it gives up on (0.x: any break
    mid-body). The token comes only from the environment (`HF_TOKEN`, read by huggingface_hub itself).
    """
    from huggingface_hub import HfApi, hf_hub_url
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError
    from huggingface_hub.file_download import http_get
    from huggingface_hub.hf_api import RepoFile
    from huggingface_hub.utils import build_hf_headers, filter_repo_objects

    endpoint = hf_endpoint(request)
    revision = request.revision or "main"
    api = HfApi(endpoint=endpoint)
    broken = hf_connection_errors()
    try:
        commit = api.repo_info(request.repo_id, revision=revision).sha
        claim_staging(staging, Origin.of(request, commit))
        listed = [f for f in api.list_repo_tree(request.repo_id, revision=commit, recursive=True) if isinstance(f, RepoFile)]
        planned = list(filter_repo_objects(listed, allow_patterns=request.allow or None,
                                           ignore_patterns=request.ignore or None, key=lambda f: f.path))
        if not planned:
            raise ModelStoreError(f"no files of {request.repo_id}@{revision} match --allow/--ignore; check the patterns")
        wanted = [(f.path, f.size) for f in planned if not _is_whole(staging / f.path, f.size)]
        check_free_disk(staging.parent, sum((size or 0) - _partial_bytes(staging, path) for path, size in wanted))
        headers = build_hf_headers()

        def fetch(path: str, size: int | None) -> None:
            partial = staging / PARTIAL_DIR / f"{path}.part"
            partial.parent.mkdir(parents=True, exist_ok=True)
            url = hf_hub_url(request.repo_id, path, revision=commit, endpoint=endpoint)
            with partial.open("ab") as out:
                while True:
                    held = out.tell()
                    try:
                        http_get(url, out, resume_size=held, headers=headers, expected_size=size, displayed_filename=path)
                        break
                    except broken:
                        if out.tell() == held:  # this try brought nothing: the hub is out of reach
                            raise
            (staging / path).parent.mkdir(parents=True, exist_ok=True)
            os.replace(partial, staging / path)

        # As many files at once as snapshot_download fetches (its max_workers).
        with ThreadPoolExecutor(HF_PARALLEL_FILES) as pool:
            for done in [pool.submit(fetch, path, size) for path, size in wanted]:
                done.result()
    except RevisionNotFoundError:
        raise ModelStoreError(f"revision {revision!r} not found in {request.repo_id} on {endpoint}; check --revision") from None
    except GatedRepoError:
        raise ModelStoreError(f"{request.repo_id} is gated on {endpoint}: accept its terms there and set HF_TOKEN to a token with access") from None
    except RepositoryNotFoundError:
        raise _not_found(request, endpoint, token_variable="HF_TOKEN") from None
    except broken as exc:
        raise _unreachable(endpoint, exc, endpoint_option="--hf-endpoint") from None
    except HfHubHTTPError as exc:
        raise ModelStoreError(f"download of {request.repo_id} from {endpoint} failed: {_first_line(exc)}") from None
    except PermissionError as exc:
        raise ModelStoreError(f"permission denied writing {exc.filename}") from None
    return commit


def hf_connection_errors() -> tuple[type[Exception], ...]:
    """What huggingface_hub's HTTP client raises for a connection refused, timed out or broken mid-body:
    requests' (huggingface_hub before 1.0), httpx's (1.x) or httpx2's (2.x), whichever it is built on."""
    from huggingface_hub.utils import get_session

    client = importlib.import_module(type(get_session()).__module__.partition(".")[0])
    if client.__name__ == "requests":
        return client.ConnectionError, client.exceptions.ChunkedEncodingError, client.Timeout
    return (client.TransportError,)


def _is_whole(path: Path, size: int | None) -> bool:
    """Whether a file of this download is in place (only whole files ever are: see `claim_staging`)."""
    return path.is_file() and (size is None or path.stat().st_size == size)


def _partial_bytes(staging: Path, path: str) -> int:
    partial = staging / PARTIAL_DIR / f"{path}.part"
    return partial.stat().st_size if partial.is_file() else 0


def _fetch_modelscope(request: DownloadRequest, staging: Path) -> str:
    """Download with the modelscope SDK's own `snapshot_download` (optional dependency); returns the revision.

    ModelScope revisions are branches and tags (its SDK checks them against the repository's
    list, as done here): pin a tag. The SDK resumes by itself: a file in flight is
    `{path}.incomplete` beside its place, continued with a Range request after a broken
    connection and by a later run; a whole file is checked against the listing's SHA-256.
    """
    try:
        from modelscope.hub.api import HubApi
        from modelscope.hub.snapshot_download import snapshot_download
        from modelscope_hub.errors import HubError, NetworkError, NotExistError
        from requests import RequestException
    except ImportError:
        raise ModelStoreError(
            "--source modelscope needs the modelscope package: pip install 'node-runtime[modelscope]'"
        ) from None
    revision = request.revision or "master"
    # The SDK reads MODELSCOPE_ENDPOINT and MODELSCOPE_API_TOKEN itself; passing both keeps it
    # from probing its public sites for the repository, and names the endpoint in errors.
    api = HubApi(endpoint=request.modelscope_endpoint or None, token=os.environ.get(MODELSCOPE_TOKEN_ENV) or None)
    endpoint = api.endpoint
    try:
        branches, tags = api.get_model_branches_and_tags(request.repo_id)
        if revision not in branches + tags:
            raise ModelStoreError(f"revision {revision!r} not found in {request.repo_id} on {endpoint} "
                                  f"(branches: {', '.join(branches) or '-'}; tags: {', '.join(tags) or '-'}); check --revision")
        claim_staging(staging, Origin.of(request, revision))
        files = [f for f in api.get_model_files(request.repo_id, revision=revision, recursive=True)
                 if _selected(f["Path"], request.allow, request.ignore)]
        if not files:
            raise ModelStoreError(f"no files of {request.repo_id}@{revision} match --allow/--ignore; check the patterns")
        incomplete = (staging / f"{f['Path']}.incomplete" for f in files)
        check_free_disk(staging.parent, sum(f.get("Size") or 0 for f in files if not _is_whole(staging / f["Path"], f.get("Size")))
                        - sum(p.stat().st_size for p in incomplete if p.is_file()))
        snapshot_download(
            request.repo_id, revision=revision, local_dir=str(staging), cache_dir=str(staging / ".cache" / "modelscope"),
            allow_patterns=request.allow or None, ignore_patterns=request.ignore or None,
            endpoint=endpoint, token=api.token,
        )
    except NotExistError:
        raise _not_found(request, endpoint, token_variable="MODELSCOPE_API_TOKEN") from None
    except NetworkError as exc:
        raise _unreachable(endpoint, exc, endpoint_option="--modelscope-endpoint") from None
    except (HubError, RequestException) as exc:
        raise ModelStoreError(f"ModelScope download of {request.repo_id}@{revision} from {endpoint} failed: {_first_line(exc)}") from None
    except PermissionError as exc:
        raise ModelStoreError(f"permission denied writing {exc.filename}") from None
    return revision


def _selected(path: str, allow: list[str], ignore: list[str]) -> bool:
    """The SDK's rule for --allow/--ignore: shell globs on the path in the repository."""
    return (not allow or any(fnmatch.fnmatch(path, p) for p in allow)) and not any(fnmatch.fnmatch(path, p) for p in ignore)


def _not_found(request: DownloadRequest, endpoint: str, *, token_variable: str) -> ModelStoreError:
    return ModelStoreError(f"repository {request.repo_id} not found on {endpoint}; check --repo-id, and if it is private "
                           f"set {token_variable} in the environment")


def _unreachable(endpoint: str, error: Exception, *, endpoint_option: str) -> ModelStoreError:
    return ModelStoreError(f"cannot download from {endpoint} ({type(error).__name__}); check the network, or set "
                           f"{endpoint_option} to a reachable mirror")


def _first_line(exc: Exception) -> str:
    return str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__
