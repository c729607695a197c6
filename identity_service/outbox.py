"""Runs the forwarders of every configured destination, inside ``serve`` or alone."""

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import structlog

from identity_service.crypto import OutboxSealer
from identity_service.feeds import Feed, MemoryFeed, RedisFeed
from identity_service.forwarder import IDLE_READ_SECONDS, Forwarder
from identity_service.metrics import Metrics
from identity_service.settings import Settings
from identity_service.sinks import open_sink
from identity_service.stores.memory import MemoryOutbox
from identity_service.stores.redis import connect, follow_master
from identity_service.stores.topology import Commands, lean_client

logger = structlog.get_logger(__name__)


@asynccontextmanager
async def running_forwarders(
    settings: Settings, metrics: Metrics, memory: MemoryOutbox | None = None
) -> AsyncIterator[list[Forwarder]]:
    """Start one forwarder per destination; on exit stop them within the shutdown timeout,
    finishing batches in flight (the memory queues: one more attempt, then a count of what
    is left)."""
    redis = None
    if settings.redis is not None:
        # For the rarer commands (groups, reclaim, trim, dead letters), one at a time per
        # forwarder; the blocking reads have connections of their own (below).
        redis = connect(
            dataclasses.replace(
                settings.redis, max_connections=1 + len(settings.outbox.destinations)
            )
        )
    unrouted = settings.outbox.routed_nowhere([source.name for source in settings.sources])
    if unrouted:
        # A configuration that may be meant (a site whose events nobody wants), but more
        # likely a site added to sources and to no destination's sources list.
        logger.warning("outbox_sources_routed_nowhere", sources=unrouted)
    forwarders = []
    clients: list[Commands] = []
    store = settings.redis.address if settings.redis is not None else "memory"
    for destination in settings.outbox.destinations:
        feed: Feed
        if redis is not None and settings.redis is not None:
            # Its own connection: the feed's blocking reads hold it.
            commands = lean_client(settings.redis, settings.redis.timeout + IDLE_READ_SECONDS)
            clients.append(commands)
            follow_master(commands, redis)
            feed = RedisFeed(
                redis,
                commands,
                settings.redis.key_prefix,
                destination.name,
                OutboxSealer(settings.secret),
                settings.outbox.reclaim_idle,
                [d.name for d in settings.outbox.destinations],
                destination.addressed_only,
                destination.sources,
                settings.redis.shards,
                # Events without a destination wait for one: nothing trims them.
                trim=not settings.outbox.events_wait,
            )
        else:
            assert memory is not None, "the memory store's outbox is needed without Redis"
            queue = memory.subscribe(
                destination.name, destination.addressed_only, destination.sources
            )
            feed = MemoryFeed(queue)
        sink = open_sink(destination, settings.outbox)
        forwarders.append(
            Forwarder(
                destination.name,
                feed,
                sink,
                settings.outbox,
                metrics,
                store,
                batched=destination.batched,
            )
        )
    tasks = [asyncio.create_task(forwarder.run()) for forwarder in forwarders]
    try:
        yield forwarders
    finally:
        for forwarder in forwarders:
            forwarder.stopping.set()
        # The forwarders' whole stop, the memory queues' last attempt included, takes at
        # most shutdown_timeout: the grace period counts it once (docs/operations.md).
        loop = asyncio.get_running_loop()
        deadline = loop.time() + settings.shutdown_timeout
        await _within(tasks, settings.shutdown_timeout)
        if redis is None and memory is not None:
            # Nothing keeps the memory queues past the process: one more attempt at what
            # they hold, all destinations at once, in what is left of the timeout.
            left = max(0.0, deadline - loop.time())
            drains = [asyncio.create_task(f.drain(seconds=left)) for f in forwarders]
            await _within(drains, left)
            _warn_undelivered(memory)
        for forwarder in forwarders:
            await forwarder.close()
        for client in clients:
            await client.close()
        if redis is not None:
            await redis.aclose()


async def _within(tasks: list[asyncio.Task[None]], seconds: float) -> None:
    """Wait up to ``seconds`` for ``tasks``, then cancel those still running and wait for
    them to unwind: nothing after may run under a forwarder still at work."""
    if not tasks:
        return
    _, late = await asyncio.wait(tasks, timeout=seconds)
    for task in late:
        task.cancel()
    await asyncio.gather(*late, return_exceptions=True)


def _warn_undelivered(memory: MemoryOutbox) -> None:
    """Say, in one line, how many events the memory queues still hold at the stop: they
    end with the process. Counts only, never the events or their ids."""
    left = {queue.name: queue.undelivered for queue in memory.queues if queue.undelivered}
    if left:
        logger.warning("outbox_events_undelivered", events=sum(left.values()), destinations=left)
