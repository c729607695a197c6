"""A CPU limit per worker process, so that worker scaling can be measured on a small machine.

On a 2-core machine wrk, Redis and the collector share the cores with the service, so a
second worker finds little CPU left to use whatever the service does. Capping every
worker at the same fraction of a core (a cgroup each, with a CPU quota) leaves the rest
of the machine to the others, and 2 capped workers against 1 then says whether the
service itself scales with the CPU it is given.

Needs a writable cgroup CPU controller: cgroup v1's ``cpu`` hierarchy or cgroup v2 with
the ``cpu`` controller enabled (as root, or in a delegated subtree).
"""

import os
from pathlib import Path

V1_ROOT = Path("/sys/fs/cgroup/cpu")
V2_ROOT = Path("/sys/fs/cgroup")
# A short period spreads a worker's quota over the second instead of handing it out in
# 100 ms slices with 100 ms stalls between them.
PERIOD_US = 10_000


class CpuCapUnavailable(RuntimeError):
    pass


class CpuCap:
    """One cgroup per process, each limited to ``cpus`` of a core; removed by ``close``."""

    def __init__(self, cpus: float) -> None:
        if not 0.01 <= cpus <= (os.cpu_count() or 1):
            raise ValueError(
                f"a worker's CPU cap must be between 0.01 and the core count, not {cpus}"
            )
        self._quota_us = int(cpus * PERIOD_US)
        self._groups: list[Path] = []

    def limit(self, pid: int) -> None:
        group = self._make_group(f"identity-bench-{os.getpid()}-{pid}")
        self._groups.append(group)
        (group / "cgroup.procs").write_text(str(pid))

    def close(self) -> None:
        """Remove the groups; each must be empty, so call it after the processes exited."""
        for group in self._groups:
            group.rmdir()
        self._groups.clear()

    def _make_group(self, name: str) -> Path:
        if (V1_ROOT / "cpu.cfs_quota_us").exists():
            group = V1_ROOT / name
            self._create(group)
            (group / "cpu.cfs_period_us").write_text(str(PERIOD_US))
            (group / "cpu.cfs_quota_us").write_text(str(self._quota_us))
            return group
        controllers = V2_ROOT / "cgroup.subtree_control"
        if controllers.exists() and "cpu" in controllers.read_text().split():
            group = V2_ROOT / name
            self._create(group)
            (group / "cpu.max").write_text(f"{self._quota_us} {PERIOD_US}")
            return group
        raise CpuCapUnavailable(
            "no cgroup CPU controller to write to (cgroup v1 cpu, or v2 with cpu enabled)"
        )

    @staticmethod
    def _create(group: Path) -> None:
        try:
            group.mkdir()
        except OSError as exc:
            raise CpuCapUnavailable(f"cannot create {group}: {exc.strerror}") from exc
