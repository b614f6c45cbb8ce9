"""The applier's replacements with real containers and commands: small programs applied one after
the other to a simulated host (its own sshd and Docker engine), checked against the engine's own
record (`docker events`) and a journal the commands write on the host with what runs there.

The shape the rolling update uses is here in small: container `a`, its gate (a command replaced
with it: its `triggers` hold the container's id), container `b` after that gate. Needs root.
"""

from __future__ import annotations

import hashlib
import re
import shlex
import shutil
import subprocess
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import pulumi
import pulumi_command as command
import pulumi_docker as docker
import pytest

from tests.e2e.apply import Applier, Site, apply
from tests.support.docker_hosts import DockerCluster, DockerEngine, docker_hosts

pytestmark = pytest.mark.slow

SUBNET, PREFIX = "10.80.0.0/24", "apl"
JOURNALS = "/srv/apl"  # private to the host


def tiny_image(engine: DockerEngine, workdir: Path) -> str:
    """An image of this machine's `sh` and `sleep` with the libraries they load (a few MB, imported
    in a second), tagged by its content: an engine that has it already skips the import."""
    files: dict[str, Path] = {}
    for binary in ("sh", "sleep"):
        executable = Path(shutil.which(binary)).resolve()
        files[f"bin/{binary}"] = executable
        ldd = subprocess.run(["ldd", str(executable)], capture_output=True, text=True, check=True).stdout
        for library in re.findall(r"(/\S+) \(0x", ldd):
            files[library.lstrip("/")] = Path(library).resolve()
    digest = hashlib.sha256()
    for name, path in sorted(files.items()):
        digest.update(name.encode() + b"\0" + path.read_bytes())
    tag = f"apl/tiny:{digest.hexdigest()[:12]}"
    if engine.docker("image", "inspect", tag, check=False).returncode:
        tarball = workdir / "tiny.tar"
        with tarfile.open(tarball, "w") as tar:
            for name, path in sorted(files.items()):
                tar.add(path, arcname=name)
        with tarball.open("rb") as stream:
            engine.docker("import", "-", tag, stdin=stream)
    return tag


@dataclass
class Host:
    cluster: DockerCluster
    image: str
    workdir: Path

    @property
    def node(self):
        return self.cluster.hosts[0]

    def docker(self, *args: str) -> str:
        return self.cluster.docker(self.node, *args).stdout

    def applier(self, tag: str) -> Applier:
        def no_builds(*_):
            raise AssertionError("no image build in these programs")
        return Applier(Site(ssh_config=self.cluster.sim.ssh_config, workdir=self.workdir / tag, build_image=no_builds,
                            log=self.workdir / f"{tag}.log"))


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("apl")
    with docker_hosts(1, workdir=workdir, subnet=SUBNET, prefix=PREFIX, private_dirs=[JOURNALS]) as cluster:
        yield Host(cluster, tiny_image(cluster.engine(cluster.hosts[0]), workdir), workdir)


class Program:
    """Declarations for one test on the host: containers labelled with the test's tag (so that
    `docker ps`/`events` see its containers alone), and gates whose scripts write to a journal on
    the host which of them exist, and in what state, when they run."""

    def __init__(self, host: Host, tag: str):
        self.host, self.tag = host, tag
        self.journal = host.node.private_dirs[JOURNALS] / f"{tag}.journal"
        self.journal.write_text("")

    def docker_name(self, name: str) -> str:
        return f"{self.tag}-{name}"

    def provider(self) -> docker.Provider:
        return docker.Provider("host-docker", host=f"ssh://root@{self.host.node.address}")

    def container(self, name: str, provider: docker.Provider, *, version: str = "1", restart: str = "no",
                  healthcheck: str = "true", depends_on=()) -> docker.Container:
        return docker.Container(
            name, name=self.docker_name(name), image=self.host.image, command=["sleep", "infinity"],
            network_mode="none", envs=[f"VERSION={version}"], restart=restart,
            healthcheck=docker.ContainerHealthcheckArgs(tests=["CMD-SHELL", healthcheck]),
            labels=[docker.ContainerLabelArgs(label="apl-test", value=self.tag)],
            opts=pulumi.ResourceOptions(provider=provider, depends_on=list(depends_on)),
        )

    def command(self, name: str, *, waits_for: str | None = None, **kwargs) -> command.remote.Command:
        """A command whose create (after the container `waits_for` runs) and delete each write a journal line."""
        wait = ""
        if waits_for:
            running = shlex.quote("{{.State.Running}}")
            wait = (f'until [ "$(docker inspect -f {running} {self.docker_name(waits_for)} 2>/dev/null)" = true ]; '
                    "do sleep 0.1; done; ")
        return command.remote.Command(
            name, connection=command.remote.ConnectionArgs(
                host=self.host.node.address, user="root", private_key=self.host.cluster.sim.key.read_text()),
            create=wait + self._note("create", name), delete=self._note("delete", name), **kwargs,
        )

    def _note(self, event: str, name: str) -> str:
        listing = shlex.quote("{{.Names}}={{.ID}}:{{.State}}")
        return (f'echo "{event} {name} $(docker ps -a --filter label=apl-test={self.tag} --format {listing} '
                f'| sort | tr "\\n" " ")" >> {JOURNALS}/{self.tag}.journal')

    def lines(self) -> list[tuple[str, str, dict[str, str]]]:
        """The journal so far, emptied: (event, command, {container: "<short id>:<state>"})."""
        found = []
        for line in self.journal.read_text().splitlines():
            event, name, *containers = line.split()
            found.append((event, name, dict(c.split("=", 1) for c in containers)))
        self.journal.write_text("")
        return found

    def events(self, since: float) -> list[tuple[str, str, str]]:
        """(action, container name, short id) of this test's containers since `since`, as the engine recorded them."""
        text = self.host.docker("events", "--since", f"{since:.6f}", "--until", f"{time.time():.6f}",
                                "--filter", "type=container", "--filter", f"label=apl-test={self.tag}",
                                "--format", "{{.Action}} {{.Actor.Attributes.name}} {{.Actor.ID}}")
        return [(a, n.removeprefix(self.tag + "-"), i[:12]) for a, n, i in (line.split() for line in text.splitlines())]

    def short_id(self, applier: Applier, name: str) -> str:
        (applied,) = [r for r in applier.state.values() if r.name == name]
        return applied.id[:12]


def lifecycle(events: list[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    return [e for e in events if e[0] in ("create", "destroy")]


def test_a_changed_container_goes_before_its_replacement_takes_its_name(host):
    program = Program(host, "dbr")
    applier = host.applier("dbr")

    def declare(version: str):
        def run():
            provider = program.provider()
            app = program.container("app", provider, version=version)
            program.command("app-gate", waits_for="app", triggers=[app.id])
            steady = program.container("steady", provider)
            program.command("steady-gate", waits_for="steady", triggers=[steady.id])
        return run

    apply({}, applier, program=declare("1"))
    old, steady = program.short_id(applier, "app"), program.short_id(applier, "steady")
    program.lines()
    since = time.time()
    apply({}, applier, program=declare("2"))
    new = program.short_id(applier, "app")

    # The engine's own record: the old container destroyed, then the new one created under its name.
    assert lifecycle(program.events(since)) == [("destroy", "app", old), ("create", "app", new)]
    assert old != new
    # The gate replaced with it was deleted first, while the old container still ran.
    (deleted, created) = program.lines()
    assert deleted[:2] == ("delete", "app-gate") and deleted[2][program.docker_name("app")] == f"{old}:running"
    assert created[:2] == ("create", "app-gate") and created[2][program.docker_name("app")] == f"{new}:running"
    assert applier.log.ops() == [("delete-replaced", "app-gate"), ("delete-replaced", "app"),
                                 ("create-replacement", "app"), ("create-replacement", "app-gate")]
    # Unchanged ones untouched.
    assert program.short_id(applier, "steady") == steady
    assert applier.log.actions["steady"] == applier.log.actions["steady-gate"] == "unchanged"
    applier.destroy()
    assert host.docker("ps", "-aq", "--filter", "label=apl-test=dbr").split() == []


def test_a_chain_replaces_one_container_at_a_time_after_the_gate_before_it(host):
    """a -> a-gate -> b -> b-gate, with a and b changed: a is replaced and its gate passes before
    b is touched; at no moment are both down."""
    program = Program(host, "chain")
    applier = host.applier("chain")

    def declare(version: str):
        def run():
            provider = program.provider()
            a = program.container("a", provider, version=version)
            a_gate = program.command("a-gate", waits_for="a", triggers=[a.id])
            b = program.container("b", provider, version=version, depends_on=[a_gate])
            program.command("b-gate", waits_for="b", triggers=[b.id])
        return run

    apply({}, applier, program=declare("1"))
    old = {name: program.short_id(applier, name) for name in ("a", "b")}
    program.lines()
    since = time.time()
    apply({}, applier, program=declare("2"))
    new = {name: program.short_id(applier, name) for name in ("a", "b")}

    a, b = program.docker_name("a"), program.docker_name("b")
    journal = program.lines()
    assert [(event, name) for event, name, _ in journal] == [
        ("delete", "a-gate"), ("create", "a-gate"), ("delete", "b-gate"), ("create", "b-gate")]
    # a's gate passed with the new a running and the old b untouched.
    assert journal[1][2][a] == f"{new['a']}:running" and journal[1][2][b] == f"{old['b']}:running"
    assert journal[3][2][b] == f"{new['b']}:running"
    events = program.events(since)
    assert lifecycle(events) == [("destroy", "a", old["a"]), ("create", "a", new["a"]),
                                 ("destroy", "b", old["b"]), ("create", "b", new["b"])]
    # Replay the engine's record: one of the two runs at every moment.
    running = {"a", "b"}
    for action, name, _ in events:
        if action == "die":
            running.discard(name)
        elif action == "start":
            running.add(name)
        assert running, f"both down at {action} {name}: {events}"
    log = applier.log
    assert log.before(("create-replacement", "a-gate"), ("delete-replaced", "b-gate"))
    assert log.before(("create-replacement", "a-gate"), ("delete-replaced", "b"))
    applier.destroy()


def test_in_place_changes_keep_the_container(host):
    program = Program(host, "inplace")
    applier = host.applier("inplace")

    def declare(restart: str, healthcheck: str):
        def run():
            program.container("app", program.provider(), restart=restart, healthcheck=healthcheck)
        return run

    apply({}, applier, program=declare("no", "true"))
    before = program.short_id(applier, "app")
    since = time.time()
    apply({}, applier, program=declare("unless-stopped", "exit 0"))
    assert applier.log.ops() == [("update", "app")] and program.short_id(applier, "app") == before
    assert "destroy" not in [action for action, _, _ in program.events(since)]
    shown = "{{.HostConfig.RestartPolicy.Name}} {{json .Config.Healthcheck.Test}}"
    inspected = host.docker("inspect", "--format", shown, program.docker_name("app")).strip().split(" ", 1)
    # The restart policy reaches the container (docker update); the healthcheck stays in the
    # provider's state only, as terraform-provider-docker does it.
    assert inspected == ["unless-stopped", '["CMD-SHELL","true"]']
    applier.destroy()


def test_what_the_program_drops_goes_at_the_end_dependents_first(host):
    program = Program(host, "drop")
    applier = host.applier("drop")

    def first():
        old = program.container("old", program.provider())
        gate = program.command("old-gate", waits_for="old", triggers=[old.id])
        program.command("old-user", opts=pulumi.ResourceOptions(depends_on=[gate]))

    def second():
        program.container("newcomer", program.provider())

    apply({}, applier, program=first)
    old = program.short_id(applier, "old")
    program.lines()
    since = time.time()
    apply({}, applier, program=second)
    newcomer = program.short_id(applier, "newcomer")
    old_name = program.docker_name("old")
    journal = program.lines()
    assert [(event, name) for event, name, _ in journal] == [("delete", "old-user"), ("delete", "old-gate")]
    # Both ran with the newcomer created and the old container still there.
    assert all(seen[old_name] == f"{old}:running" and program.docker_name("newcomer") in seen for _, _, seen in journal)
    assert lifecycle(program.events(since)) == [("create", "newcomer", newcomer), ("destroy", "old", old)]
    assert applier.log.ops() == [("create", "newcomer"), ("delete", "old-user"), ("delete", "old-gate"),
                                 ("delete", "old")]
    applier.destroy()
