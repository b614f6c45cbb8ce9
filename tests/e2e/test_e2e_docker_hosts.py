"""Simulated hosts with their own Docker engines: each host's sshd leads to that host's engine,
and that engine's containers see the host's network and private files."""

from __future__ import annotations

import json

import pytest

from tests.e2e.node_image import debian_base
from tests.support.docker_hosts import docker_hosts, mounts_under, subnet_in_use

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    with docker_hosts(2, workdir=tmp_path_factory.mktemp("dh"), prefix="e2d", subnet="10.78.0.128/25",
                      private_dirs=["/srv/e2d"]) as cluster:
        yield cluster


def test_each_hosts_ssh_reaches_its_own_engine(hosts):
    engine_ids = {h.name: hosts.docker(h, "info", "--format", "{{.DockerRootDir}}").stdout.strip() for h in hosts.hosts}
    assert len(set(engine_ids.values())) == 2
    for host in hosts.hosts:
        # What Docker's ssh:// transport does: the remote `docker` through the login session.
        over_ssh = hosts.ssh(host, "docker info --format '{{.DockerRootDir}}'").stdout.strip()
        assert over_ssh == engine_ids[host.name]


def test_host_network_container_sees_the_hosts_address_and_private_files(hosts):
    host = hosts.hosts[1]
    (host.private_dirs["/srv/e2d"] / "whoami").write_text(host.name)
    image = debian_base(hosts.engine(host))
    result = hosts.ssh(host, f"docker run --rm --network host -v /srv/e2d:/srv/e2d {image} "
                             "sh -c 'cat /proc/net/fib_trie; cat /srv/e2d/whoami'")
    local = _local_addresses(result.stdout)
    assert host.address in local and hosts.hosts[0].address not in local
    assert result.stdout.rstrip().endswith(host.name)
    inspected = json.loads(hosts.docker(host, "image", "inspect", image).stdout)
    assert inspected[0]["Os"] == "linux"


def test_mounts_under_lists_deepest_first():
    mountinfo = (
        "36 35 0:3 / /run/x rw - tmpfs tmpfs rw\n"
        "37 36 0:4 / /run/x/exec/netns/default rw - nsfs nsfs rw\n"
        "38 35 0:5 / /run/xy rw - tmpfs tmpfs rw\n"
        "39 35 0:6 / /run/x/with\\040space rw - tmpfs tmpfs rw\n"
    )
    assert mounts_under(__import__("pathlib").Path("/run/x"), mountinfo) == [
        "/run/x/exec/netns/default", "/run/x/with space", "/run/x",
    ]


def _local_addresses(fib_trie: str) -> set[str]:
    """Addresses /proc/net/fib_trie marks `/32 host LOCAL`: the ones this network namespace owns."""
    lines = fib_trie.splitlines()
    return {
        lines[i - 1].split()[-1] for i, line in enumerate(lines)
        if "/32 host LOCAL" in line and i > 0 and lines[i - 1].strip().startswith("|--")
    }


def test_a_subnet_held_by_another_interface_is_refused():
    addresses = "1: lo    inet 127.0.0.1/8 scope host lo\n9: bmsbr    inet 10.78.0.1/24 brd 10.78.0.255 scope global bmsbr\n"
    assert subnet_in_use("10.78.0.128/25", addresses) == "bmsbr 10.78.0.1/24"
    assert subnet_in_use("10.79.0.0/24", addresses) is None
