"""The hot path on PostgreSQL: a batch checked against the threads as this replica saw them
and written in one statement must never act on a row another replica changed since
(docs/checkpoint-service.md#the-hot-path-on-postgresql)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any, Literal

import asyncpg
import pytest

from checkpoint_svc import metrics
from checkpoint_svc.domain import Checkpoint, NewEvent, SaveCommand, ThreadKey, Tier
from checkpoint_svc.errors import (
    HeadMoved,
    LeaseLost,
    NotFound,
    RequiredHeadMoved,
    TierUnavailable,
)
from checkpoint_svc.store import CheckpointStore
from checkpoint_svc.tiers.pg import libpq_url
from tests.servers import running_store

KEY = ThreadKey("t1", "runs", "shared")


def _cmd(
    state: bytes = b"{}", step: int = 0, key: ThreadKey = KEY, **fields: object
) -> SaveCommand:
    cp = Checkpoint(key=key, checkpoint_id="", state=state, step=step)
    return SaveCommand(checkpoint=cp, **fields)


@contextlib.asynccontextmanager
async def _replica(
    backend, redis_url: str | None, single_writer: Literal["yes", "no", "auto"] = "auto"
) -> AsyncIterator[CheckpointStore]:
    """Another store on the backend's database (the sweeper off)."""
    async with running_store(backend.db_url, redis_url, single_writer=single_writer) as replica:
        yield replica


@pytest.fixture
async def other(backend) -> AsyncIterator[CheckpointStore]:
    """A second replica on the same database."""
    async with _replica(backend, backend.redis_url) as replica:
        yield replica


@pytest.mark.parametrize("backend", ["postgres", "postgres+redis"], indirect=True)
async def test_a_row_changed_by_another_replica_is_never_overwritten(store, other) -> None:
    first = await store.save(_cmd())
    await store.save(_cmd(request_id="warm"))  # this replica has seen the thread now
    # The other replica takes the lease: writes without its token must now be refused here.
    lease = await other.acquire_lease(KEY, "engine-b", 30.0)
    with pytest.raises(LeaseLost):
        await store.save(_cmd(b'{"late": true}'))
    # It moves the head: a save expecting the old head is refused, not applied.
    moved = await other.save(_cmd(fencing_token=lease.fencing_token))
    with pytest.raises(HeadMoved):
        await store.save(
            _cmd(
                expected_parent_id=first.checkpoint.checkpoint_id, fencing_token=lease.fencing_token
            )
        )
    saved = await store.save(
        _cmd(
            expected_parent_id=moved.checkpoint.checkpoint_id,
            fencing_token=lease.fencing_token,
            events=[NewEvent("x.happened")],
        )
    )
    assert saved.checkpoint.parent_id == moved.checkpoint.checkpoint_id
    head = await other.restore(KEY)
    assert head.checkpoint.checkpoint_id == saved.checkpoint.checkpoint_id
    # A replayed request id is answered as the replay it is, on either replica.
    again = await store.save(_cmd(request_id="warm", fencing_token=lease.fencing_token))
    assert again.replayed
    # Seqs stayed dense across both replicas' writes.
    events = await store.sql.events_after(KEY.tenant, KEY, 0, 100)
    assert [e.seq for e in events] == list(range(1, len(events) + 1))


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
async def test_two_replicas_saving_one_thread_lose_nothing(store, other) -> None:
    """Both replicas save to one thread as fast as they can, each on the head it last saw
    (so each keeps meeting rows the other changed): every acknowledged save is in the
    chain, the chain is unbroken, and the feed has no gap."""
    await store.save(_cmd())
    acknowledged: list[str] = []

    async def keep_saving(replica: CheckpointStore, n: int) -> None:
        for i in range(n):
            head = (await replica.restore(KEY)).checkpoint.checkpoint_id
            try:
                done = await replica.save(_cmd(f'{{"i": {i}}}'.encode(), expected_parent_id=head))
            except HeadMoved:
                continue
            acknowledged.append(done.checkpoint.checkpoint_id)

    await asyncio.gather(keep_saving(store, 60), keep_saving(other, 60))
    listed = await store.list(KEY, 1000)
    by_id = {c.checkpoint_id: c for c in listed[0]}
    assert set(acknowledged) <= by_id.keys()
    head = (await other.restore(KEY)).checkpoint
    chain, at = [], head
    while at.parent_id:
        chain.append(at.checkpoint_id)
        at = by_id[at.parent_id]
    assert set(acknowledged) <= set(chain), "an acknowledged save is off the chain"
    events = await store.sql.events_after(KEY.tenant, KEY, 0, 1000)
    assert [e.seq for e in events] == list(range(1, len(events) + 1))


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
async def test_a_thread_taken_for_new_that_exists_is_written_the_long_way(store, other) -> None:
    """A batch takes a thread this replica never saw for new and inserts it in its one
    statement; if another replica made it (or left a tombstone), the insert fails it whole
    and the long way writes it on top of the row that is there."""
    key = ThreadKey("t1", "runs", "made-elsewhere")
    theirs = await other.save(
        SaveCommand(checkpoint=Checkpoint(key=key, checkpoint_id="", state=b"{}"))
    )
    lease = await other.acquire_lease(key, "engine-b", 30.0)
    mine = SaveCommand(checkpoint=Checkpoint(key=key, checkpoint_id="", state=b"{}"))
    with pytest.raises(LeaseLost):  # SQL's row says leased: never taken for new
        await store.save(mine)
    ok = await store.save(
        SaveCommand(
            checkpoint=Checkpoint(key=key, checkpoint_id="", state=b"{}"),
            fencing_token=lease.fencing_token,
        )
    )
    assert ok.checkpoint.parent_id == theirs.checkpoint.checkpoint_id
    # Deleted there (a tombstone keeps its seq and token): written again here, it goes on.
    gone = ThreadKey("t1", "runs", "deleted-elsewhere")
    await other.save(SaveCommand(checkpoint=Checkpoint(key=gone, checkpoint_id="", state=b"{}")))
    await other.delete_thread(gone)
    again = await store.save(
        SaveCommand(checkpoint=Checkpoint(key=gone, checkpoint_id="", state=b"{}"))
    )
    assert again.checkpoint.parent_id == "" and again.seq > 1
    for k in (key, gone):
        events = await store.sql.events_after(k.tenant, k, 0, 100)
        assert [e.seq for e in events] == list(range(events[0].seq, events[0].seq + len(events)))


WORKFLOW = ThreadKey("t1", "workflows", "wf")


def _start(
    run_id: str, head: str, workflow: ThreadKey = WORKFLOW, checkpoint_id: str = ""
) -> SaveCommand:
    """A run's first checkpoint, requiring the workflow's head as the engine cached it."""
    key = ThreadKey("t1", "runs", run_id)
    return SaveCommand(
        checkpoint=Checkpoint(key=key, checkpoint_id=checkpoint_id, state=b"{}"),
        required_head=(workflow, head),
        events=[NewEvent("run.started")],
    )


def _version(checkpoint_id: str) -> SaveCommand:
    return SaveCommand(
        checkpoint=Checkpoint(key=WORKFLOW, checkpoint_id=checkpoint_id, state=b"{}")
    )


async def _nothing_written(store: CheckpointStore, run_id: str) -> None:
    key = ThreadKey("t1", "runs", run_id)
    with pytest.raises(NotFound):
        await store.restore(key)
    assert await store.sql.events_after(key.tenant, key, 0, 10) == []


async def test_a_save_requiring_another_threads_head_commits_only_while_it_is_there(
    store,
) -> None:
    """SaveCommand.required_head: committed while that thread's head is the one named;
    refused (RequiredHeadMoved), with nothing written, once it moved, also when the move
    came earlier in the same batch, and for a thread that has no head."""
    await store.save(_version("v1"))
    ok = await store.save(_start("r1", "v1"))
    assert ok.seq == 1
    await store.save(_version("v2"))
    with pytest.raises(RequiredHeadMoved):
        await store.save(_start("r2", "v1"))
    await _nothing_written(store, "r2")
    await store.save(_start("r2", "v2"))
    # Queued together, so one batch: the head moves to v3 before the start is checked.
    moved, refused = await asyncio.gather(
        store.save(_version("v3")), store.save(_start("r3", "v2")), return_exceptions=True
    )
    assert not isinstance(moved, BaseException), moved
    assert isinstance(refused, RequiredHeadMoved), refused
    await _nothing_written(store, "r3")
    with pytest.raises(RequiredHeadMoved):
        await store.save(_start("r4", "v1", ThreadKey("t1", "workflows", "missing")))
    await _nothing_written(store, "r4")
    # The tenant's feed stayed dense through the refusals.
    feed = await store.sql.events_after("t1", None, 0, 100)
    assert [e.feed_seq for e in feed] == list(range(1, len(feed) + 1))


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
async def test_a_required_head_moved_by_another_replica_is_seen_in_sql(store, other) -> None:
    """This replica wrote the workflow's head last and remembers it; another replica moves
    it: a start requiring the old head goes in one statement, which SQL refuses."""
    await store.save(_version("v1"))
    await store.save(_start("r1", "v1"))
    await other.save(_version("v2"))
    with pytest.raises(RequiredHeadMoved):
        await store.save(_start("r2", "v1"))
    await _nothing_written(store, "r2")
    assert (await store.save(_start("r2", "v2"))).seq == 1


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
@pytest.mark.parametrize("way", ["one statement", "the long way"])
async def test_a_required_head_moved_by_a_batch_still_committing_is_seen(
    store, backend, way
) -> None:
    """Another batch has moved the workflow's head and not committed yet (it holds the
    thread's row and the tenant's feed row): a start requiring the old head waits for it,
    then is refused, never committed after it on the old head."""
    await store.save(_version("v1"))  # the checkpoint the head moves back to below
    await store.save(_version("v2"))
    chosen = ""
    if way == "the long way":  # BEGIN, lock the run's thread, check, write, COMMIT
        run = ThreadKey("t1", "runs", "r9")
        await store.save(SaveCommand(checkpoint=Checkpoint(key=run, checkpoint_id="", state=b"{}")))
        store.sql.hot.claims_in_one_statement = False  # a chosen id on a known thread: long
        chosen = "start-r9"
    conn = await asyncpg.connect(libpq_url(backend.db_url))
    try:
        moving = conn.transaction()
        await moving.start()
        await conn.execute(
            "UPDATE threads SET head_id = 'v1' WHERE tenant = 't1' AND namespace = 'workflows'"
            " AND thread_id = 'wf'"
        )
        await conn.execute("UPDATE feeds SET last_seq = last_seq WHERE tenant = 't1'")
        start = asyncio.ensure_future(store.save(_start("r9", "v2", checkpoint_id=chosen)))
        await asyncio.sleep(0.3)
        assert not start.done(), "the start did not wait for the batch moving the head"
        await moving.commit()
        with pytest.raises(RequiredHeadMoved):
            await start
    finally:
        await conn.close()


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
@pytest.mark.parametrize("writer", ["a replica", "the single writer"])
async def test_two_lanes_keep_each_threads_saves_in_order(store, backend, writer) -> None:
    """16 threads, each with three Saves queued at once, round after round: the batches are
    shared between the two light lanes, which commit side by side, and still each thread's
    Saves commit in the order they came, its chain unbroken, the tenant's feed dense; the
    single writer's memory tier answers each thread's newest head."""
    async with contextlib.AsyncExitStack() as stack:
        if writer == "the single writer":  # the fixture's replica stays idle meanwhile
            store = await stack.enter_async_context(_replica(backend, None, single_writer="yes"))
        await _saves_in_rounds(store, writer == "the single writer")


async def _saves_in_rounds(store: CheckpointStore, from_memory: bool) -> None:
    threads = [ThreadKey("t1", "runs", f"lane-{i}") for i in range(16)]

    def step(key: ThreadKey, i: int) -> SaveCommand:
        cp = Checkpoint(key=key, checkpoint_id="", state=b"{}", step=i)
        return SaveCommand(checkpoint=cp, events=[NewEvent("step.saved", {"step": i})])

    for round_ in range(12):
        saved = await asyncio.gather(
            *(store.save(step(key, 3 * round_ + j)) for key in threads for j in range(3))
        )
        for i, key in enumerate(threads):
            head = await store.restore(key)
            assert head.checkpoint.checkpoint_id == saved[3 * i + 2].checkpoint.checkpoint_id
            if from_memory:
                assert head.served_from == Tier.MEMORY
    lanes = store.committer.light_lanes
    assert len(lanes) == 2 and all(lane.batches for lane in lanes), "one lane did all"
    for key in threads:
        listed, _ = await store.list(key, 1000)
        assert [c.step for c in listed] == list(range(35, -1, -1)), key
        by_id = {c.checkpoint_id: c for c in listed}
        at = listed[0]
        while at.parent_id:
            assert by_id[at.parent_id].step == at.step - 1
            at = by_id[at.parent_id]
    feed = await store.sql.events_after("t1", None, 0, 10_000)
    assert [e.feed_seq for e in feed] == list(range(1, len(feed) + 1))


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
async def test_saves_given_up_on_still_commit_before_the_threads_next_one(store, backend) -> None:
    """Two Saves of a thread whose callers gave up while they waited (one committing, one
    queued behind it) are still committed, so the thread's next Save, which another lane
    waiting for work could take at once, commits after them: it is the head."""
    key = ThreadKey("t1", "runs", "given-up")
    await store.save(_version("v1"))  # the tenant's feed row exists
    conn = await asyncpg.connect(libpq_url(backend.db_url))
    try:
        holding = conn.transaction()
        await holding.start()
        await conn.execute("UPDATE feeds SET last_seq = last_seq WHERE tenant = 't1'")
        first = asyncio.ensure_future(store.save(_cmd(b'{"n": 0}', step=0, key=key)))
        await asyncio.sleep(0.3)  # its batch waits for the feed row
        second = asyncio.ensure_future(store.save(_cmd(b'{"n": 1}', step=1, key=key)))
        await asyncio.sleep(0.05)  # queued behind it
        first.cancel()
        second.cancel()
        third = asyncio.ensure_future(store.save(_cmd(b'{"n": 2}', step=2, key=key)))
        await asyncio.sleep(0.3)
        # All three wait in the lane of the first (whose order is the thread's order).
        waiting = [lane.pending.get(key, 0) for lane in store.committer.light_lanes]
        assert sorted(waiting) == [0, 3], waiting
        await holding.commit()
        saved = await third
    finally:
        await conn.close()
    head = (await store.restore(key)).checkpoint
    assert head.checkpoint_id == saved.checkpoint.checkpoint_id, "a given-up Save came after"
    listed, _ = await store.list(key, 10)
    by_id = {c.checkpoint_id: c for c in listed}
    assert [c.step for c in listed] == [2, 1, 0]
    assert by_id[head.parent_id].step == 1 and by_id[by_id[head.parent_id].parent_id].step == 0


# The first commit of a batch marker (checkpoint_svc/tiers/sql.py BATCH_MARKER_TENANT) takes
# `seconds`, and a client's cancel does not stop it: a COMMIT whose answer does not come in
# time. A sequence, not a table: it counts even in a rolled-back transaction, so the batches
# after that one are quick.
_SLOW_FIRST_COMMIT = """
CREATE SEQUENCE slow_commits;
CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.tenant = '~batch' AND nextval('slow_commits') = 1 THEN
        BEGIN
            PERFORM pg_sleep({seconds});
        EXCEPTION WHEN query_canceled THEN
            PERFORM pg_sleep({seconds});
        END;
    END IF;
    RETURN NEW;
END $$;
CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON requests
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_commit();
"""


@contextlib.asynccontextmanager
async def _connected(backend) -> AsyncIterator[asyncpg.Connection]:
    """A connection of the test's own to its database."""
    conn = await asyncpg.connect(libpq_url(backend.db_url))
    try:
        yield conn
    finally:
        await conn.close()


async def _sql(backend, statement: str) -> None:
    async with _connected(backend) as conn:
        await conn.execute(statement)


def _lost_answers(outcome: str) -> float:
    return metrics.LOST_COMMIT_ANSWERS.labels(outcome)._value.get()


@contextlib.asynccontextmanager
async def _impatient_store(backend, sql_timeout: float = 0.5) -> AsyncIterator[CheckpointStore]:
    """A store that gives a statement `sql_timeout` seconds (and whose feed never polls SQL
    during a test: a heartbeat of 60 s)."""
    async with running_store(backend.db_url, None, sql_timeout=sql_timeout, heartbeat=60) as store:
        yield store


async def _save_once_more(store: CheckpointStore, key: ThreadKey, path: str, before) -> Any:
    """A second Save of the thread (with an event), on the hot path's one statement or the
    long way."""
    if path == "the long way":
        store.sql.hot.forget([key])
    return await store.save(
        _cmd(
            b'{"n": 1}',
            step=1,
            key=key,
            expected_parent_id=before.checkpoint.checkpoint_id,
            events=[NewEvent("x.happened")],
        )
    )


async def _assert_saved_once(store: CheckpointStore, key: ThreadKey, *ids: str) -> None:
    listed, _ = await store.list(key, 10)
    assert [c.checkpoint_id for c in listed] == list(ids)
    events = await store.sql.events_after(key.tenant, key, 0, 100)
    assert [e.type for e in events].count("x.happened") == len(ids) - 1


async def _until_server_waits(backend, wait_event: str) -> None:
    """Until a server process of the test's database waits on `wait_event`."""
    async with _connected(backend) as conn:
        for _ in range(200):
            waiting = await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND wait_event = $1",
                wait_event,
            )
            if waiting:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"no server process waits on {wait_event}")


@contextlib.asynccontextmanager
async def _commits_wait_for_a_standby(backend, postgres_server) -> AsyncIterator[None]:
    """Every COMMIT, durable locally, then waits for a synchronous standby there is not (the
    test session's own cluster, for the length of a test). Back as it was after, by a
    restart if the setting cannot be taken back."""
    async with _connected(backend) as conn:
        await conn.execute("CREATE TABLE standby_probe (x int)")
        await conn.execute("ALTER SYSTEM SET synchronous_standby_names = 'nobody'")
        await conn.execute("SELECT pg_reload_conf()")
        try:
            for _ in range(100):  # until the reload has reached the processes that commit
                probe = await asyncpg.connect(libpq_url(backend.db_url))
                try:
                    await probe.execute("INSERT INTO standby_probe VALUES (1)", timeout=0.3)
                except TimeoutError:
                    break
                finally:
                    probe.terminate()
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("commits never waited for the standby")
            yield
        finally:
            try:
                await conn.execute("ALTER SYSTEM RESET synchronous_standby_names")
                await conn.execute("SELECT pg_reload_conf()")
            except Exception:
                await postgres_server.astop()
                await postgres_server.astart()
                raise


LOST = ThreadKey("t1", "runs", "lost-answer")


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
@pytest.mark.parametrize("path", ["in one statement", "the long way"])
async def test_a_commit_whose_answer_is_lost_and_that_did_not_land_runs_again(
    backend, path
) -> None:
    """A COMMIT that outlives the statement timeout (and the wait for its cancel) could land
    after the store gave up on it: the store ends the server process that has it before it
    reads the batch marker, so that the marker's answer is final, then runs the batch again
    (docs/checkpoint-service.md#writes). Before, the marker was read at once, said no, the
    batch ran again behind the first, which then landed: the caller heard UNAVAILABLE for a
    Save that was there."""
    async with _impatient_store(backend) as store:
        first = await store.save(_cmd(key=LOST))
        await _sql(backend, _SLOW_FIRST_COMMIT.format(seconds=7))
        landed, not_landed = _lost_answers("landed"), _lost_answers("not_landed")
        saved = await _save_once_more(store, LOST, path, first)
        assert _lost_answers("not_landed") >= not_landed + 1
        assert _lost_answers("landed") == landed
        await _assert_saved_once(
            store, LOST, saved.checkpoint.checkpoint_id, first.checkpoint.checkpoint_id
        )


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
@pytest.mark.parametrize("path", ["in one statement", "the long way"])
async def test_a_commit_whose_answer_is_lost_and_that_landed_is_answered_once(
    backend, postgres_server, path
) -> None:
    """A COMMIT that landed but whose answer never came (it waits for a synchronous standby
    there is not: durable locally, then stuck) is answered as committed, not run again and
    not called a failure; and its event reaches a tenant's watchers at once, with the feed
    seq it has in SQL (the lost answer was what numbered it)."""
    async with _impatient_store(backend) as store:
        first = await store.save(_cmd(key=LOST))
        landed = _lost_answers("landed")
        feed = store.stream("t1", None, 0, follow=True)
        seen = asyncio.ensure_future(_first_of(feed, "x.happened"))
        async with _commits_wait_for_a_standby(backend, postgres_server):
            saved = await _save_once_more(store, LOST, path, first)
        assert _lost_answers("landed") == landed + 1
        await _assert_saved_once(
            store, LOST, saved.checkpoint.checkpoint_id, first.checkpoint.checkpoint_id
        )
        live = await asyncio.wait_for(seen, 5)
        (stored,) = [
            e for e in await store.sql.events_after("t1", None, 0, 100) if e.type == "x.happened"
        ]
        assert live.feed_seq == stored.feed_seq
        await feed.aclose()


async def _first_of(feed: AsyncIterator[Any], event_type: str) -> Any:
    async for e in feed:
        if getattr(e, "type", None) == event_type:
            return e
    raise AssertionError("the feed ended")


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
async def test_a_commit_whose_outcome_cannot_be_found_out_says_so(backend, postgres_server) -> None:
    """PostgreSQL stops while a COMMIT waits for its answer: the caller hears UNAVAILABLE
    saying that the outcome is unknown and what to do, not a generic failure."""
    async with _impatient_store(backend, sql_timeout=5) as store:
        first = await store.save(_cmd(key=LOST))
        await _sql(backend, _SLOW_FIRST_COMMIT.format(seconds=30))
        unknown = _lost_answers("unknown")
        saving = asyncio.ensure_future(_save_once_more(store, LOST, "in one statement", first))
        await _until_server_waits(backend, "PgSleep")  # its COMMIT, in the slow trigger
        await postgres_server.astop()
        try:
            with pytest.raises(TierUnavailable, match=r"outcome unknown.*same request_id"):
                await saving
        finally:
            await postgres_server.astart()
        assert _lost_answers("unknown") == unknown + 1
