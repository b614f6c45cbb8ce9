"""The CPU node image without a registry: a debootstrap Debian base imported into Docker, then the
declared recipe (images/cpu/Dockerfile) built on a builder engine that can reach the package
indexes, saved once as a tarball and loaded on each simulated host.

The tarball is cached under CACHE_DIR keyed by a hash of everything the build reads (recipe,
build context, build args, base rootfs settings), so a re-run skips the build; a fresh machine
builds from scratch.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import json
import os
import re
import socket
import subprocess
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping

from tests.support.docker_hosts import DockerEngine, EngineError
from tests.support.waiting import ProcessDied, WaitFailed, Watched, wait_until

CACHE_DIR = Path(os.environ.get("E2E_IMAGE_CACHE", "/var/cache/vllm-dcu-e2e"))
WHEEL_DIR = Path("/opt/wheels")
TORCH_INDEX_PORT = 39411
DEBIAN_SUITE = "bookworm"
# What a bare debootstrap lacks that `docker build` steps need before their own apt-get.
BASE_PACKAGES = ("ca-certificates",)
# Files in the build context that never change what the image holds.
_CONTEXT_NOISE = re.compile(r"(^|/)(__pycache__|[^/]*\.egg-info|\.pytest_cache)(/|$)|\.pyc$")


def apt_mirror(apt_dir: Path = Path("/etc/apt"), suite: str = DEBIAN_SUITE) -> str:
    """The Debian mirror this machine's apt uses for `suite` (deb822 .sources or sources.list)."""
    candidates: list[tuple[str, list[str]]] = []
    for path in sorted(apt_dir.glob("sources.list.d/*.sources")):
        for stanza in re.split(r"\n\s*\n", path.read_text()):
            fields = {}
            for line in stanza.splitlines():
                key, _, value = line.partition(":")
                if value and not line.startswith(("#", " ", "\t")):
                    fields[key.strip().lower()] = value.strip()
            for uri in fields.get("uris", "").split():
                candidates.append((uri, fields.get("suites", "").split()))
    for path in [apt_dir / "sources.list", *sorted(apt_dir.glob("sources.list.d/*.list"))]:
        if path.exists():
            for line in path.read_text().splitlines():
                words = re.sub(r"\[[^]]*\]", "", line).split()
                if len(words) >= 3 and words[0] == "deb":
                    candidates.append((words[1], [words[2]]))
    for uri, suites in candidates:
        if suite in suites:
            return uri.rstrip("/")
    raise LookupError(f"no apt source for Debian {suite} in {apt_dir}: add one, or set E2E_DEBIAN_MIRROR")


def context_files(context: Path) -> list[Path]:
    return sorted(
        path for path in context.rglob("*")
        if path.is_file() and not _CONTEXT_NOISE.search(path.relative_to(context).as_posix())
    )


def build_key(context: Path, dockerfile: Path, build_args: Mapping[str, str], extra: Mapping[str, str] = {}) -> str:
    """Hash of everything a build reads: context files, recipe, args, and the builder's settings."""
    digest = hashlib.sha256()
    digest.update(json.dumps({"args": dict(build_args), "extra": dict(extra)}, sort_keys=True).encode())
    digest.update(b"\0dockerfile\0" + dockerfile.read_bytes())
    for path in context_files(context):
        digest.update(b"\0" + path.relative_to(context).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:20]


def _run(args: list[str], *, what: str, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kwargs)
    if result.returncode:
        tail = "\n".join(result.stderr.strip().splitlines()[-15:])
        raise EngineError(f"{what} failed ({result.returncode}):\n{tail}")
    return result


def _replace_cached(prefix: str, keep: Path) -> None:
    """Only the newest artifact of a kind stays: each is gigabytes."""
    for old in CACHE_DIR.glob(f"{prefix}*"):
        if old != keep and old.is_file():
            old.unlink()


def debian_base(builder: DockerEngine, *, suite: str = DEBIAN_SUITE) -> str:
    """A Debian `suite` image on `builder` from a debootstrap rootfs (cached as a tarball)."""
    mirror = os.environ.get("E2E_DEBIAN_MIRROR") or apt_mirror(suite=suite)
    key = hashlib.sha256(json.dumps([suite, mirror, BASE_PACKAGES]).encode()).hexdigest()[:12]
    tag = f"vllm-dcu-e2e/debian:{suite}-{key}"
    if builder.docker("image", "inspect", tag, check=False).returncode == 0:
        return tag
    tarball = CACHE_DIR / f"debian-{suite}-{key}.tar"
    if not tarball.exists():
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=CACHE_DIR) as scratch:
            rootfs = Path(scratch) / "rootfs"
            _run(["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}", suite, str(rootfs), mirror],
                 what=f"debootstrap {suite} from {mirror}", timeout=1200)
            partial = Path(scratch) / "rootfs.tar"
            _run(["tar", "--numeric-owner", "--xattrs", "-C", str(rootfs), "-cf", str(partial), "."],
                 what="tar of the rootfs", timeout=600)
            partial.rename(tarball)
        _replace_cached(f"debian-{suite}-", tarball)
    with tarball.open("rb") as stream:
        builder.docker("import", "--change", 'CMD ["/bin/bash"]', "-", tag, stdin=stream, timeout=600)
    return tag


@contextlib.contextmanager
def torch_cpu_index(wheel_dir: Path = WHEEL_DIR) -> Iterator[str]:
    """A PEP 503 index of the CPU torch wheels on this disk, on loopback: the stand-in for
    PyTorch's CPU index (unreachable here), for builds on the host network."""
    wheels = sorted(wheel_dir.glob("torch-*+cpu-*.whl"))
    if not wheels:
        raise FileNotFoundError(f"no CPU torch wheel (torch-*+cpu-*.whl) in {wheel_dir}")
    with tempfile.TemporaryDirectory() as root:
        project = Path(root) / "torch"
        project.mkdir()
        for wheel in wheels:
            (project / wheel.name).symlink_to(wheel)
        links = "".join(f'<a href="{w.name}">{w.name}</a>\n' for w in wheels)
        (project / "index.html").write_text(f"<html><body>\n{links}</body></html>\n")
        handler = functools.partial(_QuietHandler, directory=root)
        # A build argument is part of the builder's cache key: the same port each time keeps the cached
        # torch/vLLM layer when only the runtime changes (any free port when this one is taken).
        try:
            server = http.server.ThreadingHTTPServer(("127.0.0.1", TORCH_INDEX_PORT), handler)
        except OSError:
            server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}/"
        finally:
            server.shutdown()
            server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        pass


@dataclass(frozen=True)
class ImageRecipe:
    """What a declared docker Image build reads.

    `aliases` maps a build-arg value to what it stands for: the base image's pinned reference
    changes with every push to the throwaway registry, the rootfs it names does not.
    """

    context: Path
    dockerfile: Path
    build_args: Mapping[str, str]
    aliases: Mapping[str, str] = field(default_factory=dict)

    def key(self) -> str:
        args = {name: self.aliases.get(value, value) for name, value in self.build_args.items()}
        return build_key(self.context, self.dockerfile, args, {"ca": site_ca_certs()})


def site_ca_certs(directory: Path = Path("/usr/local/share/ca-certificates")) -> str:
    """This machine's local CA certificates (PEM): its TLS egress is inspected with one of them."""
    return "".join(path.read_text() for path in sorted(directory.rglob("*.crt")))


def build_image_tarball(builder: DockerEngine, recipe: ImageRecipe, *, log: Path,
                        timeout: float = 3600) -> tuple[Path, str]:
    """Build `recipe` on `builder` (host network: pip reaches the indexes), save it, cache it.

    Returns the tarball and the tag the image has inside it. The key is taken once: the build
    context may change while the build runs.
    """
    key = recipe.key()
    tarball = CACHE_DIR / f"node-image-{key}.tar"
    tag = f"vllm-dcu-e2e/node:{key}"
    if tarball.exists():
        return tarball, tag
    with torch_cpu_index() as torch_index:
        site = {"PIP_EXTRA_INDEX_URL": torch_index, "EXTRA_CA_CERTS": site_ca_certs()}
        clash = sorted(set(site) & set(recipe.build_args))
        if clash:
            raise EngineError(f"the declared build args set {clash}, which the e2e builder sets itself")
        args = ["build", "--network=host", "-f", str(recipe.dockerfile), "-t", tag]
        for name, value in {**recipe.build_args, **site}.items():
            args += ["--build-arg", f"{name}={value}"]
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as out:
            result = subprocess.run(
                ["docker", "-H", builder.url, *args, str(recipe.context)],
                stdout=out, stderr=subprocess.STDOUT, timeout=timeout,
                env={**os.environ, "DOCKER_BUILDKIT": "0"},
            )
        if result.returncode:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
            raise EngineError(f"building the node image failed (full log: {log}):\n{tail}")
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    partial = tarball.with_suffix(".partial")
    builder.docker("save", "-o", str(partial), tag, timeout=1800)
    partial.rename(tarball)
    _replace_cached("node-image-", tarball)
    # The builder keeps its layers (the next build of a changed runtime reuses them), not old images.
    for old in builder.docker("images", "--format", "{{.Repository}}:{{.Tag}}", "vllm-dcu-e2e/node").stdout.split():
        if old != tag:
            builder.docker("rmi", old, check=False)
    builder.docker("image", "prune", "--force", check=False)
    return tarball, tag


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _listening(address: str) -> bool:
    try:
        socket.create_connection(address.split(":"), timeout=1).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def local_registry(workdir: Path) -> Iterator[str]:
    """Debian's docker-registry on loopback, for the few seconds it takes to pin an image by
    digest (Docker gives an image a digest only when it is pushed); yields host:port."""
    address = f"127.0.0.1:{_free_port()}"
    storage = workdir / "registry"
    storage.mkdir(parents=True, exist_ok=True)
    config = workdir / "registry.yml"
    config.write_text(
        f"version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {storage}\n"
        f"http:\n  addr: {address}\n"
    )
    log = (workdir / "registry.log").open("ab")
    process = subprocess.Popen(["docker-registry", "serve", str(config)], stdin=subprocess.DEVNULL,
                               stdout=log, stderr=log)
    try:
        try:
            wait_until(lambda: _listening(address), timeout=30, what="docker-registry listening",
                       process=Watched(process, "docker-registry", workdir / "registry.log"))
        except (WaitFailed, ProcessDied) as failed:
            raise EngineError(str(failed)) from None
        yield address
    finally:
        process.terminate()
        process.wait(timeout=20)


def pinned_base(builder: DockerEngine, workdir: Path) -> tuple[str, str]:
    """The Debian base on `builder`, as `name@sha256:<digest>` for the stack's `baseImage`,
    and the tag it was imported under (what its content is keyed by)."""
    tag = debian_base(builder)
    with local_registry(workdir) as registry:
        pushed = f"{registry}/{tag}"
        builder.docker("tag", tag, pushed)
        builder.docker("push", pushed, timeout=600)
    digest = builder.docker("image", "inspect", "--format", "{{index .RepoDigests 0}}", tag).stdout.strip()
    return digest, tag
