"""How many CPUs this process may use: what ``listen.workers: auto`` runs.

Two limits apply, and the smaller one wins:

- the scheduler affinity mask (``taskset``, ``docker run --cpuset-cpus``,
  Kubernetes' static CPU manager): the CPUs the process may run on at all;
- the cgroup CPU quota (``docker run --cpus``, a Kubernetes CPU limit): how much
  CPU time per period the process's cgroup gets, however many CPUs it may use.
  cgroup v2 writes it as ``cpu.max`` (``QUOTA PERIOD`` or ``max PERIOD``), v1 as
  ``cpu.cfs_quota_us`` (``-1``: none) and ``cpu.cfs_period_us``. Every level from
  the process's cgroup up to the root may set one; the smallest counts. A quota of
  1.5 CPUs gives 2 workers (rounded up, as the JVM does: with 1 the other half
  CPU would go unused), never fewer than 1.

nginx's ``worker_processes auto`` looks at the affinity only; Envoy's default
concurrency likewise; in a container limited to 2 CPUs on a 64-core host they
would start 64. corsproxy starts 2.

Everything reads files under a root directory (``/`` by default) so tests can
give it a tree of their own.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

__all__ = ["CpuLimit", "cgroup_quota", "usable_cpus"]


@dataclass(frozen=True)
class CpuLimit:
    """``count`` CPUs, and ``why`` in words (for ``check`` and the start-up line)."""

    count: int
    why: str


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return None


def _cgroup_paths(root: str) -> dict[str, str]:
    """controller (``""`` for cgroup v2) -> the process's cgroup path, from
    ``/proc/self/cgroup``."""
    text = _read(os.path.join(root, "proc/self/cgroup")) or ""
    out: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if not controllers:
            out[""] = path
        for name in controllers.split(","):
            if name:
                out[name] = path
    return out


def _levels(base: str, path: str) -> list[str]:
    """``base/path`` and every ancestor up to ``base``, deepest first; when the
    path does not exist under ``base`` (a cgroup namespace: the process sees its
    own cgroup as the root), just ``base``."""
    path = path.strip("/")
    here = os.path.join(base, path) if path else base
    if not os.path.isdir(here):
        return [base]
    out = []
    while True:
        out.append(here)
        if os.path.normpath(here) == os.path.normpath(base):
            return out
        here = os.path.dirname(here)


def _v2_quota(root: str, path: str) -> tuple[float, str] | None:
    base = os.path.join(root, "sys/fs/cgroup")
    best: tuple[float, str] | None = None
    for level in _levels(base, path):
        text = _read(os.path.join(level, "cpu.max"))
        if not text:
            continue
        fields = text.split()
        if len(fields) != 2 or fields[0] == "max":
            continue
        try:
            quota, period = int(fields[0]), int(fields[1])
        except ValueError:
            continue
        if quota > 0 and period > 0 and (best is None or quota / period < best[0]):
            where = os.path.join(level, "cpu.max")[len(root.rstrip("/")):]
            best = (quota / period, f"cgroup v2 {where}: {quota} {period}")
    return best


def _v1_quota(root: str, path: str) -> tuple[float, str] | None:
    best: tuple[float, str] | None = None
    for mount in ("sys/fs/cgroup/cpu,cpuacct", "sys/fs/cgroup/cpu"):
        base = os.path.join(root, mount)
        if not os.path.isdir(base):
            continue
        for level in _levels(base, path):
            quota_text = _read(os.path.join(level, "cpu.cfs_quota_us"))
            period_text = _read(os.path.join(level, "cpu.cfs_period_us"))
            try:
                quota, period = int(quota_text or ""), int(period_text or "")
            except ValueError:
                continue
            if quota > 0 and period > 0 and (best is None or quota / period < best[0]):
                where = os.path.join(level, "cpu.cfs_quota_us")[len(root.rstrip("/")):]
                best = (quota / period, f"cgroup v1 {where}: {quota} per {period}")
        break
    return best


def cgroup_quota(root: str = "/") -> tuple[float, str] | None:
    """(CPUs, where it was read) of the tightest cgroup CPU quota on this process,
    or None when there is none (or no cgroup file system to read)."""
    paths = _cgroup_paths(root)
    if "" in paths:
        found = _v2_quota(root, paths[""])
        if found is not None:
            return found
    for controller in ("cpu", "cpuacct"):
        if controller in paths:
            return _v1_quota(root, paths[controller])
    return None


def usable_cpus(root: str = "/", affinity: int | None = None) -> CpuLimit:
    """The CPUs this process may use (see the module doc). ``affinity``: the size
    of the affinity mask, read from the scheduler when None."""
    if affinity is None:
        if hasattr(os, "sched_getaffinity"):
            affinity = len(os.sched_getaffinity(0))
        else:  # pragma: no cover - Linux has it
            affinity = os.cpu_count() or 1
    affinity = max(affinity, 1)
    quota = cgroup_quota(root)
    if quota is None:
        return CpuLimit(affinity, f"{affinity} CPU{'s' if affinity != 1 else ''} in the "
                                  f"affinity mask, no cgroup CPU quota")
    cpus, where = quota
    count = min(affinity, max(1, math.ceil(cpus - 1e-9)))
    return CpuLimit(count, f"{affinity} CPU{'s' if affinity != 1 else ''} in the affinity "
                           f"mask, cgroup CPU quota {cpus:g} ({where})")
