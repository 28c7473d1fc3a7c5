"""State encrypted at rest (docs/security.md#encryption-at-rest): with a key ring, SQL's rows
and Redis's values hold no plaintext of what clients saved; a changed or moved value is
DATA_LOSS, never garbage; keys rotate without a restart. The real store in this process on
SQLite and PostgreSQL + Redis, and the real services over the wire."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import redis.asyncio as aioredis
import sqlalchemy as sa
import yaml
from google.protobuf import json_format

from checkpoint_svc import sealing
from checkpoint_svc.domain import Checkpoint, NewEvent, PendingWrite, SaveCommand, ThreadKey
from checkpoint_svc.errors import DataLoss
from checkpoint_svc.feed import Heartbeat
from checkpoint_svc.tiers import sql
from checkpoint_svc.tiers.redis import FEED_CHANNEL_PREFIX, SEP
from checkpoint_svc.tiers.schema import checkpoints, events, writes
from tests.engine_client import definition, engine_stub, wait_status
from tests.servers import checkpoint_stub, running_store
from workflow_stubs.checkpoint.v1 import checkpoint_pb2 as cpb
from workflow_stubs.engine.v1 import engine_pb2 as pb

BOTH = pytest.mark.parametrize("backend", ["sqlite", "postgres+redis"], indirect=True)
SQLITE = pytest.mark.parametrize("backend", ["sqlite"], indirect=True)

MARKER = b"known-plaintext-marker-5c1e"
BIG = 100_000  # past pg.INLINE_STATE_BYTES: such a state is cached in Redis


def key_ring(
    path: Path, *key_ids: str, read_unencrypted: bool = False, seal_with: str = ""
) -> Path:
    """A key ring file of these keys (each derived from its id), oldest first."""
    keys = [{"id": i, "key": base64.b64encode(hashlib.sha256(i.encode()).digest()).decode()}
            for i in key_ids]  # fmt: skip
    ring: dict[str, object] = {"keys": keys}
    if read_unencrypted:
        ring["read_unencrypted"] = True
    if seal_with:
        ring["seal_with"] = seal_with
    path.write_text(yaml.safe_dump(ring))
    return path


@pytest.fixture
def fast_reload(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sealing, "RELOAD_CHECK_SECONDS", 0.0)


@contextlib.asynccontextmanager
async def sealed_store(backend, ring: Path | None) -> AsyncIterator:
    """A store on `backend` reading and writing through SQL (and Redis): no memory tier."""
    extra = {"encryption_keys": ring} if ring is not None else {}
    async with running_store(backend.db_url, backend.redis_url, memory_mib=0, **extra) as store:
        yield store


def state_of(n: int, size: int = 200) -> bytes:
    """A state holding the marker once, padded with bytes no compression shrinks much."""
    pad = hashlib.shake_256(str(n).encode()).hexdigest(size // 2)
    return json.dumps({"n": n, "marker": MARKER.decode(), "pad": pad}).encode()


async def save(store, key: ThreadKey, state: bytes, **more) -> str:
    cp = Checkpoint(key=key, checkpoint_id="", state=state)
    return (await store.save(SaveCommand(checkpoint=cp, **more))).checkpoint.checkpoint_id


async def column(store, table: sa.Table, name: str, tenant: str) -> list:
    """Every value of a column of the tenant's rows, as SQL holds it (in key order)."""
    order = table.primary_key.columns
    statement = sa.select(table.c[name]).where(table.c.tenant == tenant).order_by(*order)
    async with store.sql.reader.connect() as conn:
        return list((await conn.execute(statement)).scalars())


async def overwrite(store, table: sa.Table, name: str, value, **where) -> None:
    statement = table.update().values({name: value})
    for field, wanted in where.items():
        statement = statement.where(table.c[field] == wanted)
    async with store.sql.writer.begin() as conn:
        assert (await conn.execute(statement)).rowcount == 1


async def feed_of(store, tenant: str, key: ThreadKey) -> list:
    return [
        e
        async for e in store.stream(tenant, key, 0, False, until_now=True)
        if not isinstance(e, Heartbeat)
    ]


def flipped(value: bytes) -> bytes:
    return value[:-1] + bytes([value[-1] ^ 1])


async def cached_states(client: aioredis.Redis, tenant: str) -> list[bytes]:
    """The names of the tenant's states in Redis, once there are some (Redis is written after
    the commit is answered)."""
    for _ in range(100):
        found = [k async for k in client.scan_iter(f"st{SEP}{tenant}{SEP}*")]
        if found:
            return found
        await asyncio.sleep(0.05)
    raise AssertionError("no state reached Redis")


@BOTH
async def test_sealed_values_hold_no_plaintext_in_sql_or_redis_and_read_back(
    backend, tenant, tmp_path
) -> None:
    ring = key_ring(tmp_path / "keys.yaml", "k1")
    key = ThreadKey(tenant, "", "t1")
    big, small = state_of(1, BIG), state_of(2)
    heard: list[bytes] = []
    listener = None
    if backend.redis_url:  # what the feed's fan-out carries between replicas
        listener = aioredis.Redis.from_url(backend.redis_url)
        pubsub = listener.pubsub(ignore_subscribe_messages=True)
        await pubsub.subscribe(FEED_CHANNEL_PREFIX + tenant)
    async with sealed_store(backend, ring) as store:
        first = await save(store, key, big, events=[NewEvent("saved", {"m": MARKER.decode()})])
        second = await save(store, key, small)
        value = MARKER + b"-write"
        await store.put_writes(
            key, [PendingWrite(second, "task", 0, "ch", value)], 0, [NewEvent("wrote", {"m": 1})]
        )
        await store.publish(key, [NewEvent("note", {"m": MARKER.decode()})], "", 0)

        if listener is not None:
            cached = await cached_states(listener, tenant)
        got = await store.restore(key, first)
        assert got.checkpoint.state == big
        head = await store.restore(key, include_writes=True)
        assert head.checkpoint.state == small and [w.value for w in head.writes] == [value]
        listed, _ = await store.list(key, 10, include_state=True)
        assert [c.state for c in listed] == [small, big]
        feed = await feed_of(store, tenant, key)
        ours = [(e.type, e.payload) for e in feed if e.type in ("saved", "wrote", "note")]
        mark = {"m": MARKER.decode()}
        assert ours == [("saved", mark), ("wrote", {"m": 1}), ("note", mark)]
        assert [e.seq for e in feed] == list(range(1, len(feed) + 1))

        # SELECT state, value, payload: sealed, under key k1, with no trace of the marker.
        stored = [bytes(v) for v in await column(store, checkpoints, "state", tenant)]
        stored += [bytes(v) for v in await column(store, writes, "value", tenant)]
        assert len(stored) == 3
        assert all(v.startswith(sealing.MAGIC + b"\x02k1") for v in stored)
        payloads = await column(store, events, "payload", tenant)
        assert all(isinstance(json.loads(p), str) for p in payloads) and len(payloads) == len(feed)
        assert not [v for v in stored + [p.encode() for p in payloads] if MARKER in v]
        if backend.redis_url:
            assert got.served_from.name == "REDIS"  # the big state, opened from there
            (held,) = [await listener.get(k) for k in cached]
            assert held.startswith(sealing.MAGIC + b"\x02k1") and MARKER not in held
            assert MARKER in big  # (so a plaintext copy would show it)
            for _ in range(50):
                message = await pubsub.get_message(timeout=0.1)
                if message is not None:
                    heard.append(message["data"])
                if len(heard) == len(feed):
                    break
            assert len(heard) == len(feed) and not [m for m in heard if MARKER in m]

    # A replica without the key ring answers no ciphertext: DATA_LOSS, saying why.
    async with sealed_store(backend, None) as plain:
        with pytest.raises(DataLoss, match="has no --encryption-keys"):
            await plain.restore(key)
        with pytest.raises(DataLoss, match="has no --encryption-keys"):
            await feed_of(plain, tenant, key)
    if listener is not None:
        await pubsub.aclose()
        await listener.aclose()


@BOTH
async def test_a_changed_or_moved_value_is_data_loss_never_garbage(
    backend, tenant, tmp_path
) -> None:
    ring = key_ring(tmp_path / "keys.yaml", "k1")
    key = ThreadKey(tenant, "", "t1")
    async with sealed_store(backend, ring) as store:
        first = await save(store, key, state_of(1), events=[NewEvent("saved", {"n": 1})])
        second = await save(store, key, state_of(2))
        big = await save(store, ThreadKey(tenant, "", "t2"), state_of(3, BIG))
        await store.put_writes(key, [PendingWrite(second, "task", 0, "ch", b"w0")], 0)
        ids = await column(store, checkpoints, "checkpoint_id", tenant)
        rows = dict(
            zip(ids, map(bytes, await column(store, checkpoints, "state", tenant)), strict=True)
        )
        # One byte flipped: does not authenticate.
        await overwrite(store, checkpoints, "state", flipped(rows[first]), checkpoint_id=first)
        with pytest.raises(DataLoss, match=f"checkpoint {first} does not authenticate"):
            await store.restore(key, first)
        # A whole sealed state moved to another checkpoint's row: just as refused.
        await overwrite(store, checkpoints, "state", rows[second], checkpoint_id=first)
        with pytest.raises(DataLoss, match="changed or moved"):
            await store.restore(key, first)
        # Plaintext put in its place is not taken for the state either.
        await overwrite(store, checkpoints, "state", state_of(1), checkpoint_id=first)
        with pytest.raises(DataLoss, match="is not encrypted"):
            await store.restore(key, first)
        assert (await store.restore(key, second)).checkpoint.state == state_of(2)

        (value,) = await column(store, writes, "value", tenant)
        await overwrite(store, writes, "value", flipped(bytes(value)), task_id="task")
        with pytest.raises(DataLoss, match="write task/0"):
            await store.restore(key, include_writes=True)

        payload = (await column(store, events, "payload", tenant))[0]  # t1's first event
        changed = base64.b64encode(flipped(base64.b64decode(json.loads(payload)))).decode()
        # A flipped byte under the base64, a character that is not base64, a cut-off text.
        for damaged in (json.dumps(changed), payload[:10] + "\u00e9" + payload[11:], payload[:-5]):
            where = {"tenant": tenant, "thread_id": "t1", "seq": 1}
            await overwrite(store, events, "payload", damaged, **where)
            with pytest.raises(DataLoss, match="payload of event 1"):
                await feed_of(store, tenant, key)

        if backend.redis_url:  # a changed cached state: SQL's is read instead
            client = aioredis.Redis.from_url(backend.redis_url)
            (name,) = await cached_states(client, tenant)
            await client.set(name, flipped(await client.get(name)))
            await client.aclose()
            got = await store.restore(ThreadKey(tenant, "", "t2"), big)
            assert got.checkpoint.state == state_of(3, BIG) and got.served_from.name == "SQL"


@BOTH
async def test_keys_rotate_without_a_restart_and_old_rows_still_read(
    backend, tenant, tmp_path, fast_reload
) -> None:
    key = ThreadKey(tenant, "", "t1")
    async with sealed_store(backend, None) as plain:
        before = await save(plain, key, state_of(0))
    ring = key_ring(tmp_path / "keys.yaml", "k1")
    async with sealed_store(backend, ring) as store:
        with pytest.raises(DataLoss, match="is not encrypted"):
            await store.restore(key, before)
        key_ring(ring, "k1", read_unencrypted=True)
        assert (await store.restore(key, before)).checkpoint.state == state_of(0)
        old = await save(store, key, state_of(1))
        key_ring(ring, "k1", "k2")  # k2 added: new values sealed with it
        new = await save(store, key, state_of(2))
        headers = {
            bytes(v)[: len(sealing.MAGIC) + 3]
            for v in await column(store, checkpoints, "state", tenant)
        }
        assert headers == {state_of(0)[:8], sealing.MAGIC + b"\x02k1", sealing.MAGIC + b"\x02k2"}
        assert (await store.restore(key, old)).checkpoint.state == state_of(1)
        assert (await store.restore(key, new)).checkpoint.state == state_of(2)
        key_ring(ring, "k1", "k2", seal_with="k1")  # k2 listed, not sealing yet
        assert (await store.restore(key, new)).checkpoint.state == state_of(2)
        held = await save(store, key, state_of(3))
        ids = await column(store, checkpoints, "checkpoint_id", tenant)
        sealed = dict(zip(ids, await column(store, checkpoints, "state", tenant), strict=True))
        assert bytes(sealed[held]).startswith(sealing.MAGIC + b"\x02k1")
        key_ring(ring, "k2")  # k1 retired too early: its rows say which key they need
        with pytest.raises(DataLoss, match="sealed with key 'k1'"):
            await store.restore(key, old)
        assert (await store.restore(key, new)).checkpoint.state == state_of(2)


@BOTH
async def test_a_copied_thread_is_sealed_as_its_own(backend, tenant, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(sql, "PAGE_ROWS", 2)  # a page and a half of checkpoints
    monkeypatch.setattr(sql, "_LISTED_KEYS", 2)
    ring = key_ring(tmp_path / "keys.yaml", "k1")
    source = ThreadKey(tenant, "ns", "source")
    async with sealed_store(backend, ring) as store:
        ids = [await save(store, source, state_of(n)) for n in range(3)]
        await store.put_writes(source, [PendingWrite(ids[-1], "task", 0, "ch", MARKER)], 0)
        assert await store.copy_thread(tenant, "source", "target", "") == (1, 3)
        target = ThreadKey(tenant, "ns", "target")
        head = await store.restore(target, include_writes=True)
        assert head.checkpoint.checkpoint_id == ids[-1] and head.checkpoint.state == state_of(2)
        assert [w.value for w in head.writes] == [MARKER]
        listed, _ = await store.list(target, 10, include_state=True)
        assert [c.state for c in listed] == [state_of(n) for n in (2, 1, 0)]
        sealed = await column(store, checkpoints, "state", tenant)
        assert len(set(sealed)) == 6  # each copy sealed again, to its own thread


@SQLITE
async def test_an_encrypted_store_runs_workflows_and_answers_data_loss_on_the_wire(
    backend, service_factory, engine_factory, tenant, tmp_path
) -> None:
    ring = key_ring(tmp_path / "keys.yaml", "k1")
    # No memory tier: what a Restore answers comes from SQL, as it would after a restart.
    store = service_factory(
        backend, "--encryption-keys", str(ring), "--memory-mib", "0", in_process=True
    )
    engine = engine_factory(store)
    channel, s, md = await engine_stub(engine, tenant)
    nodes = [
        {"id": "a", "type": "transform", "config": {"expression": "input['word'] + '!'"}},
        {"id": "b", "type": "transform", "depends_on": ["a"], "config": {"expression": "a * 2"}},
    ]
    await s.RegisterWorkflow(pb.RegisterWorkflowRequest(definition=definition(nodes)), metadata=md)
    run_input = json_format.ParseDict({"word": MARKER.decode()}, pb.StartRunRequest().input)
    started = await s.StartRun(pb.StartRunRequest(workflow_id="wf", input=run_input), metadata=md)
    run = await wait_status(s, md, started.run.run_id, pb.RUN_STATUS_COMPLETED)
    assert json_format.MessageToDict(run.state)["b"] == (MARKER.decode() + "!") * 2
    await channel.close()

    db = sqlite3.connect(backend.db_url.split("///", 1)[1])
    sealed = [r[0] for r in db.execute("SELECT state FROM checkpoints")]
    sealed += [r[0] for r in db.execute("SELECT value FROM writes")]
    sealed += [r[0].encode() for r in db.execute("SELECT payload FROM events")]
    assert len(sealed) > 5 and not [v for v in sealed if MARKER in v]

    channel, stub, md = await checkpoint_stub(store.address, tenant)
    saved = await stub.Save(
        cpb.SaveRequest(checkpoint=cpb.Checkpoint(thread_id="mine", state=b"state")), metadata=md
    )
    cid = saved.checkpoint.checkpoint_id
    (state,) = db.execute(
        "SELECT state FROM checkpoints WHERE checkpoint_id = ?", (cid,)
    ).fetchone()
    db.execute("UPDATE checkpoints SET state = ? WHERE checkpoint_id = ?", (flipped(state), cid))
    db.commit()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Restore(cpb.RestoreRequest(thread_id="mine"), metadata=md)
    assert err.value.code() == grpc.StatusCode.DATA_LOSS
    assert "does not authenticate" in err.value.details()
    await channel.close()
    db.close()


@pytest.mark.parametrize(
    ("ring", "says"),
    [
        ("", "it is empty"),
        ("keys: []", "keys: List should have at least 1 item"),
        ("keys: [{id: k1, key: c2hvcnQ=}]", "keys.0.key: Value error, 5 bytes; a key is 32"),
        ("keys: [{id: k1, key: '%%%'}]", "keys.0.key: Value error, not base64"),
        ("keys: [{id: 'a b', key: x}]", "keys.0.id: String should match pattern"),
        ("keys: [{id: k1}]", "keys.0.key: Field required"),
        ("keys: [{id: k1, key: " + "A" * 43 + "=}]\nkey: 1", "key: Extra inputs are not permitted"),
    ],
)
def test_a_bad_key_ring_is_refused_naming_the_field(ring, says, tmp_path) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text(ring)
    with pytest.raises(ValueError, match=r"^not a key ring: ") as err:
        sealing.KeyRing(path)
    assert says in str(err.value)


def test_new_key_prints_an_entry_and_the_service_refuses_a_bad_ring_in_one_line(
    tmp_path,
) -> None:
    ring = tmp_path / "keys.yaml"
    entries = [
        subprocess.run(
            [sys.executable, "-m", "checkpoint_svc", "new-key", *name],
            capture_output=True, text=True, check=True, timeout=60,
        ).stdout
        for name in ([], ["second"])
    ]  # fmt: skip
    ring.write_text("keys:\n" + "".join(entries))
    keys = sealing.KeyRing(ring)
    assert keys.open(keys.seal(b"x", b"ctx"), b"ctx", "x") == b"x"
    assert yaml.safe_load(ring.read_text())["keys"][1]["id"] == "second"
    # Twice the same id: a ring that could open a value with the wrong key is refused.
    ring.write_text("keys:\n" + entries[1] + entries[1])
    done = subprocess.run(
        [sys.executable, "-m", "checkpoint_svc", "--db", f"sqlite+aiosqlite:///{tmp_path}/s.db",
         "--encryption-keys", str(ring)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        "python -m checkpoint_svc: error: --encryption-keys: not a key ring: keys.1.id: "
        "'second' is listed twice"
    ]


def test_sealing_binds_each_value_to_where_it_belongs(tmp_path) -> None:
    keys = sealing.Sealing(sealing.KeyRing(key_ring(tmp_path / "keys.yaml", "k1")))
    key = ThreadKey("a", "ns", "t")
    sealed = keys.state(key, "c1", b"plain")
    assert keys.state(key, "c1", b"plain") != sealed  # never the same nonce twice
    assert keys.open_state(key, "c1", sealed) == b"plain"
    for elsewhere in (
        ThreadKey("b", "ns", "t"),
        ThreadKey("a", "other", "t"),
        ThreadKey("a", "ns", "u"),
    ):
        with pytest.raises(DataLoss):
            keys.open_state(elsewhere, "c1", sealed)
    with pytest.raises(DataLoss):
        keys.open_state(key, "c2", sealed)
    value = keys.value(key, "c1", "task", 0, b"v")
    with pytest.raises(DataLoss):
        keys.open_value(key, "c1", "task", 1, value)
    with pytest.raises(DataLoss, match="damaged"):
        keys.open_state(key, "c1", sealed[:20])
    payload = keys.payload(key, 3, {"a": 1})
    assert keys.open_payload(key, 3, payload) == {"a": 1}
    with pytest.raises(DataLoss):
        keys.open_payload(key, 4, payload)


@BOTH
async def test_a_replica_that_has_not_reloaded_yet_reads_a_key_another_seals_with(
    backend, tenant, tmp_path
) -> None:
    key = ThreadKey(tenant, "", "t1")
    ring_b = key_ring(tmp_path / "b.yaml", "k1")
    async with sealed_store(backend, ring_b) as b:
        first = await save(b, key, state_of(1))
        assert (await b.restore(key, first)).checkpoint.state == state_of(1)  # its file seen now
        key_ring(ring_b, "k1", "k2")  # rotated on both replicas' files, A reading it first
        async with sealed_store(backend, key_ring(tmp_path / "a.yaml", "k1", "k2")) as a:
            second = await save(a, key, state_of(2))
            # B looked at its file less than a second ago: the unknown key makes it look again.
            assert (await b.restore(key, second)).checkpoint.state == state_of(2)


@BOTH
async def test_reseal_seals_every_value_with_the_newest_key(backend, tenant, tmp_path) -> None:
    key = ThreadKey(tenant, "", "t1")
    async with sealed_store(backend, None) as plain:  # before encryption was turned on
        before = await save(plain, key, state_of(0), events=[NewEvent("old", {"n": 0})])
        await plain.put_writes(key, [PendingWrite(before, "task", 0, "ch", b"plain")], 0)
    ring = key_ring(tmp_path / "keys.yaml", "k1", read_unencrypted=True)
    async with sealed_store(backend, ring) as store:
        after = await save(store, key, state_of(1), events=[NewEvent("new", {"n": 1})])
        await store.put_writes(key, [PendingWrite(after, "task", 0, "ch", b"sealed")], 0)
    key_ring(ring, "k1", "k2", read_unencrypted=True)

    def reseal() -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "checkpoint_svc", "reseal", "--db", backend.db_url,
             "--encryption-keys", str(ring), "--log-level", "ERROR"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip

    done = reseal()
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("checkpoints: ") and "0 unreadable" in lines[0]
    assert [line.split(":")[0] for line in lines] == ["checkpoints", "writes", "events"]
    assert reseal().stdout.count(" 0 sealed again") == 3  # nothing left to do
    key_ring(ring, "k2")  # k1 retired, plaintext no longer read: everything still opens
    async with sealed_store(backend, ring) as store:
        for cid, state in ((before, state_of(0)), (after, state_of(1))):
            got = await store.restore(key, cid, include_writes=True)
            assert got.checkpoint.state == state
        assert [w.value for w in got.writes] == [b"sealed"]
        old = await store.restore(key, before, include_writes=True)
        assert [w.value for w in old.writes] == [b"plain"]
        feed = await feed_of(store, tenant, key)
        assert {"old", "new"} <= {e.type for e in feed}
        stored = [bytes(v) for v in await column(store, checkpoints, "state", tenant)]
        stored += [bytes(v) for v in await column(store, writes, "value", tenant)]
        payloads = [json.loads(p) for p in await column(store, events, "payload", tenant)]
        stored += [base64.b64decode(p) for p in payloads]
        assert all(v.startswith(sealing.MAGIC + b"\x02k2") for v in stored)
        # A value that does not open is left as it is, and the reseal says so.
        await overwrite(store, checkpoints, "state", b"tampered", checkpoint_id=before)
    key_ring(ring, "k3", "k2")  # (k3 listed first: k2 still seals)
    done = reseal()
    assert done.returncode == 1
    assert "checkpoints: 2 looked at, 0 sealed again, 1 unreadable" in done.stdout
    assert done.stderr.strip().endswith("1 values did not open (the log names each)")
