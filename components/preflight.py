"""The preflight: the guide's troubleshooting turned into checks a host passes before anything is
placed on it, each failure naming the node and the fix. Pure: builds the shell script only."""

from __future__ import annotations

import shlex

from components.plan import NodePlan, Plan


def preflight_script(plan: Plan, node: NodePlan) -> str:
    config = plan.config
    where = shlex.quote(f"{node.label} ({node.address})")
    lines = [
        "set -u",
        f'fail() {{ echo "preflight failed on "{where}": $*" >&2; exit 1; }}',
        'docker info >/dev/null 2>&1 || fail "Docker is unreachable for user $(id -un):'
        ' start it (systemctl start docker) and add the user to the docker group"',
    ]
    for check in plan.profile.preflight_devices:
        lines.append(f'ls {check.path} >/dev/null 2>&1 || fail "{check.path} is missing: {check.fix}"')
    root = shlex.quote(config.model_root)
    lines += [
        # Docker refuses a bind mount whose source is missing: make every mounted directory here.
        f"mkdir -p {root} {shlex.quote(plan.ray_temp_dir)} || fail \"cannot create modelRoot/dataRoot as $(id -un)\"",
        f"free_gb=$(df -Pk {root} | awk 'NR==2 {{print int($4/1048576)}}')",
        f'[ "$free_gb" -ge {config.min_free_disk_gb} ] || fail "only ${{free_gb}} GB free under'
        f' {config.model_root}, need {config.min_free_disk_gb}: free space or lower minFreeDiskGb"',
    ]
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
    lines.append(f"echo preflight ok on {where}")
    return "\n".join(lines)
