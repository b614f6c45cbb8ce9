"""`node-runtime`: the one command line the Pulumi components call inside the node image."""

import typer

from node_runtime.modelstore.cli import app as model_app
from node_runtime.serving.cli import cluster_app, gateway_commands, serve

app = typer.Typer(no_args_is_help=True, help=__doc__)
app.add_typer(model_app, name="model")
app.add_typer(cluster_app, name="cluster")
app.command("serve")(serve)
app.add_typer(gateway_commands, name="gateway")
