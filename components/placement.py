"""Where every replica of every model runs: a home node and a set of devices no other replica uses.

A replica that fits on one node runs there alone on its devices (vLLM's own executor); a replica
bigger than a node spans whole nodes through Ray, which is told only the devices that replica owns
(one per stack: Ray would place the stages of two wherever devices are free).
Pure: the planner sees node device counts and the models' layouts, nothing else.

The order is fixed so that one model's change moves no other model while the devices allow it:
replicas spanning nodes first (they need whole nodes), then replica 0 of every model in config
order, then replica 1 of every model, and so on, then models that take what is left (replicas: 0).
"""

from __future__ import annotations

from dataclasses import dataclass

# A model's replicas on one node get ports port, port + 100, port + 200, ...
PORT_STRIDE = 100


class PlacementError(ValueError):
    """Replicas that do not fit; the message starts with the stack key to change."""


@dataclass(frozen=True)
class Demand:
    """What one model asks for: `replicas` copies (0 = as many as fit) of `world` devices each."""

    key: str  # models[i], for messages
    replicas: int
    world: int
    # Whether each replica spans whole nodes (more devices than any one node has).
    spans_nodes: bool
    # Room for a second copy of the (one) replica on the same node: its blue-green spare.
    spare: bool = False


@dataclass(frozen=True)
class Slot:
    """One replica's place: nodes (home first), the devices it uses on each, its slot on its home node."""

    nodes: tuple[int, ...]
    devices: tuple[int, ...]
    ordinal: int  # how many replicas of the same model sit on its home node before it


def _aligned_block(free: list[bool], size: int) -> tuple[int, ...] | None:
    """The lowest `size` free devices starting at a multiple of `size` (one TP group per block);
    any lowest contiguous run when `size` does not divide the node."""
    step = size if len(free) % size == 0 else 1
    for start in range(0, len(free) - size + 1, step):
        if all(free[start:start + size]):
            return tuple(range(start, start + size))
    return None


class _Devices:
    def __init__(self, gpus: list[int]):
        self.free = [[True] * count for count in gpus]

    def take(self, node: int, devices: tuple[int, ...]) -> None:
        for device in devices:
            self.free[node][device] = False

    def count(self, node: int) -> int:
        return sum(self.free[node])


def place(gpus: list[int], demands: list[Demand]) -> list[list[Slot]]:
    """Slots per demand, in demand order. Raises PlacementError naming the first key that does not fit."""
    if not any(gpus):
        return _place_without_devices(len(gpus), demands)
    devices = _Devices(gpus)
    slots: list[list[Slot]] = [[] for _ in demands]
    hosted: list[dict[int, int]] = [{} for _ in demands]  # per demand: node -> replicas there

    def put(d: int, nodes: tuple[int, ...], taken: tuple[int, ...]) -> None:
        for node in nodes:
            devices.take(node, taken)
        home = nodes[0]
        slots[d].append(Slot(nodes, taken, hosted[d].get(home, 0)))
        hosted[d][home] = hosted[d].get(home, 0) + 1

    for d, demand in enumerate(demands):
        if not demand.spans_nodes:
            continue
        # The checks allow one spanning replica, over nodes of one size, placed before anything else.
        per_node = gpus[0]
        put(d, tuple(range(demand.world // per_node)), tuple(range(per_node)))

    def place_one(d: int, nodes: list[int] | None = None) -> bool:
        demand = demands[d]

        def fits(node: int) -> tuple[int, ...] | None:
            return _aligned_block(devices.free[node], demand.world) if demand.world <= gpus[node] else None

        candidates = [(n, block) for n in (nodes or range(len(gpus))) if (block := fits(n))]
        if not candidates:
            return False
        # Spread a model over nodes first, then fill the emptiest node; head first on ties.
        node, block = min(candidates, key=lambda c: (hosted[d].get(c[0], 0), -devices.count(c[0]), c[0]))
        put(d, (node,), block)
        return True

    counted = [d for d, demand in enumerate(demands) if not demand.spans_nodes and demand.replicas]
    for round_ in range(max((demands[d].replicas for d in counted), default=0)):
        for d in counted:
            demand = demands[d]
            if demand.replicas > round_ and not place_one(d):
                raise PlacementError(
                    f"{demand.key}.replicas: replica {round_ + 1} of {demand.replicas} "
                    f"({demand.world} devices on one node) does not fit in the devices left "
                    f"({', '.join(str(devices.count(n)) for n in range(len(gpus)))} free per node); "
                    "lower replicas or tensorParallelSize, or add nodes"
                )
            if round_ == 0 and demand.spare and not place_one(d, [slots[d][0].nodes[0]]):
                raise PlacementError(
                    f"{demand.key}.updateStrategy: blueGreen needs room for a second copy ({demand.world} devices) "
                    "on the node of the first, and there is none; "
                    "use the rolling strategy with replicas: 2, or give the other models fewer devices"
                )
    for d, demand in enumerate(demands):
        if not demand.spans_nodes and demand.replicas == 0:
            while place_one(d):
                pass
            if not slots[d]:
                raise PlacementError(
                    f"{demand.key}.replicas: 0 (as many as fit) found no {demand.world} free devices on any node; "
                    "lower tensorParallelSize or give the other models fewer replicas"
                )
    return slots


def _place_without_devices(nodes: int, demands: list[Demand]) -> list[list[Slot]]:
    """CPU nodes: replica r of a model on node r mod N (replicas: 0 = one per node); a blue-green
    spare beside its replica."""
    slots = []
    for demand in demands:
        count = demand.replicas or nodes
        slots.append([Slot((r % nodes,), (), r // nodes) for r in range(count)] + ([Slot((0,), (), 1)] if demand.spare else []))
    return slots
