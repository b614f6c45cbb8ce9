"""The model root: its layout, what lies in it, and the one way to delete a model.

`{root}/{dir}` is a model once its manifest is there (manifest.py). Work in progress lives
beside it: `{root}/.staging/{dir}` holds a download until it is complete, `{root}/.locks/`
the per-model download locks, `{dir}/.partial/` the files a sync is still receiving.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from pydantic import BaseModel, Field

from node_runtime.errors import Failure
from node_runtime.modelstore.manifest import MANIFEST_NAME, ManifestError, read_manifest, verify_against

STAGING_DIR = ".staging"
LOCKS_DIR = ".locks"
PARTIAL_DIR = ".partial"


class ModelStoreError(Failure):
    """A failure with a message that says what happened and what to do."""


def human_size(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


class StoredModel(BaseModel):
    """One directory under the model root, complete or not (a row of `node-runtime model list`)."""

    name: str
    path: str
    id: str | None = Field(None, description="repository id, from the manifest")
    source: str | None = Field(None, description="huggingface, modelscope or local, from the manifest")
    revision: str | None = Field(None, description="from the manifest")
    size: int | None = Field(None, description="bytes: the manifest's total, else what the directory holds")
    complete: bool = False
    status: str


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def describe_model(path: Path, in_staging: bool = False) -> StoredModel:
    try:
        manifest = read_manifest(path)
    except ManifestError:
        status = "downloading (incomplete)" if in_staging else "no manifest (incomplete)"
        return StoredModel(name=path.name, path=str(path), size=_dir_size(path), status=status)
    report = verify_against(path, manifest, "none")
    return StoredModel(
        name=path.name, path=str(path), id=manifest.repo_id, source=manifest.source, revision=manifest.revision,
        size=manifest.total_size, complete=report.ok, status="complete" if report.ok else f"damaged: {report.problems[0]}",
    )


def list_models(model_root: Path) -> list[StoredModel]:
    """Every model directory under `model_root`, then the downloads still in staging."""
    if not model_root.is_dir():
        raise ModelStoreError(f"model root {model_root} does not exist")
    found = [describe_model(p) for p in sorted(model_root.iterdir()) if p.is_dir() and not p.name.startswith(".")]
    staging = model_root / STAGING_DIR
    if staging.is_dir():
        found += [describe_model(p, in_staging=True) for p in sorted(staging.iterdir()) if p.is_dir()]
    return found


def remove_model(model_dir: Path) -> None:
    """Delete a model directory, or the leftovers of an interrupted download or sync — nothing else."""
    if not model_dir.is_dir():
        raise ModelStoreError(f"{model_dir} is not a directory")
    leftover = (model_dir / PARTIAL_DIR).is_dir() or model_dir.parent.name == STAGING_DIR
    if not (model_dir / MANIFEST_NAME).is_file() and not leftover:
        raise ModelStoreError(f"{model_dir} is not a model directory (no {MANIFEST_NAME}); refusing to delete it — remove it yourself if you mean to")
    try:
        # The manifest goes first: a half-removed directory must not look like a model.
        (model_dir / MANIFEST_NAME).unlink(missing_ok=True)
        shutil.rmtree(model_dir)
    except PermissionError as exc:
        raise ModelStoreError(f"permission denied removing {exc.filename}") from None
