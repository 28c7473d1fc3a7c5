"""Save, Restore and List on every backend: SQLite, PostgreSQL, PostgreSQL + Redis."""

from __future__ import annotations

import asyncio
import json
import uuid

import grpc

from tests.requests import NS, code_of, restore, save, state_of
from workflow_stubs.checkpoint.v1 import checkpoint_pb2 as pb


async def test_save_restore_list_round_trip(stub) -> None:
    s, md = stub
    ids = []
    for step in range(1, 6):
        r = await save(
            s,
            md,
            "run-1",
            {"step": step},
            cp={
                "step": step,
                "trigger": pb.TRIGGER_STEP_COMPLETED,
                "name": f"s{step}",
                "completed_nodes": [f"n{step}"],
                "progress_percent": step * 20.0,
                "metadata": {"k": str(step)},
            },
        )
        assert r.checkpoint.checkpoint_id and r.checkpoint.created_at.seconds > 0
        assert r.checkpoint.parent_id == (ids[-1] if ids else "")
        ids.append(r.checkpoint.checkpoint_id)
    assert ids == sorted(ids), "server-assigned ids sort by creation"

    head = await restore(s, md, "run-1")
    assert head.checkpoint.checkpoint_id == ids[-1]
    assert state_of(head) == {"step": 5}
    assert head.checkpoint.metadata["k"] == "5"
    assert list(head.checkpoint.completed_nodes) == ["n5"]
    assert head.served_from != pb.TIER_UNSPECIFIED

    old = await restore(s, md, "run-1", checkpoint_id=ids[1])
    assert state_of(old) == {"step": 2} and old.checkpoint.step == 2

    page = await s.List(pb.ListRequest(namespace=NS, thread_id="run-1"), metadata=md)
    assert [c.checkpoint_id for c in page.checkpoints] == ids[::-1]
    assert all(c.state == b"" for c in page.checkpoints), "metadata only unless asked"
    assert page.next_page_token == ""
    full = await s.List(
        pb.ListRequest(namespace=NS, thread_id="run-1", include_state=True, page_size=2),
        metadata=md,
    )
    assert [c.step for c in full.checkpoints] == [5, 4] and full.checkpoints[0].state
    assert full.next_page_token
    # Followed to its end, the token gives every checkpoint once, newest first.
    paged, token = [c.checkpoint_id for c in full.checkpoints], full.next_page_token
    while token:
        more = await s.List(
            pb.ListRequest(namespace=NS, thread_id="run-1", page_size=2, page_token=token),
            metadata=md,
        )
        paged += [c.checkpoint_id for c in more.checkpoints]
        token = more.next_page_token
    assert paged == ids[::-1]


async def test_pending_writes_follow_langgraph_upsert_rule(stub) -> None:
    s, md = stub
    head = (await save(s, md, "w")).checkpoint.checkpoint_id

    def write(task: str, idx: int, value: bytes) -> pb.PendingWrite:
        return pb.PendingWrite(
            checkpoint_id=head, task_id=task, idx=idx, channel="out", value=value, task_path="p"
        )

    await s.PutWrites(
        pb.PutWritesRequest(
            namespace=NS, thread_id="w", writes=[write("a", 0, b"1"), write("b", -1, b"err1")]
        ),
        metadata=md,
    )
    # LangGraph's rule: a call mixing regular and special writes keeps what is there...
    await s.PutWrites(
        pb.PutWritesRequest(
            namespace=NS, thread_id="w", writes=[write("a", 0, b"2"), write("b", -1, b"err2")]
        ),
        metadata=md,
    )
    got = await restore(s, md, "w", include_writes=True)
    values = {(w.task_id, w.idx): w.value for w in got.writes}
    assert values == {("a", 0): b"1", ("b", -1): b"err1"}
    # ...and a call of special (negative index) writes only replaces them.
    await s.PutWrites(
        pb.PutWritesRequest(namespace=NS, thread_id="w", writes=[write("b", -1, b"err3")]),
        metadata=md,
    )
    got = await restore(s, md, "w", include_writes=True)
    values = {(w.task_id, w.idx): w.value for w in got.writes}
    assert values == {("a", 0): b"1", ("b", -1): b"err3"}
    assert all(w.task_path == "p" and w.checkpoint_id == head for w in got.writes)
    without = await restore(s, md, "w")
    assert list(without.writes) == []


async def test_head_moved_is_aborted_and_writes_nothing(stub) -> None:
    s, md = stub
    first = (await save(s, md, "r")).checkpoint.checkpoint_id
    second = (await save(s, md, "r", expected_parent_id=first)).checkpoint.checkpoint_id
    code = await code_of(save(s, md, "r", {"lost": True}, expected_parent_id=first))
    assert code == grpc.StatusCode.ABORTED
    head = await restore(s, md, "r")
    assert head.checkpoint.checkpoint_id == second
    listed = await s.List(pb.ListRequest(namespace=NS, thread_id="r"), metadata=md)
    assert len(listed.checkpoints) == 2


async def test_stale_fencing_token_is_refused(stub) -> None:
    s, md = stub
    await save(s, md, "f")
    a = await s.AcquireLease(
        pb.AcquireLeaseRequest(namespace=NS, thread_id="f", owner="engine-a", ttl_seconds=0.5),
        metadata=md,
    )
    # While engine-a holds it, engine-b can neither take it nor write without its token.
    busy = await code_of(
        s.AcquireLease(
            pb.AcquireLeaseRequest(namespace=NS, thread_id="f", owner="engine-b", ttl_seconds=5),
            metadata=md,
        )
    )
    assert busy == grpc.StatusCode.FAILED_PRECONDITION
    assert await code_of(save(s, md, "f")) == grpc.StatusCode.FAILED_PRECONDITION
    await save(s, md, "f", {"by": "a"}, fencing_token=a.fencing_token)
    await asyncio.sleep(0.7)  # engine-a's lease expires; engine-b takes over
    b = await s.AcquireLease(
        pb.AcquireLeaseRequest(namespace=NS, thread_id="f", owner="engine-b", ttl_seconds=30),
        metadata=md,
    )
    assert b.fencing_token > a.fencing_token
    # The zombie engine-a comes back: its token is stale for every kind of write.
    zombie = save(s, md, "f", {"by": "zombie"}, fencing_token=a.fencing_token)
    assert await code_of(zombie) == grpc.StatusCode.FAILED_PRECONDITION
    assert (
        await code_of(
            s.RenewLease(
                pb.RenewLeaseRequest(
                    namespace=NS,
                    thread_id="f",
                    owner="engine-a",
                    fencing_token=a.fencing_token,
                    ttl_seconds=30,
                ),
                metadata=md,
            )
        )
        == grpc.StatusCode.FAILED_PRECONDITION
    )
    assert (
        await code_of(
            s.Publish(
                pb.PublishRequest(
                    namespace=NS,
                    thread_id="f",
                    events=[pb.NewEvent(type="x")],
                    fencing_token=a.fencing_token,
                ),
                metadata=md,
            )
        )
        == grpc.StatusCode.FAILED_PRECONDITION
    )
    assert state_of(await restore(s, md, "f")) == {"by": "a"}
    await s.RenewLease(
        pb.RenewLeaseRequest(
            namespace=NS,
            thread_id="f",
            owner="engine-b",
            fencing_token=b.fencing_token,
            ttl_seconds=30,
        ),
        metadata=md,
    )
    await save(s, md, "f", {"by": "b"}, fencing_token=b.fencing_token)
    await s.ReleaseLease(
        pb.ReleaseLeaseRequest(
            namespace=NS, thread_id="f", owner="engine-b", fencing_token=b.fencing_token
        ),
        metadata=md,
    )
    thread = (
        await s.GetThread(pb.GetThreadRequest(namespace=NS, thread_id="f"), metadata=md)
    ).thread
    assert thread.lease_owner == "" and thread.fencing_token == 0  # the holder's secret
    await save(s, md, "f", {"free": True})  # released: anyone may write again


async def test_retried_request_id_writes_once(stub) -> None:
    s, md = stub
    responses = await asyncio.gather(
        *(save(s, md, "idem", {"n": 1}, request_id="req-1") for _ in range(5))
    )
    again = await save(s, md, "idem", {"n": 1}, request_id="req-1")
    ids = {r.checkpoint.checkpoint_id for r in [*responses, again]}
    assert len(ids) == 1
    listed = await s.List(pb.ListRequest(namespace=NS, thread_id="idem"), metadata=md)
    assert len(listed.checkpoints) == 1
    stats = await s.GetStats(pb.GetStatsRequest(namespace=NS, thread_id="idem"), metadata=md)
    assert stats.checkpoint_count == 1 and stats.event_count == 1
    p1 = await s.Publish(
        pb.PublishRequest(
            namespace=NS,
            thread_id="idem",
            request_id="pub-1",
            events=[pb.NewEvent(type="a"), pb.NewEvent(type="b")],
        ),
        metadata=md,
    )
    p2 = await s.Publish(
        pb.PublishRequest(
            namespace=NS,
            thread_id="idem",
            request_id="pub-1",
            events=[pb.NewEvent(type="a"), pb.NewEvent(type="b")],
        ),
        metadata=md,
    )
    assert list(p1.seqs) == list(p2.seqs) == [2, 3]


async def test_tenants_are_isolated(stub) -> None:
    s, md = stub
    await save(s, md, "shared-name", {"owner": "me"})
    other = (("x-tenant-id", f"other-{uuid.uuid4().hex[:12]}"),)
    assert await code_of(restore(s, other, "shared-name")) == grpc.StatusCode.NOT_FOUND
    await save(s, other, "shared-name", {"owner": "them"})
    assert state_of(await restore(s, md, "shared-name")) == {"owner": "me"}
    mine = await s.ListThreads(pb.ListThreadsRequest(), metadata=md)
    assert [t.thread_id for t in mine.threads] == ["shared-name"]


async def test_list_threads_by_status_and_delete(stub) -> None:
    s, md = stub
    await save(s, md, "a", status=pb.THREAD_STATUS_RUNNING, workflow_id="wf", workflow_version=3)
    await save(s, md, "b", status=pb.THREAD_STATUS_COMPLETED)
    await save(s, md, "c", status=pb.THREAD_STATUS_RUNNING)
    running = await s.ListThreads(
        pb.ListThreadsRequest(statuses=[pb.THREAD_STATUS_RUNNING], page_size=1), metadata=md
    )
    assert [t.thread_id for t in running.threads] == ["a"]
    assert running.threads[0].workflow_id == "wf" and running.threads[0].workflow_version == 3
    rest = await s.ListThreads(
        pb.ListThreadsRequest(
            statuses=[pb.THREAD_STATUS_RUNNING], page_token=running.next_page_token
        ),
        metadata=md,
    )
    assert [t.thread_id for t in rest.threads] == ["c"] and rest.next_page_token == ""
    deleted = await s.DeleteThread(pb.DeleteThreadRequest(namespace=NS, thread_id="a"), metadata=md)
    assert deleted.checkpoints_deleted == 1
    assert await code_of(restore(s, md, "a")) == grpc.StatusCode.NOT_FOUND
    assert (
        await code_of(s.GetThread(pb.GetThreadRequest(namespace=NS, thread_id="a"), metadata=md))
        == grpc.StatusCode.NOT_FOUND
    )


async def test_stats_count_triggers_and_bytes(stub) -> None:
    s, md = stub
    for trigger in (pb.TRIGGER_STEP_COMPLETED, pb.TRIGGER_STEP_COMPLETED, pb.TRIGGER_MANUAL):
        await save(s, md, "st", {"pad": "x" * 100}, cp={"trigger": trigger})
    st = await s.GetStats(pb.GetStatsRequest(namespace=NS, thread_id="st"), metadata=md)
    assert st.checkpoint_count == 3
    assert {t.trigger: t.count for t in st.triggers} == {
        pb.TRIGGER_STEP_COMPLETED: 2,
        pb.TRIGGER_MANUAL: 1,
    }
    assert st.state_bytes == 3 * len(b'{"pad": "' + b"x" * 100 + b'"}')
    assert st.oldest.ToNanoseconds() <= st.newest.ToNanoseconds()


async def test_typed_metadata_and_server_side_filters(stub) -> None:
    """metadata_json keeps types; metadata_equals compares typed values in the database."""
    s, md = stub
    loop2 = {"source": "loop", "step": 2, "score": 42, "ok": True, "parents": {"": "x"}}
    for meta in ({"source": "input", "step": -1}, {"source": "loop", "step": 1}, loop2):
        saved = await save(s, md, "m", cp={"metadata_json": json.dumps(meta)})
    again = await restore(s, md, "m", checkpoint_id=saved.checkpoint.checkpoint_id)
    assert json.loads(again.checkpoint.metadata_json) == loop2  # from whichever tier
    await save(s, md, "m", cp={"metadata": {"source": "legacy", "step": "7"}})

    async def listed(**equals: str) -> list[dict]:
        got = await s.List(
            pb.ListRequest(namespace=NS, thread_id="m", metadata_equals=equals), metadata=md
        )
        return [json.loads(c.metadata_json) for c in got.checkpoints]

    assert await listed(step="2") == [loop2]
    assert await listed(source='"loop"', step="2") == [loop2]
    assert [m["step"] for m in await listed(source='"loop"')] == [2, 1]
    assert await listed(score="42", ok="true") == [loop2]
    assert await listed(step='"2"') == [], 'the string "2" is not the number 2'
    assert await listed(step="3") == []
    assert await listed(step='"7"') == [{"source": "legacy", "step": "7"}]
    assert len(await listed()) == 4
    head = (await restore(s, md, "m")).checkpoint
    assert dict(head.metadata) == {"source": "legacy", "step": "7"}
    first = (await s.List(pb.ListRequest(namespace=NS, thread_id="m"), metadata=md)).checkpoints[1]
    assert dict(first.metadata) == {
        "source": "loop", "step": "2", "score": "42", "ok": "true", "parents": '{"": "x"}'
    }  # fmt: skip

    for bad in ("[1]", "{oops", '{"x": NaN}', '{"x": "\\u0000"}'):
        assert (
            await code_of(save(s, md, "m", cp={"metadata_json": bad}))
            == grpc.StatusCode.INVALID_ARGUMENT
        ), bad
    for bad in ("nope", "NaN"):
        assert (
            await code_of(
                s.List(
                    pb.ListRequest(namespace=NS, thread_id="m", metadata_equals={"x": bad}),
                    metadata=md,
                )
            )
            == grpc.StatusCode.INVALID_ARGUMENT
        ), bad


async def test_list_across_namespaces_before_and_with_writes(stub) -> None:
    """What LangGraph's alist needs: one thread's checkpoints in every namespace under a
    prefix, newest first, with `before` and the pending writes of each."""
    s, md = stub
    saved: list[tuple[str, str]] = []
    for ns in ("lg:", "lg:child:1", "lg:child:2", "lg:", "other", "lg:child:1"):
        cp = (await save(s, md, "t1", ns=ns)).checkpoint
        saved.append((ns, cp.checkpoint_id))
    await save(s, md, "t2", ns="lg:")  # another thread: never listed
    first_ns, first_id = saved[0]
    await s.PutWrites(
        pb.PutWritesRequest(
            namespace=first_ns,
            thread_id="t1",
            writes=[
                pb.PendingWrite(checkpoint_id=first_id, task_id="a", channel="x", value=b"1"),
                pb.PendingWrite(checkpoint_id=first_id, task_id="a", idx=-1, channel="__error__"),
            ],
        ),
        metadata=md,
    )

    async def listed(**kw) -> pb.ListResponse:
        return await s.List(pb.ListRequest(thread_id="t1", **kw), metadata=md)

    newest_first = [(ns, i) for ns, i in reversed(saved)]
    got = await listed(namespace_prefix="lg:")
    assert [(c.namespace, c.checkpoint_id) for c in got.checkpoints] == [
        x for x in newest_first if x[0] != "other"
    ]
    got = await listed(namespace_prefix="lg:child")
    assert {c.namespace for c in got.checkpoints} == {"lg:child:1", "lg:child:2"}
    assert len((await listed(namespace_prefix="")).checkpoints) == 6
    assert len((await listed(namespace="lg:")).checkpoints) == 2, "without a prefix: one namespace"
    got = await listed(namespace_prefix="lg:", before_checkpoint_id=saved[3][1])
    assert [c.checkpoint_id for c in got.checkpoints] == [i for _, i in saved[:3]][::-1]
    pages, token = [], ""
    while True:
        page = await listed(namespace_prefix="lg:", page_size=2, page_token=token)
        pages += [c.checkpoint_id for c in page.checkpoints]
        token = page.next_page_token
        if not token:
            break
    assert pages == [i for ns, i in newest_first if ns != "other"]
    got = await listed(namespace_prefix="lg:", include_writes=True)
    assert [(w.namespace, w.checkpoint_id) for w in got.writes] == [(first_ns, first_id)]
    assert sorted((w.task_id, w.idx) for w in got.writes[0].writes) == [("a", -1), ("a", 0)]
    assert await code_of(listed(namespace_prefix="x\x01")) == grpc.StatusCode.INVALID_ARGUMENT


async def test_delete_a_thread_across_namespaces(stub) -> None:
    """What LangGraph's adelete_thread needs: every namespace under a prefix; a missing
    thread is not an error when asked so."""
    s, md = stub
    for ns in ("lg:", "lg:child:1", "lg:child:1", "other"):
        await save(s, md, "d", ns=ns)
    await save(s, md, "keep", ns="lg:")

    async def delete(**kw) -> pb.DeleteThreadResponse:
        return await s.DeleteThread(pb.DeleteThreadRequest(thread_id="d", **kw), metadata=md)

    done = await delete(namespace_prefix="lg:")
    assert (done.threads_deleted, done.checkpoints_deleted) == (2, 3)
    for ns in ("lg:", "lg:child:1"):
        assert await code_of(restore(s, md, "d", ns=ns)) == grpc.StatusCode.NOT_FOUND
    assert (await restore(s, md, "d", ns="other")).checkpoint.checkpoint_id
    assert (await restore(s, md, "keep", ns="lg:")).checkpoint.checkpoint_id
    assert await code_of(delete(namespace_prefix="lg:")) == grpc.StatusCode.NOT_FOUND
    gone = await delete(namespace_prefix="lg:", allow_missing=True)
    assert (gone.threads_deleted, gone.checkpoints_deleted) == (0, 0)
    assert (await delete(namespace="lg:", allow_missing=True)).threads_deleted == 0
    assert await code_of(delete(namespace="lg:")) == grpc.StatusCode.NOT_FOUND
    assert (await delete(namespace="other")).threads_deleted == 1


async def test_exact_parent(stub) -> None:
    """An empty parent means "none" with exact_parent (LangGraph's first checkpoint of a
    namespace), and "the head" without it."""
    s, md = stub
    first = (await save(s, md, "p")).checkpoint
    orphan = (await save(s, md, "p", exact_parent=True)).checkpoint
    assert orphan.parent_id == ""
    child = (await save(s, md, "p")).checkpoint
    assert child.parent_id == orphan.checkpoint_id
    chosen = await save(s, md, "p", cp={"parent_id": first.checkpoint_id}, exact_parent=True)
    assert chosen.checkpoint.parent_id == first.checkpoint_id


async def test_prune_threads(stub) -> None:
    """KEEP_LATEST keeps each namespace's head (parent cleared) and forgets the rest, cached
    or not; DELETE removes the threads; other threads are untouched."""
    s, md = stub
    ids: dict[str, list[str]] = {}
    for ns in ("lg:", "lg:", "lg:sub", "lg:sub", "lg:sub", "other"):
        ids.setdefault(ns, []).append((await save(s, md, "p", ns=ns)).checkpoint.checkpoint_id)
    await save(s, md, "q", ns="lg:")
    await restore(s, md, "p", ns="lg:", checkpoint_id=ids["lg:"][0])  # now cached

    async def prune(threads: list[str], strategy: int) -> int:
        done = await s.PruneThreads(
            pb.PruneThreadsRequest(thread_ids=threads, strategy=strategy, namespace_prefix="lg:"),
            metadata=md,
        )
        return done.checkpoints_deleted

    assert await prune(["p", "nobody"], pb.PRUNE_STRATEGY_KEEP_LATEST) == 3
    for ns in ("lg:", "lg:sub"):
        listed = await s.List(pb.ListRequest(namespace=ns, thread_id="p"), metadata=md)
        assert [c.checkpoint_id for c in listed.checkpoints] == [ids[ns][-1]]
        assert listed.checkpoints[0].parent_id == ""
        head = await restore(s, md, "p", ns=ns)
        assert (head.checkpoint.checkpoint_id, head.checkpoint.parent_id) == (ids[ns][-1], "")
    gone = restore(s, md, "p", ns="lg:", checkpoint_id=ids["lg:"][0])
    assert await code_of(gone) == grpc.StatusCode.NOT_FOUND
    assert (await restore(s, md, "p", ns="other")).checkpoint.checkpoint_id == ids["other"][0]
    assert await prune(["p"], pb.PRUNE_STRATEGY_DELETE) == 2
    assert await code_of(restore(s, md, "p", ns="lg:sub")) == grpc.StatusCode.NOT_FOUND
    assert (await restore(s, md, "q", ns="lg:")).checkpoint.checkpoint_id
    assert await code_of(prune(["p"], 0)) == grpc.StatusCode.INVALID_ARGUMENT


async def test_delete_for_runs(stub) -> None:
    """Checkpoints with a metadata run_id in the list go, in every thread under the prefix;
    a thread whose head went moves back to its newest remaining checkpoint."""
    s, md = stub

    async def put(thread: str, run_id: str, ns: str = "lg:") -> str:
        meta = json.dumps({"run_id": run_id})
        saved = await save(s, md, thread, ns=ns, cp={"metadata_json": meta})
        return saved.checkpoint.checkpoint_id

    a1 = await put("a", "run-1")
    await put("a", "run-2")
    await put("b", "run-2")
    await put("c", "run-2", ns="other")
    await restore(s, md, "a", ns="lg:")  # the head is cached now

    async def delete(*runs: str) -> int:
        done = await s.DeleteForRuns(
            pb.DeleteForRunsRequest(run_ids=list(runs), namespace_prefix="lg:"), metadata=md
        )
        return done.checkpoints_deleted

    assert await delete("run-2", "nothing") == 2
    head = (await restore(s, md, "a", ns="lg:")).checkpoint
    assert head.checkpoint_id == a1, "the head moved back to what is left"
    assert await code_of(restore(s, md, "b", ns="lg:")) == grpc.StatusCode.NOT_FOUND
    assert (await restore(s, md, "c", ns="other")).checkpoint.checkpoint_id
    assert await delete() == 0


async def test_copy_thread(stub) -> None:
    """Every namespace under the prefix, same ids, parents, writes and heads, in one go; a
    live target is refused; a deleted one may be copied onto."""
    s, md = stub
    for ns in ("lg:", "lg:", "lg:sub", "other"):
        head = (await save(s, md, "src", ns=ns)).checkpoint
    await s.PutWrites(
        pb.PutWritesRequest(
            namespace="other",
            thread_id="src",
            writes=[pb.PendingWrite(checkpoint_id=head.checkpoint_id, task_id="t", channel="c")],
        ),
        metadata=md,
    )
    source = await s.List(
        pb.ListRequest(thread_id="src", namespace_prefix="lg:", include_writes=True), metadata=md
    )

    async def copy(target: str) -> pb.CopyThreadResponse:
        return await s.CopyThread(
            pb.CopyThreadRequest(
                source_thread_id="src", target_thread_id=target, namespace_prefix="lg:"
            ),
            metadata=md,
        )

    done = await copy("dst")
    assert (done.threads_copied, done.checkpoints_copied) == (2, 3)
    copied = await s.List(pb.ListRequest(thread_id="dst", namespace_prefix="lg:"), metadata=md)
    assert [(c.namespace, c.checkpoint_id, c.parent_id) for c in copied.checkpoints] == [
        (c.namespace, c.checkpoint_id, c.parent_id) for c in source.checkpoints
    ]
    for ns in ("lg:", "lg:sub"):
        src_head = (await restore(s, md, "src", ns=ns)).checkpoint
        dst_head = (await restore(s, md, "dst", ns=ns)).checkpoint
        assert (dst_head.checkpoint_id, dst_head.state) == (src_head.checkpoint_id, src_head.state)
    assert await code_of(restore(s, md, "dst", ns="other")) == grpc.StatusCode.NOT_FOUND
    assert await code_of(copy("dst")) == grpc.StatusCode.ALREADY_EXISTS
    gone = pb.DeleteThreadRequest(thread_id="dst", namespace_prefix="lg:")
    await s.DeleteThread(gone, metadata=md)
    assert (await copy("dst")).threads_copied == 2, "onto a deleted thread"
    missing = await s.CopyThread(
        pb.CopyThreadRequest(source_thread_id="none", target_thread_id="x"), metadata=md
    )
    assert missing.threads_copied == 0


async def test_a_save_may_take_the_lease_in_its_commit(stub) -> None:
    """A run's first checkpoint takes its lease in the same commit (docs/api.md#save)."""
    s, md = stub
    first = await save(s, md, "leased", {"n": 0}, lease_owner="engine-a", lease_ttl_seconds=30)
    assert first.fencing_token == 1
    thread = (
        await s.GetThread(pb.GetThreadRequest(namespace=NS, thread_id="leased"), metadata=md)
    ).thread
    assert thread.lease_owner == "engine-a" and thread.head_checkpoint_id == (
        first.checkpoint.checkpoint_id
    )
    taken = save(s, md, "leased", {"n": 1}, lease_owner="engine-b", lease_ttl_seconds=30)
    assert await code_of(taken) == grpc.StatusCode.FAILED_PRECONDITION
    assert await code_of(save(s, md, "leased", {"n": 1})) == grpc.StatusCode.FAILED_PRECONDITION
    ok = await save(s, md, "leased", {"n": 1}, fencing_token=first.fencing_token)
    assert ok.fencing_token == 0  # took no lease
    # Its holder may take it again (with its token): a new token fences the old one off.
    again = await save(
        s, md, "leased", {"n": 2}, lease_owner="engine-a", lease_ttl_seconds=30, fencing_token=1
    )
    assert again.fencing_token == 2
    stale = save(s, md, "leased", {"n": 3}, fencing_token=first.fencing_token)
    assert await code_of(stale) == grpc.StatusCode.FAILED_PRECONDITION
    # A replayed request takes no lease; an ASYNC save takes none at all.
    once = dict(lease_owner="engine-c", lease_ttl_seconds=30, request_id="lease-once")
    fresh = await save(s, md, "other", {}, **once)
    replay = await save(s, md, "other", {}, **once)
    assert (fresh.fencing_token, replay.fencing_token) == (1, 0)
    assert replay.checkpoint.checkpoint_id == fresh.checkpoint.checkpoint_id
    lazy = save(s, md, "lazy", {}, lease_owner="x", durability=pb.DURABILITY_ASYNC)
    assert await code_of(lazy) == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_save_may_let_the_lease_go_in_its_commit(stub) -> None:
    """A run's last checkpoint lets its lease go in the same commit (docs/api.md)."""
    s, md = stub
    first = await save(s, md, "done", {"n": 0}, lease_owner="engine-a", lease_ttl_seconds=30)
    for bad in (
        dict(release_lease=True),  # no token
        dict(release_lease=True, fencing_token=1, lease_owner="engine-a", lease_ttl_seconds=9),
        dict(release_lease=True, fencing_token=1, durability=pb.DURABILITY_ASYNC),
    ):
        assert await code_of(save(s, md, "done", {}, **bad)) == grpc.StatusCode.INVALID_ARGUMENT
    stale = save(s, md, "done", {"n": 1}, fencing_token=7, release_lease=True)
    assert await code_of(stale) == grpc.StatusCode.FAILED_PRECONDITION
    last = await save(
        s, md, "done", {"n": 1}, fencing_token=first.fencing_token, release_lease=True
    )
    assert last.thread.lease_owner == "" and last.thread.fencing_token == 0  # never disclosed
    thread = (
        await s.GetThread(pb.GetThreadRequest(namespace=NS, thread_id="done"), metadata=md)
    ).thread
    assert thread.lease_owner == "" and thread.head_checkpoint_id == last.checkpoint.checkpoint_id
    # Free now: anyone may write, or take it (with a new token).
    await save(s, md, "done", {"n": 2})
    again = await save(s, md, "done", {"n": 3}, lease_owner="engine-b", lease_ttl_seconds=30)
    assert again.fencing_token == first.fencing_token + 1
