"""The routes directory: one JSON file per replica (RouteFile), written atomically by the program.

Each gateway worker polls the directory's listing (names, inode, size, mtime: one scandir and a
stat per file, about every half second) and re-reads the files only when that changes. Polling,
not inotify: it costs nothing measurable next to the requests (bench/gateway/RESULTS.md), needs no
library, and sees a directory replaced or bind-mounted anew as readily as a file.

A file that cannot be used (bad JSON, a bad field, a model the config does not serve, a replica id
another file already has) is logged once, naming the file and the field, and left out.
"""

import asyncio
import json
import logging
import os
from pathlib import Path

from pydantic import ValidationError

from node_runtime.serving.gateway.config import RouteFile
from node_runtime.serving.gateway.replicas import Pools
from node_runtime.serving.spec import describe_validation_error

log = logging.getLogger("node_runtime.gateway")

POLL_S = 0.5

# One entry per route file: (name, inode, size, mtime in ns); a rename-into-place changes the inode.
Signature = tuple[tuple[str, int, int, int], ...]


def is_route_file(name: str) -> bool:
    """`*.json`, except names starting with "." (the program's files while it writes them)."""
    return name.endswith(".json") and not name.startswith(".")


class RouteFiles:
    def __init__(self, directory: str, models: list[str]):
        self.directory = Path(directory)
        self.models = set(models)
        self._signature: Signature | None = None
        self._logged: set[tuple] = set()  # (file version, problem): each logged once
        self._missing_logged = False

    def changed(self) -> dict[str, RouteFile] | None:
        """The routes by replica id when the directory changed since the last call (or on the first), else None."""
        signature = self._signature_now()
        if signature == self._signature:
            return None
        self._signature = signature
        self._logged = {(entry, problem) for entry, problem in self._logged if entry in signature}
        routes: dict[str, RouteFile] = {}
        for entry in signature:
            route = self._read(entry)
            if route is None:
                continue
            if route.replica in routes:
                self._log_once(entry, f"route file {self.directory / entry[0]}: replica: {route.replica!r} is already "
                                      "declared by another route file")
            else:
                routes[route.replica] = route
        return routes

    def _signature_now(self) -> Signature:
        entries = []
        try:
            with os.scandir(self.directory) as listing:
                for entry in listing:
                    if not is_route_file(entry.name):
                        continue
                    try:
                        stat = entry.stat()
                    except FileNotFoundError:  # renamed away since the listing: the next poll sees it
                        continue
                    entries.append((entry.name, stat.st_ino, stat.st_size, stat.st_mtime_ns))
        except FileNotFoundError:
            if not self._missing_logged:
                log.warning("routes_dir %s does not exist (yet): no replica is routed", self.directory)
            self._missing_logged = True
            return ()
        self._missing_logged = False
        return tuple(sorted(entries))

    def _read(self, entry: tuple) -> RouteFile | None:
        path = self.directory / entry[0]
        try:
            route = RouteFile.model_validate(json.loads(path.read_bytes()))
        except FileNotFoundError:
            return None
        except ValidationError as invalid:  # one line per bad field, each naming it
            self._log_once(entry, describe_validation_error(invalid, f"route file {path}"))
            return None
        except (ValueError, UnicodeDecodeError) as bad:
            self._log_once(entry, f"route file {path}: not valid JSON ({bad})")
            return None
        if route.model not in self.models:
            self._log_once(entry, f"route file {path}: model: {route.model!r} is not one of the config's models "
                                  f"({', '.join(sorted(self.models))})")
            return None
        return route

    def _log_once(self, entry: tuple, message: str) -> None:
        if (entry, message) not in self._logged:
            self._logged.add((entry, message))
            log.warning("%s (the file is ignored)", message)


async def follow(route_files: RouteFiles, pools: Pools, added: asyncio.Event) -> None:
    """Every POLL_S, the routed replicas made those the route files declare; `added` set when there are
    new ones (health.keep_checking checks them at once)."""
    while True:
        await asyncio.sleep(POLL_S)
        try:
            routes = route_files.changed()
            if routes is not None and pools.apply(routes):
                added.set()
            pools.forget_drained()
        except Exception:  # noqa: BLE001 — a bug here must not freeze the routes for good
            log.exception("reading the route files failed")
