import copy
from pathlib import Path

import pytest

from tests.support.pulumi_program import REPO, stack_config


@pytest.fixture
def dev_config() -> dict:
    return copy.deepcopy(stack_config(REPO / "Pulumi.dev.yaml"))


@pytest.fixture
def local_config() -> dict:
    return copy.deepcopy(stack_config(REPO / "Pulumi.local.yaml"))


STACK_FILES = sorted(Path(REPO).glob("Pulumi.*.yaml"))
