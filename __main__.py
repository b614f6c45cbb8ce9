"""vLLM + Ray on Hygon DCU clusters, declared: the stack config in, the whole deployment out."""

import pulumi

from components.config import ConfigError, load_stack_config
from components.deployment import Deployment, DeploymentArgs
from components.plan import make_plan

try:
    config, secrets = load_stack_config()
except ConfigError as error:
    raise pulumi.RunError(str(error)) from None

deployment = Deployment(config.cluster_name, DeploymentArgs(make_plan(config), secrets))
for key, value in deployment.outputs.items():
    pulumi.export(key, value)
