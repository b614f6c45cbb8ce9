"""The preflight and facts scripts, run: on a host made in a private mount namespace (/dev, /opt and
/sys/module replaced by what each case puts there) with stub `docker`, `ss`, `df` and `ip` on PATH.
The passing host, then each usual problem on its own: the script stops naming the node and the fix."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from components.config import parse_stack_config
from components.plan import make_plan
from components.preflight import HostFacts, facts_script, parse_facts, preflight_script
from tests.support.pulumi_program import REPO, stack_config

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="a private mount namespace needs root and unshare (scripts/test.sh runs as root)",
)

WORKER_ADDRESS = "10.0.0.12"
IP_ADDR = (
    "1: lo    inet 127.0.0.1/8 scope host lo\\       valid_lft forever preferred_lft forever\n"
    "2: eth0    inet {address}/24 brd 10.0.0.255 scope global eth0\\       valid_lft forever preferred_lft forever\n"
    "3: ib0    inet 192.168.50.12/24 scope global ib0\\       valid_lft forever preferred_lft forever\n"
)
STUBS = {
    # No container of this stack runs yet (`docker inspect` of its Ray container fails).
    "docker": '#!/bin/sh\ncase "$1" in info) [ ! -e "$FAKE/docker-down" ] ;; *) exit 1 ;; esac\n',
    "ss": '#!/bin/sh\nfor a; do port=${a##*:}; done\ngrep -qx "$port" "$FAKE/listening" && echo "LISTEN 0 128 *:$port *:*"\nexit 0\n',
    "df": '#!/bin/sh\necho "Filesystem 1024-blocks Used Available Capacity Mounted on"\n'
          'echo "/dev/fake 999999999 1 $(cat "$FAKE/free_kb") 1% /"\n',
    "ip": '#!/bin/sh\n[ "$*" = "-o addr show" ] && cat "$FAKE/ip_addr"\n',
}


@dataclass
class FakeHost:
    """What a DCU host holds; each field one thing a case changes."""

    devices: list[str] = field(default_factory=lambda: ["/dev/kfd", "/dev/mkfd"] + [
        f"/dev/dri/renderD{128 + i}" for i in range(8)])
    dirs: list[str] = field(default_factory=lambda: ["/opt/hyhal"])
    driver: str | None = "6.3.8-V1.5.2"
    ip_addr: str = IP_ADDR.format(address=WORKER_ADDRESS)
    listening: list[int] = field(default_factory=list)
    free_gb: int = 500
    docker_up: bool = True

    def run(self, script: str, tmp_path: Path) -> subprocess.CompletedProcess:
        state, stubs, realdev = tmp_path / "state", tmp_path / "bin", tmp_path / "realdev"
        for directory in (state, stubs, realdev):
            directory.mkdir(parents=True)
        for name, text in STUBS.items():
            (stubs / name).write_text(text)
            (stubs / name).chmod(0o755)
        (state / "ip_addr").write_text(self.ip_addr)
        (state / "listening").write_text("".join(f"{port}\n" for port in self.listening))
        (state / "free_kb").write_text(str(self.free_gb * 1048576))
        if not self.docker_up:
            (state / "docker-down").touch()
        (tmp_path / "script.sh").write_text(script)
        setup = [
            f"mount --bind /dev {realdev}", "mount -t tmpfs tmpfs /dev",
            f"touch /dev/null && mount --bind {realdev}/null /dev/null",
            "mount -t tmpfs tmpfs /opt", "mount -t tmpfs tmpfs /sys/module",
            *[f"mkdir -p {os.path.dirname(d)} && touch {d}" for d in self.devices],
            *[f"mkdir -p {d}" for d in self.dirs],
        ]
        if self.driver:
            setup.append(f"mkdir -p /sys/module/hydcu && echo {self.driver} > /sys/module/hydcu/version")
        inner = " && ".join(setup) + f" && exec sh {tmp_path / 'script.sh'}"
        env = {"PATH": f"{stubs}:/usr/sbin:/usr/bin:/sbin:/bin", "FAKE": str(state), "HOME": str(tmp_path)}
        return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", inner],
                              capture_output=True, text=True, env=env, timeout=60)


def _plan(tmp_path: Path, **changes):
    config = stack_config(REPO / "Pulumi.dev.yaml")
    config.update({"modelRoot": str(tmp_path / "models"), "dataRoot": str(tmp_path / "data"), "minFreeDiskGb": 200,
                   "minDriverVersion": "6.3.8", **changes})
    return make_plan(parse_stack_config(config))


def _worker_preflight(tmp_path: Path, host: FakeHost, **changes) -> subprocess.CompletedProcess:
    plan = _plan(tmp_path, **changes)
    return host.run(preflight_script(plan, plan.workers[0]), tmp_path)


def _fails_naming(result: subprocess.CompletedProcess, *words: str) -> None:
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "preflight failed on dcu-worker-1 (10.0.0.12)" in result.stderr, result.stderr
    for word in words:
        assert word in result.stderr, (word, result.stderr)


def test_scripts_parse_for_every_stack_and_node():
    for path in sorted(REPO.glob("Pulumi.*.yaml")):
        plan = make_plan(parse_stack_config(stack_config(path)))
        for node in plan.nodes:
            for script in (preflight_script(plan, node), facts_script(plan, node)):
                checked = subprocess.run(["sh", "-n"], input=script, capture_output=True, text=True)
                assert checked.returncode == 0, (path.name, node.label, checked.stderr)


def test_a_good_host_passes_and_shows_its_driver(tmp_path):
    result = _worker_preflight(tmp_path, FakeHost())
    assert result.returncode == 0, result.stderr
    assert "DCU driver version: 6.3.8-V1.5.2" in result.stdout
    assert "preflight ok on dcu-worker-1 (10.0.0.12)" in result.stdout
    assert (tmp_path / "models").is_dir() and (tmp_path / "data" / "ray").is_dir()


def test_docker_unreachable(tmp_path):
    _fails_naming(_worker_preflight(tmp_path, FakeHost(docker_up=False)), "Docker is unreachable", "docker group")


def test_no_kfd(tmp_path):
    host = FakeHost()
    host.devices.remove("/dev/kfd")
    _fails_naming(_worker_preflight(tmp_path, host), "/dev/kfd is missing", "hy-smi")


def test_fewer_render_devices_than_gpus(tmp_path):
    host = FakeHost(devices=["/dev/kfd"] + [f"/dev/dri/renderD{128 + i}" for i in range(4)])
    _fails_naming(_worker_preflight(tmp_path, host), "4 render devices (/dev/dri/renderD*), but workers[0].gpus is 8")


def test_no_hyhal_says_to_link_it(tmp_path):
    _fails_naming(_worker_preflight(tmp_path, FakeHost(dirs=[])),
                  "/opt/hyhal is missing", "ln -s /usr/local/hyhal /opt/hyhal")


def test_mkfd_is_not_required(tmp_path):
    host = FakeHost()
    host.devices.remove("/dev/mkfd")
    assert _worker_preflight(tmp_path, host).returncode == 0


def test_driver_older_than_the_minimum(tmp_path):
    _fails_naming(_worker_preflight(tmp_path, FakeHost(driver="6.3.7-V1.5.0")),
                  "the DCU driver is 6.3.7-V1.5.0, older than minDriverVersion 6.3.8", "upgrade the driver")


def test_driver_version_unreadable_with_a_minimum(tmp_path):
    _fails_naming(_worker_preflight(tmp_path, FakeHost(driver=None)),
                  "cannot read the DCU driver's version", "minDriverVersion")


def test_driver_version_unreadable_without_a_minimum_is_shown(tmp_path):
    result = _worker_preflight(tmp_path, FakeHost(driver=None), minDriverVersion=None)
    assert result.returncode == 0, result.stderr
    assert "DCU driver version: unknown" in result.stdout


def test_mount_dtk_needs_the_hosts_dtk(tmp_path):
    _fails_naming(_worker_preflight(tmp_path, FakeHost(), mountDtk=True),
                  "/opt/dtk is missing", "Docker refuses to bind-mount a missing path", "mountDtk: false")
    assert _worker_preflight(tmp_path / "with", FakeHost(dirs=["/opt/hyhal", "/opt/dtk"]),
                             mountDtk=True).returncode == 0


def test_extra_device_missing(tmp_path):
    _fails_naming(_worker_preflight(tmp_path, FakeHost(), extraDevices=["/dev/infiniband"]),
                  "/dev/infiniband (extraDevices) is missing on this node")


def test_configured_interface_that_does_not_exist(tmp_path):
    host = FakeHost(ip_addr=IP_ADDR.format(address=WORKER_ADDRESS).replace("eth0", "ens1"))
    _fails_naming(_worker_preflight(tmp_path, host),
                  "interface eth0 (glooSocketIfname) does not exist on this node",
                  "use ens1, the interface holding it")


def test_configured_interface_that_holds_another_address(tmp_path):
    _fails_naming(_worker_preflight(tmp_path, FakeHost(ip_addr=IP_ADDR.format(address="10.0.0.99"))),
                  "interface eth0 (glooSocketIfname) does not hold the node's cluster address 10.0.0.12",
                  "no interface holds it: set workers[0].clusterAddress")


def test_a_nodes_interface_is_checked_against_its_cluster_address(tmp_path):
    config = stack_config(REPO / "Pulumi.dev.yaml")
    workers = config["workers"]
    workers[0] = {**workers[0], "clusterAddress": "192.168.50.12", "interface": "ib0"}
    assert _worker_preflight(tmp_path, FakeHost(), workers=workers).returncode == 0
    workers[0]["interface"] = "eth0"
    result = _worker_preflight(tmp_path / "wrong", FakeHost(), workers=workers)
    assert "preflight failed on dcu-worker-1 (10.0.0.12, cluster address 192.168.50.12)" in result.stderr
    assert "interface eth0 (workers[0].interface) does not hold the node's cluster address 192.168.50.12: " \
           "use ib0, the interface holding it" in result.stderr


def test_derived_interface_needs_one_holding_the_cluster_address(tmp_path):
    unset = {"ncclSocketIfname": None, "glooSocketIfname": None}
    config = {k: v for k, v in stack_config(REPO / "Pulumi.dev.yaml").items() if k not in unset}
    plan = make_plan(parse_stack_config({**config, "modelRoot": str(tmp_path / "m"), "dataRoot": str(tmp_path / "d")}))
    script = preflight_script(plan, plan.workers[0])
    assert FakeHost().run(script, tmp_path / "good").returncode == 0
    result = FakeHost(ip_addr=IP_ADDR.format(address="10.0.0.99")).run(script, tmp_path / "bad")
    assert result.returncode == 1
    assert "Gloo needs the interface holding the node's cluster address 10.0.0.12, and no interface holds it: " \
           "set workers[0].clusterAddress" in result.stderr


def test_port_in_use(tmp_path):
    _fails_naming(_worker_preflight(tmp_path, FakeHost(listening=[52365])),
                  "port 52365 (rayPorts.dashboardAgentListen) is in use")


def test_not_enough_disk(tmp_path):
    _fails_naming(_worker_preflight(tmp_path, FakeHost(free_gb=20)), "only 20 GB free", "minFreeDiskGb")


def _facts(tmp_path: Path, host: FakeHost) -> HostFacts:
    plan = _plan(tmp_path)
    result = host.run(facts_script(plan, plan.workers[0]), tmp_path)
    assert result.returncode == 0, result.stderr
    return parse_facts(result.stdout)


def test_facts_of_a_host(tmp_path):
    assert _facts(tmp_path, FakeHost()) == HostFacts(("/dev/mkfd",), "eth0", "6.3.8-V1.5.2")
    bare = replace(FakeHost(), devices=["/dev/kfd"], driver=None, ip_addr=IP_ADDR.format(address="10.0.0.99"))
    assert _facts(tmp_path / "bare", bare) == HostFacts((), None, None)
