"""Distribute a model from the head to every worker, at the same absolute path, along a relay chain.

Pushing N copies from the head costs N times its link. Instead the head streams the model once,
into a chain: head → node1 → node2 → ... Each node's receiver (`node-runtime model _receive`,
run through ssh and the `--remote-exec` prefix) forwards every chunk to the next node *before*
writing it locally, so all links carry the data at the same time and N nodes take about as long
as one copy plus a fixed start-up cost per hop (bench/model_sync/RESULTS.md).

Hops: node k reaches node k+1 with `ssh -A`, authenticated by the head's agent, forwarded along
the chain. The relay key is loaded into a private ssh-agent on the head for the duration of
the sync (`--identity`) and never copied anywhere; a node can use it only while the sync's
connection through it is open. With `--remote-exec docker run ...`, pass the forwarded agent
into the container: `-v "$SSH_AUTH_SOCK:$SSH_AUTH_SOCK" -e SSH_AUTH_SOCK` (expanded on the node).

One ssh connection and one receiver per hop carry everything: planning, data, results. Only
what changed moves: the head sends its manifest down the chain; each node forwards it at once,
then answers (a `plan` event) which files fail the check (`--hash`) and how many bytes of each
it already holds in `{dir}/.partial/` from an interrupted run — so all nodes plan at the same
time. Once every node has answered, the stream carries each needed file once, from the smallest
offset any node needs; every node writes only what it lacks, appending to its partial file, and
renames the file into place when complete. Each node then checks the directory against the
manifest and only then writes its manifest (atomically). A node's manifest is removed before
its first changed byte is written, so a half-updated copy is never taken for a model.

A node that cannot keep its own copy (a full disk, a failed check) reports its failure and goes
on relaying, so the nodes after it still get theirs. A node that cannot be reached before it
has answered is reported as unreachable and the chain is joined around it.

The parts: `wire` (the messages on the stream and the events), `transport` (ssh to the next
node, the relay agent), `receiver` (a node's side), `sender` (the head's side).
"""
