"""What is checked and learned on a host before anything is placed on it. Pure: builds shell scripts.

The preflight turns the guide's troubleshooting (and the usual DCU host problems) into checks, each
failure naming the node and the fix. The facts script reports what the containers there must adapt
to — the optional devices the driver created, the interface holding the node's cluster address, the
driver's version — one `key=value` line each, parsed by `parse_facts`. It is a command of its own so
that its output changes only with the host: a preflight threshold changed in the stack reruns the
preflight, not the facts every container there is declared from.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass

from components.plan import Interface, NodePlan, Plan

# Prints the name of the interface holding address `a` (the first one, as `ip -o addr` lists them).
_HOLDER_AWK = "{split($4, p, \"/\"); if (p[1] == a) {print $2; exit}}"
# Exit 0 when an interface matching `n` holds address `a`; 1 when none matches, 2 when one matches but
# holds another address. `prefix` 1 matches names starting with `n` (NCCL's rule for a plain name).
_MATCH_AWK = ("{if (prefix ? index($2, n) == 1 : $2 == n) {seen = 1; split($4, p, \"/\"); if (p[1] == a) held = 1}}"
              " END {exit held ? 0 : (seen ? 2 : 1)}")
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9_.:-]+$")


@dataclass(frozen=True)
class HostFacts:
    """What the facts script found on one host."""

    # The profile's optional devices present there.
    devices: tuple[str, ...] = ()
    # The interface holding the node's cluster address; None when none does.
    interface: str | None = None
    # The DCU driver's version, when the profile has a driver and it reports one.
    driver: str | None = None


def parse_facts(stdout: str) -> HostFacts:
    """The facts script's output (unknown lines are ignored: an older program reads a newer host)."""
    devices: list[str] = []
    values: dict[str, str] = {}
    for line in stdout.splitlines():
        key, _, value = line.strip().partition("=")
        if key == "device" and value:
            devices.append(value)
        elif key in ("interface", "driver") and value:
            values[key] = value
    return HostFacts(tuple(devices), values.get("interface"), values.get("driver"))


def _holder(address: str) -> str:
    """Shell: the interface holding `address`, or nothing."""
    return f"ip -o addr show 2>/dev/null | awk -v a={shlex.quote(address)} {shlex.quote(_HOLDER_AWK)}"


def _driver_version(plan: Plan) -> str:
    """Shell: the driver's version from the first of the profile's files that is readable, or nothing."""
    reads = " || ".join(f"cat {shlex.quote(path)}" for path in plan.profile.driver_version_files)
    return f"{{ {reads}; }} 2>/dev/null | head -n 1"


def facts_script(plan: Plan, node: NodePlan) -> str:
    lines = ["set -u"]
    for device in plan.profile.optional_devices:
        lines.append(f"[ -e {shlex.quote(device)} ] && echo device={shlex.quote(device)}")
    lines.append(f'holder=$({_holder(node.cluster_address)}); [ -z "$holder" ] || echo "interface=$holder"')
    if plan.profile.driver_version_files:
        lines.append(f'driver=$({_driver_version(plan)}); [ -z "$driver" ] || echo "driver=$driver"')
    lines.append("exit 0")
    return "\n".join(lines)


def _say(template: str) -> str:
    """A message as one shell word: the text quoted, each `{name}` the shell variable's value."""
    parts = re.split(r"\{(\w+)\}", template)
    return "".join(shlex.quote(part) if i % 2 == 0 else f'"${{{part}}}"' for i, part in enumerate(parts) if part)


def _interface_checks(node: NodePlan) -> list[str]:
    """Each configured interface exists and holds the node's cluster address; a derived one exists at all."""
    none_holds = (f"no interface holds it: set {node.key}.clusterAddress to this node's address on the cluster "
                  "network (ip -o addr lists them)")
    lines = [f"holder=$({_holder(node.cluster_address)})",
             'if [ -n "$holder" ]; then holding="use $holder, the interface holding it"; '
             f"else holding={shlex.quote(none_holds)}; fi"]
    checked: set[tuple[str, bool]] = set()
    # Gloo's exact name first: when NCCL has the same name, the exact check covers its prefix match.
    for interface in sorted(node.interfaces, key=lambda i: i.kind != "gloo"):
        lines += _interface_check(node, interface, checked)
    return lines


def _interface_check(node: NodePlan, interface: Interface, checked: set[tuple[str, bool]]) -> list[str]:
    address, library = node.cluster_address, "NCCL/RCCL" if interface.kind == "nccl" else "Gloo"
    if interface.name is None:
        if not interface.derived:
            return []
        return [f'[ -n "$holder" ] || fail ' + _say(
            f"{library} needs the interface holding the node's cluster address {address}, and no interface "
            f"holds it: set {node.key}.clusterAddress to this node's address on the cluster network "
            f"(ip -o addr lists them), or set {interface.key}")]
    name, prefix = interface.name, False
    if interface.kind == "gloo":
        name = name.split(",")[0]  # torch binds the first of a list for the rendezvous
    elif not _PLAIN_NAME.match(name):
        return [f"echo {shlex.quote(f'note: {interface.key}={name} is a NCCL pattern; the cluster check tests it')}"]
    else:
        prefix = True  # NCCL reads a plain name as a prefix
    if (name, prefix) in checked or (name, False) in checked:
        return []
    checked.add((name, prefix))
    match = f"ip -o addr show | awk -v a={shlex.quote(address)} -v n={shlex.quote(name)} -v prefix={int(prefix)} {shlex.quote(_MATCH_AWK)}"
    what = f"interface {name} ({interface.key})"
    return [
        f"{match}; found=$?",
        '[ "$found" != 1 ] || fail ' + _say(f"{what} does not exist on this node or has no address: "
                                             f"{{holding}} (set {interface.key})"),
        '[ "$found" != 2 ] || fail ' + _say(f"{what} does not hold the node's cluster address {address}: "
                                             f"{{holding}} (set {interface.key})"),
    ]


def _driver_checks(plan: Plan) -> list[str]:
    minimum = plan.config.min_driver_version
    files = ", ".join(plan.profile.driver_version_files)
    lines = [f"driver=$({_driver_version(plan)})", 'echo "DCU driver version: ${driver:-unknown}"']
    if minimum:
        lines += [
            '[ -n "$driver" ] || fail ' + _say(f"cannot read the DCU driver's version ({files}): load the driver, "
                                                "or unset minDriverVersion"),
            f'lowest=$(printf "%s\\n%s\\n" {shlex.quote(minimum)} "$driver" | sort -V | head -n 1)',
            f'[ "$lowest" = {shlex.quote(minimum)} ] || fail ' + _say(
                f"the DCU driver is {{driver}}, older than minDriverVersion {minimum}: upgrade the driver "
                "(its version is in hy-smi --showdriverversion), or lower minDriverVersion"),
        ]
    return lines


def preflight_script(plan: Plan, node: NodePlan) -> str:
    config, profile = plan.config, plan.profile
    lines = [
        "set -u",
        f'fail() {{ echo "preflight failed on "{shlex.quote(node.where)}": $*" >&2; exit 1; }}',
        'docker info >/dev/null 2>&1 || fail "Docker is unreachable for user $(id -un):'
        ' start it (systemctl start docker) and add the user to the docker group"',
    ]
    for device in profile.devices:
        lines.append(f"[ -e {shlex.quote(device.path)} ] || fail " + _say(f"{device.path} is missing: {device.fix}"))
    if profile.render_devices and node.gpus:
        lines += [
            f"found=$(ls -d {profile.render_devices} 2>/dev/null | wc -l)",
            f'[ "$found" -ge {node.gpus} ] || fail ' + _say(
                f"{{found}} render devices ({profile.render_devices}), but {node.key}.gpus is {node.gpus}: set it to "
                "the DCUs hy-smi lists, or load the driver for all of them"),
        ]
    if profile.driver_version_files:
        lines += _driver_checks(plan)
    for mount in profile.mounts(mount_dtk=config.mount_dtk):
        lines.append(f"[ -e {shlex.quote(mount.path)} ] || fail " + _say(
            f"{mount.path} is missing, and Docker refuses to bind-mount a missing path: {mount.fix}"))
    for device in config.extra_devices:
        lines.append(f"[ -e {shlex.quote(device)} ] || fail " + _say(
            f"{device} (extraDevices) is missing on this node: install what creates it (e.g. the RDMA driver "
            "for /dev/infiniband), or remove it from extraDevices"))
    root = shlex.quote(config.model_root)
    mounted = [plan.ray_temp_dir]
    if any(r.spare and r.home.label == node.label for model in plan.models for r in model.replicas):
        mounted.append(plan.slot_lock_dir)
    lines += [
        # Docker refuses a bind mount whose source is missing: make every mounted directory here.
        f"mkdir -p {root} {shlex.join(mounted)} || fail \"cannot create modelRoot/dataRoot as $(id -un)\"",
        f"free_gb=$(df -Pk {root} | awk 'NR==2 {{print int($4/1048576)}}')",
        f'[ "$free_gb" -ge {config.min_free_disk_gb} ] || fail "only ${{free_gb}} GB free under'
        f' {config.model_root}, need {config.min_free_disk_gb}: free space or lower minFreeDiskGb"',
    ]
    interfaces = _interface_checks(node) if any(i.name or i.derived for i in node.interfaces) else []
    if interfaces:
        lines += ['command -v ip >/dev/null || fail "ip (iproute2) is missing: install iproute2"', *interfaces]
    if node.ports:
        # Ports held by this stack's own running containers are ours, not a conflict.
        checks = [
            f'[ -z "$(ss -Htln "sport = :{port}")" ] || fail "port {port} ({key}) is in use: '
            f'stop what listens there (ss -ltnp) or change {key}"'
            for port, key in node.ports
        ]
        lines += [
            'command -v ss >/dev/null || fail "ss (iproute2) is missing: install iproute2"',
            f"if ! docker inspect {shlex.quote(node.ray_container)} >/dev/null 2>&1; then",
            *[f"  {check}" for check in checks],
            "fi",
        ]
    lines.append(f"echo preflight ok on {shlex.quote(node.where)}")
    return "\n".join(lines)
