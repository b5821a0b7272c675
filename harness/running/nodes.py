"""The drivers of a multi-node grid, keeping each other in step.

Every node runs its own ``ftbench run`` with the same grid and its own
``--node-rank``.  Node 0 leads: it alone decides which cells run (it holds
the result set, so resume follows its records), runs the single-process
cells, and writes every record.  The other nodes only *follow* the grid's
multi-node cells, starting their share of each world when node 0 says so.

They talk through a key-value store that node 0's driver hosts at
``--master-addr:--master-port`` (torch's ``TCPStore``, the store torchrun
itself uses), listening on the interface of ``--master-addr`` only
(:mod:`ftbench.harness.running.listen`); each cell's own torchrun rendezvous gets a fresh port that
node 0 picks and publishes.  At the first contact every node checks that
all of them expanded the same grid (a fingerprint of the cell list) and
refuses to start otherwise.  Every follower sends a heartbeat; node 0 ends
a cell as ``error`` when a follower stops beating, and a follower stops
its share of a cell when node 0 ends that cell or disappears.

Example (two shells on one machine)::

    ftbench run --backend ddp --nnodes 2 --node-rank 0 --master-addr 127.0.0.1 --out runs/two
    ftbench run --backend ddp --nnodes 2 --node-rank 1 --master-addr 127.0.0.1
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta

from ftbench.harness.contract.api import FtbenchError
from ftbench.harness.running.listen import bound_store
from ftbench.harness.contract.config import Launch

#: How long the nodes wait for each other at the start of a grid (override: FTBENCH_RENDEZVOUS_TIMEOUT_S).
RENDEZVOUS_TIMEOUT_S = 900.0
#: A follower silent this long is taken for dead (override: FTBENCH_NODE_TIMEOUT_S).
NODE_TIMEOUT_S = 30.0
HEARTBEAT_S = 1.0
#: How often a wait looks again, and the longest single connection try: the most a signal waits.
POLL_S = 0.2
CONNECT_TRY_S = 1.0


class NodeLost(RuntimeError):
    """A follower lost node 0 (it died or was stopped); the follower stops too."""


def multi_node(spec) -> bool:
    return spec.nnodes > 1


def grid_fingerprint(cells) -> str:
    """Hash of the ordered cell list (ids, repeats, rank counts, node counts): equal on every node
    that expanded the same grid."""
    items = [[c.cell_id, c.repeat, c.nproc, c.nnodes] for c in cells]
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


def _host_identity() -> str:
    # Two nodes on one machine (loopback) share the boot id; they then share its cores.
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


def _poll(ready, deadline: float) -> bool:
    """Wait until ``ready()`` or the deadline, in short sleeps that a signal interrupts."""
    while not ready():
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL_S)
    return True


def _clock(seconds_from_now: float) -> str:
    """Local wall-clock time ``seconds_from_now`` ahead, as a progress line shows it."""
    return time.strftime("%H:%M:%S", time.localtime(time.time() + seconds_from_now))


def is_loopback(addr: str) -> bool:
    try:
        return ipaddress.ip_address(socket.gethostbyname(addr)).is_loopback
    except (OSError, ValueError):
        return False


def free_port() -> int:
    # What torchrun --standalone does: let the kernel pick, then hand the number on.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


@dataclass
class NodeGroup:
    """This driver's place in a multi-node grid; see the module docstring."""

    nnodes: int
    node_rank: int
    master_addr: str
    master_port: int
    store: object = None
    #: Where node 0's store listens: {"bind": ADDRESS, "port": PORT} (node 0 only).
    bind: dict | None = None
    #: node rank -> what that node said at the rendezvous (host, cpus, fingerprint).
    peers: dict = field(default_factory=dict)
    _beats: dict = field(default_factory=dict)
    _cell_ports: dict = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)

    @classmethod
    def from_launcher(cls, launch: Launch) -> "NodeGroup | None":
        nnodes = launch.nnodes_or_1
        if nnodes <= 1:
            return None
        rank = launch.rank
        if not 0 <= rank < nnodes:
            raise FtbenchError(f"--node-rank {rank} is outside 0..{nnodes - 1} for --nnodes {nnodes}; number the "
                               f"nodes 0 to {nnodes - 1} and start node 0 on the --master-addr host")
        return cls(nnodes, rank, launch.addr, launch.port)

    @property
    def leader(self) -> bool:
        return self.node_rank == 0

    # ------------------------------------------------------------ rendezvous

    def rendezvous(self, cells, say=None) -> None:
        """Meet the other nodes and check they expanded the same grid; raise :class:`FtbenchError` if not.

        Every wait here polls, so that Ctrl-C and SIGTERM end it at once (a
        wait inside torch's store would hold the signal until its time-out),
        and ``say(line)`` is told what this node waits for and until when.
        """
        timeout = _env_float("FTBENCH_RENDEZVOUS_TIMEOUT_S", RENDEZVOUS_TIMEOUT_S)
        deadline = time.monotonic() + timeout
        say = say or (lambda line: None)
        try:
            if self.leader:
                self.store, self.bind = bound_store(self.master_addr, self.master_port, None, timeout)
            else:
                say(f"node {self.node_rank}: connecting to node 0 at {self.master_addr}:{self.master_port} "
                    f"until {_clock(timeout)} (Ctrl-C stops)")
                self.store = self._connect(deadline)
        except Exception as e:  # noqa: BLE001 - torch raises RuntimeError/DistNetworkError variants
            where = "listen on" if self.leader else "reach node 0 at"
            raise FtbenchError(f"node {self.node_rank} could not {where} {self.master_addr}:{self.master_port} "
                               f"({str(e).splitlines()[0][:200]}); start node 0 first on the host named by "
                               "--master-addr, and pick a free --master-port that every node can reach") from None
        me = {"fingerprint": grid_fingerprint(cells), "cells": len(cells), "host": _host_identity(),
              "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()}
        self.store.set(f"node/{self.node_rank}", json.dumps(me))
        keys = [f"node/{r}" for r in range(self.nnodes)]
        if not self.store.check(keys):
            others = ", ".join(str(r) for r in range(self.nnodes) if r != self.node_rank)
            say(f"node {self.node_rank}: waiting for node(s) {others} of {self.nnodes} at {self.master_addr}:"
                f"{self.master_port} until {_clock(timeout)} (Ctrl-C stops)")
        if not _poll(lambda: self.store.check(keys), deadline):
            missing = [k.split("/")[1] for k in keys if not self.store.check([k])]
            raise FtbenchError(f"node(s) {', '.join(missing)} of {self.nnodes} did not join within {timeout:g} s; "
                               "start every node with the same command (same grid, --nnodes, --master-addr, "
                               "--master-port) and its own --node-rank") from None
        self.peers = {r: json.loads(self.store.get(f"node/{r}")) for r in range(self.nnodes)}
        self.store.set(f"checked/{self.node_rank}", "1")
        if self.leader:
            # Hold the store open until every node has read what it needs, mismatch or not.
            checked = [f"checked/{r}" for r in range(self.nnodes)]
            _poll(lambda: self.store.check(checked), time.monotonic() + 60)
        self._check_same_grid()
        self._start_heartbeat()

    def _connect(self, deadline: float):
        """A follower's client store, retried in short tries so that a signal is never held for long."""
        from torch.distributed import TCPStore

        while True:
            left = deadline - time.monotonic()
            try:
                return TCPStore(self.master_addr, self.master_port, None, False,
                                timedelta(seconds=max(0.1, min(CONNECT_TRY_S, left))), wait_for_workers=False)
            except Exception:  # noqa: BLE001 - node 0 not listening yet
                if time.monotonic() >= deadline:
                    raise
                time.sleep(POLL_S)

    def _check_same_grid(self) -> None:
        mine = self.peers[self.node_rank]
        for r, peer in sorted(self.peers.items()):
            if peer["fingerprint"] != mine["fingerprint"]:
                raise FtbenchError(
                    f"node {r} expanded a different grid from node {self.node_rank} ({peer['cells']} vs "
                    f"{mine['cells']} cells, grid fingerprints {peer['fingerprint']} vs {mine['fingerprint']}); "
                    "nothing was run. Start every node with the same command — same grid file, flags and "
                    "ftbench version — differing only in --node-rank (and --out, which only node 0 uses)")

    # ------------------------------------------------------------- the world

    def cell_env(self, spec) -> dict:
        """Environment for this node's share of a multi-node cell.

        Nodes that share a machine (a loopback test) share its cores: without
        a thread count, each rank's OpenMP pool takes every core and the
        ranks' spinning threads starve each other (torchrun sets one thread
        per rank only for several ranks *per node*).  On loopback, gloo is
        also told to use the loopback interface.
        """
        env = {}
        mine = self.peers.get(self.node_rank, {})
        sharing = sum(1 for p in self.peers.values() if p.get("host") == mine.get("host"))
        if sharing > 1 and "OMP_NUM_THREADS" not in os.environ:
            env["OMP_NUM_THREADS"] = str(max(1, int(mine.get("cpus") or 1) // (sharing * max(1, spec.nproc))))
        if is_loopback(self.master_addr) and "GLOO_SOCKET_IFNAME" not in os.environ:
            env["GLOO_SOCKET_IFNAME"] = "lo"
        return env

    def with_port(self, spec, port: int):
        return spec.with_(launcher=spec.launcher.with_(master_port=port))

    # -------------------------------------------------------------- protocol

    def announce(self, k: int, spec, run: bool) -> object:
        """Node 0: tell the followers whether multi-node cell ``k`` runs; returns the spec to run."""
        if not run:
            self.store.set(f"cell/{k}", "skip")
            return spec
        port = free_port()
        self.store.set(f"cell/{k}", json.dumps({"cell_id": spec.cell_id, "repeat": spec.repeat, "port": port}))
        self._cell_ports[k] = port
        return self.with_port(spec, port)

    def launch_details(self, k: int) -> dict:
        """For the record's ``launch``: where the grid's store and multi-node cell ``k``'s store listened."""
        # The cell's own store is torchrun's, which listens on every interface (docs/reliability.md).
        return {"grid_store": self.bind, "store": {"bind": "*", "port": self._cell_ports.get(k), "by": "torchrun"}}

    def finished(self, k: int, status: str) -> None:
        self._safe(lambda: self.store.set(f"end/{k}", status))

    def stop_all(self) -> None:
        """Node 0 stops early (fail-fast, Ctrl-C, an error): followers stop waiting."""
        self._safe(lambda: self.store.set("stop", "1"))

    def next_cell(self, k: int, spec) -> object | None:
        """A follower: wait for node 0's word on multi-node cell ``k``; None when it is skipped or the grid ends."""
        while True:
            # The cell's word first: node 0 may have announced it and stopped right after.
            if self.store.check([f"cell/{k}"]):
                word = self.store.get(f"cell/{k}").decode()
                if word == "skip":
                    return False
                msg = json.loads(word)
                if msg["cell_id"] != spec.cell_id or msg["repeat"] != spec.repeat:
                    raise FtbenchError(f"node 0 started cell {msg['cell_id']} where this node expected "
                                       f"{spec.cell_id}; start every node with the same command")
                return self.with_port(spec, msg["port"])
            if self.store.check(["stop"]) and not self.store.check([f"cell/{k}"]):
                return None
            time.sleep(0.2)

    def leader_watch(self):
        """Node 0, during a cell: a reason to end the cell when a follower stops beating."""
        timeout = _env_float("FTBENCH_NODE_TIMEOUT_S", NODE_TIMEOUT_S)
        now = time.monotonic()
        for r in range(1, self.nnodes):
            self._beats.setdefault(r, (self._beat(r), now))

        def check() -> str | None:
            t = time.monotonic()
            for r in range(1, self.nnodes):
                count = self._beat(r)
                last_count, last_t = self._beats[r]
                if count != last_count:
                    self._beats[r] = (count, t)
                elif t - last_t > timeout:
                    return (f"node {r} of {self.nnodes} stopped responding (no heartbeat for {t - last_t:.0f} s): "
                            "its ftbench or machine died; the cell was stopped on every node")
            return None
        return check

    def follower_watch(self, k: int):
        """A follower, during cell ``k``: a reason to stop its share when node 0 ended the cell or is gone."""
        def check() -> str | None:
            try:
                if self.store.check([f"end/{k}"]) or self.store.check(["stop"]):
                    return "node 0 ended the cell"
            except Exception:  # noqa: BLE001
                return "node 0 is gone"
            return None
        return check

    def _beat(self, r: int) -> int:
        try:
            return int(self.store.add(f"hb/{r}", 0))
        except Exception:  # noqa: BLE001
            return -1

    def _start_heartbeat(self) -> None:
        if self.leader:
            return
        from torch.distributed import TCPStore

        # A connection of its own: the main thread's store calls may block in a wait.
        beat_store = TCPStore(self.master_addr, self.master_port, None, False, timedelta(seconds=30),
                              wait_for_workers=False)

        def loop():
            while not self._stop.wait(HEARTBEAT_S):
                try:
                    beat_store.add(f"hb/{self.node_rank}", 1)
                except Exception:  # noqa: BLE001 - node 0 gone: the main thread finds out on its own
                    return
        threading.Thread(target=loop, name="ftbench-heartbeat", daemon=True).start()

    def close(self) -> None:
        self._stop.set()

    def say_bye(self) -> None:
        """A follower leaving: node 0 may now close the store."""
        self._safe(lambda: self.store.set(f"bye/{self.node_rank}", "1"))

    def farewell(self, timeout_s: float = 15.0) -> None:
        """Node 0 leaving: let the followers read the last word before the store closes with us."""
        if self.store is None:
            return
        deadline = time.monotonic() + timeout_s
        last = {r: (self._beat(r), time.monotonic()) for r in range(1, self.nnodes)}
        while time.monotonic() < deadline:
            pending = []
            for r in range(1, self.nnodes):
                if self.store.check([f"bye/{r}"]):
                    continue
                count = self._beat(r)
                if count != last[r][0]:
                    last[r] = (count, time.monotonic())
                if time.monotonic() - last[r][1] < 3 * HEARTBEAT_S + 1:  # still beating: still reading
                    pending.append(r)
            if not pending:
                return
            time.sleep(0.2)

    def _safe(self, fn) -> None:
        try:
            fn()
        except Exception:  # noqa: BLE001 - a follower that is gone needs no message
            pass
