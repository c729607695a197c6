"""CPU a request's metrics cost on the hot path, in one process and in the multiprocess
mode of ``serve --workers N``: the service's tallies (``Metrics.request``, a bound counter)
next to prometheus_client's own ``inc`` and ``observe`` on the same children.

    .venv/bin/python bench/metrics_cost.py

Prints the best of several rounds in µs a call (CPU time, so a busy machine skews less).
"""

import tempfile
import time
from collections.abc import Callable

from identity_service import metrics

ROUTE = "/v1/handoffs"
CALLS = 200_000
ROUNDS = 7


def best_of(call: Callable[[], None]) -> float:
    """The fewest µs of CPU a call took over ROUNDS rounds of CALLS calls."""
    rounds = []
    for _ in range(ROUNDS):
        started = time.process_time()
        for _ in range(CALLS):
            call()
        rounds.append((time.process_time() - started) / CALLS * 1e6)
    return min(rounds)


def measure(mode: str) -> None:
    counted = metrics.Metrics()
    counted.add_routes([ROUTE])
    tally = counted.counter("identity_handoffs_prepared_total", source="shop")
    child = counted._counters["identity_handoffs_prepared_total"].labels("shop")
    histogram = counted._durations.labels(ROUTE)

    def inc_and_observe() -> None:
        child.inc()
        histogram.observe(0.0004)

    figures = {
        "Metrics.request (tallied)": best_of(lambda: counted.request(ROUTE, "POST", 201, 0.0004)),
        "counter inc (tallied)": best_of(tally),
        "prometheus_client inc + observe": best_of(inc_and_observe),
        "prometheus_client inc": best_of(child.inc),
    }
    counted.flush()
    for name, micros in figures.items():
        print(f"{mode:<14} {name:<34} {micros:6.2f} µs")


def main() -> None:
    measure("one process")
    with tempfile.TemporaryDirectory() as directory:
        metrics.use_directory(directory)
        try:
            measure("multiprocess")
        finally:
            metrics.use_directory(None)


if __name__ == "__main__":
    main()
