"""A CPU limit per worker process, so that worker scaling can be measured on a small machine.

On a 2-core machine wrk, Redis and the collector share the cores with the service, so a
second worker finds little CPU left to use whatever the service does. Capping every
worker at the same fraction of a core (a cgroup each, with a CPU quota) leaves the rest
of the machine to the others, and 2 capped workers against 1 then says whether the
service itself scales with the CPU it is given.

Needs root: the groups are made at the top of cgroup v1's ``cpu`` hierarchy, or of the
cgroup v2 tree when its ``cpu`` controller is enabled there.
"""

import errno
import os
import sys
import time
from pathlib import Path

V1_ROOT = Path("/sys/fs/cgroup/cpu")
V2_ROOT = Path("/sys/fs/cgroup")
# A short period spreads a worker's quota over the second instead of handing it out in
# 100 ms slices with 100 ms stalls between them. The kernel's smallest quota is 1 ms.
PERIOD_US = 10_000
MIN_CPUS = 1_000 / PERIOD_US


class CpuCapUnavailable(RuntimeError):
    pass


def check_cpus(cpus: float) -> None:
    if not MIN_CPUS <= cpus <= (os.cpu_count() or 1):
        raise CpuCapUnavailable(f"a cap is between {MIN_CPUS:g} and the core count, not {cpus:g}")


class CpuCap:
    """One cgroup per process, each limited to ``cpus`` of a core; removed by ``close``."""

    def __init__(self, cpus: float) -> None:
        check_cpus(cpus)
        self._quota_us = int(cpus * PERIOD_US)
        self._groups: list[Path] = []

    def limit(self, pid: int) -> None:
        group = self._make_group(f"identity-bench-{os.getpid()}-{pid}-{time.monotonic_ns()}")
        self._groups.append(group)
        (group / "cgroup.procs").write_text(str(pid))

    def close(self) -> None:
        """Remove the groups once their processes have exited; report any left behind."""
        for group in self._groups:
            for _ in range(50):  # a process that just exited may hold its group briefly
                try:
                    group.rmdir()
                    break
                except OSError as exc:
                    if exc.errno != errno.EBUSY:
                        print(f"cannot remove {group}: {exc.strerror}", file=sys.stderr)
                        break
                    time.sleep(0.1)
            else:
                print(f"cannot remove {group}: still in use", file=sys.stderr)
        self._groups.clear()

    def _make_group(self, name: str) -> Path:
        if (V1_ROOT / "cpu.cfs_quota_us").exists():
            limits = {"cpu.cfs_period_us": str(PERIOD_US), "cpu.cfs_quota_us": str(self._quota_us)}
            return self._create(V1_ROOT / name, limits)
        controllers = V2_ROOT / "cgroup.subtree_control"
        if controllers.exists() and "cpu" in controllers.read_text().split():
            return self._create(V2_ROOT / name, {"cpu.max": f"{self._quota_us} {PERIOD_US}"})
        raise CpuCapUnavailable(
            "no cgroup CPU controller to write to (cgroup v1 cpu, or v2 with cpu enabled)"
        )

    @staticmethod
    def _create(group: Path, limits: dict[str, str]) -> Path:
        try:
            group.mkdir()
        except OSError as exc:
            raise CpuCapUnavailable(f"cannot create {group}: {exc.strerror}") from exc
        try:
            for name, value in limits.items():
                (group / name).write_text(value)
        except OSError as exc:
            group.rmdir()
            raise CpuCapUnavailable(f"cannot set {group}'s limit: {exc.strerror}") from exc
        return group
