"""images/base_packages.py: the guard that our image layer adds packages and changes none of the base's."""

import subprocess
import sys

from tests.support.pulumi_program import REPO

SCRIPT = REPO / "images" / "base_packages.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True)


def test_freeze_pins_every_installed_distribution_by_name_and_version():
    frozen = _run("freeze").stdout.splitlines()
    assert frozen and all("==" in line and "@" not in line for line in frozen)
    import pydantic
    assert f"pydantic=={pydantic.VERSION}" in frozen


def test_check_passes_on_the_same_environment(tmp_path):
    base = tmp_path / "base.txt"
    base.write_text(_run("freeze").stdout)
    checked = _run("check", str(base))
    assert checked.returncode == 0, checked.stderr


def test_check_names_every_package_whose_version_changed_or_went(tmp_path):
    lines = _run("freeze").stdout.splitlines()
    changed = [line for line in lines if line.startswith("pydantic==")]
    kept = [line for line in lines if not line.startswith(("pydantic==", "filelock=="))]
    base = tmp_path / "base.txt"
    # The base had an older pydantic and a package that is gone afterwards; a package added since is fine.
    base.write_text("\n".join(kept + ["pydantic==1.10.2", "vendor-only-package==3.1+das.dtk2504"]) + "\n")
    checked = _run("check", str(base))
    assert checked.returncode == 1
    assert f"pydantic: 1.10.2 in the base image, {changed[0].split('==')[1]} after installing" in checked.stderr
    assert "vendor-only-package: 3.1+das.dtk2504 in the base image, removed" in checked.stderr
    assert "filelock" not in checked.stderr


def test_names_are_compared_as_pip_normalizes_them(tmp_path):
    lines = _run("freeze").stdout.splitlines()
    typing_ext = next(line for line in lines if line.startswith("typing-extensions=="))
    base = tmp_path / "base.txt"
    base.write_text(typing_ext.replace("typing-extensions", "Typing_Extensions") + "\n")
    assert _run("check", str(base)).returncode == 0
