"""The applier's steps, run for real: small programs of local commands applied one after the other
(each command's scripts append to a journal), checked against what `pulumi up` would do. The same
with containers and remote commands on a simulated host: test_e2e_applier_docker.py."""

from __future__ import annotations

from pathlib import Path

import pulumi
import pulumi_command as command
import pytest

from tests.e2e.apply import Applier, ApplyError, Site, apply


class Journal:
    """Local commands that say in a shared file what they do, and when."""

    def __init__(self, path: Path):
        self.path = path
        path.write_text("")

    def command(self, name: str, version: str = "1", *, update: str | None = None, exit_code: int = 0,
                **kwargs) -> command.local.Command:
        def line(event: str) -> str:
            return f"echo '{event} {name} {version}' >> {self.path}"

        return command.local.Command(
            name, create=f"{line('create')}; echo {name}-{version}; exit {exit_code}", delete=line("delete"),
            update=update and f"{line(update)}; echo \"$PULUMI_COMMAND_STDOUT\"",
            interpreter=["/bin/sh", "-c"], **kwargs,
        )

    def take(self) -> list[str]:
        """The lines written since the last take."""
        lines = self.path.read_text().splitlines()
        self.path.write_text("")
        return lines


@pytest.fixture
def journal(tmp_path) -> Journal:
    return Journal(tmp_path / "journal")


@pytest.fixture
def applier(tmp_path) -> Applier:
    def no_builds(*_):
        raise AssertionError("no image in these programs")
    return Applier(Site(ssh_config=tmp_path / "ssh_config", workdir=tmp_path / "apply", build_image=no_builds))


def opts(**kwargs) -> pulumi.ResourceOptions:
    return pulumi.ResourceOptions(**kwargs)


def test_a_replaced_command_is_created_first_and_its_old_copy_deleted_at_the_end(journal, applier):
    def program(version: str, later: str):
        def declare():
            service = journal.command("service", version, triggers=[version])
            journal.command("steady", triggers=["same"])
            journal.command("later", later, opts=opts(depends_on=[service]))
        return declare

    apply({}, applier, program=program("1", later="1"))
    assert sorted(journal.take()) == ["create later 1", "create service 1", "create steady 1"]

    apply({}, applier, program=program("2", later="2"))
    # The old copy goes after everything the program registers, and after its own replacement.
    # `later` has no update script: its provider runs its create again.
    assert journal.take() == ["create service 2", "create later 2", "delete service 1"]
    log = applier.log
    assert log.before(("update", "later"), ("delete-replaced", "service"))
    assert log.changed() == {"service": "replaced", "later": "updated"}
    assert log.actions["steady"] == "unchanged"


def test_delete_before_replace_deletes_its_replaced_dependents_first(journal, applier):
    def program(version: str):
        def declare():
            base = journal.command("base", version, triggers=[version], opts=opts(delete_before_replace=True))
            journal.command("user", triggers=[base.id])  # replaced with it: base's id changes
            journal.command("reader", update="update", stdin=base.stdout)  # updated, not replaced
            journal.command("waiter", opts=opts(depends_on=[base]))  # neither
        return declare

    apply({}, applier, program=program("1"))
    journal.take()
    apply({}, applier, program=program("2"))
    lines = journal.take()
    assert lines[:3] == ["delete user 1", "delete base 1", "create base 2"]
    assert sorted(lines[3:]) == ["create user 1", "update reader 1"]
    assert applier.log.ops()[:3] == [("delete-replaced", "user"), ("delete-replaced", "base"),
                                     ("create-replacement", "base")]
    assert applier.log.changed() == {"base": "replaced", "user": "replaced", "reader": "updated"}


def test_an_update_runs_the_update_script_with_the_previous_output(journal, applier):
    def program(flag: str):
        def declare():
            journal.command("tool", update="update", environment={"FLAG": flag})
        return declare

    apply({}, applier, program=program("a"))
    first = applier.state[next(iter(applier.state))]
    apply({}, applier, program=program("b"))
    assert journal.take() == ["create tool 1", "update tool 1"]
    updated = applier.state[first.urn]
    assert updated.id == first.id  # the same resource, not a replacement
    assert updated.outputs["stdout"] == "tool-1"  # PULUMI_COMMAND_STDOUT: the create's output, newline dropped


def test_resources_left_out_are_deleted_at_the_end_dependents_first(journal, applier):
    def first():
        base = journal.command("base")
        middle = journal.command("middle", triggers=[base.stdout])
        journal.command("top", opts=opts(depends_on=[middle]))
        journal.command("other")

    def second():
        journal.command("newcomer")

    apply({}, applier, program=first)
    journal.take()
    apply({}, applier, program=second)
    lines = journal.take()
    # Antichains of the old graph: `other`, depending on nothing, goes with the last one.
    assert lines[:3] == ["create newcomer 1", "delete top 1", "delete middle 1"]
    assert sorted(lines[3:]) == ["delete base 1", "delete other 1"]
    log = applier.log
    assert log.before(("delete", "top"), ("delete", "middle")) and log.before(("delete", "middle"), ("delete", "base"))
    assert log.changed() == {"newcomer": "created", "base": "deleted", "middle": "deleted", "top": "deleted",
                             "other": "deleted"}
    assert [r.name for r in applier.state.values()] == ["newcomer"]


def test_a_failed_apply_leaves_replaced_copies_to_the_next_one(journal, applier):
    def program(version: str, broken: bool):
        def declare():
            service = journal.command("service", version, triggers=[version])
            journal.command("check", version, exit_code=1 if broken else 0, opts=opts(depends_on=[service]))
        return declare

    apply({}, applier, program=program("1", broken=False))
    journal.take()
    with pytest.raises(ApplyError, match="check"):
        apply({}, applier, program=program("2", broken=True))
    # The new service exists, the old one too (nothing is deleted at the end of a failed apply).
    assert journal.take() == ["create service 2", "create check 2"]
    assert [r.name for r in applier.pending_deletes] == ["service"]

    apply({}, applier, program=program("2", broken=False))
    # `check` failed to update, so it is still the first one; the service is the second already.
    assert journal.take() == ["create check 2", "delete service 1"]
    assert applier.log.ops() == [("update", "check"), ("delete-replaced", "service")]
    assert applier.pending_deletes == []


def test_destroy_deletes_dependents_first_and_keeps_what_is_retained(journal, applier):
    def declare():
        base = journal.command("base")
        journal.command("kept", triggers=[base.stdout], opts=opts(retain_on_delete=True))
        journal.command("top", triggers=[base.stdout])

    apply({}, applier, program=declare)
    journal.take()
    assert applier.destroy() == ["top", "base"]
    assert journal.take() == ["delete top 1", "delete base 1"]
    assert applier.state == {}


def test_an_option_the_applier_does_not_honour_fails_naming_it(journal, applier):
    def declare():
        journal.command("tool", opts=opts(ignore_changes=["create"]))

    with pytest.raises(ApplyError, match="ignore_changes"):
        apply({}, applier, program=declare)
