"""What operators see: group commit at work, Prometheus metrics, graceful shutdown."""

from __future__ import annotations

import asyncio
import urllib.request

import pytest

from tests.requests import save
from tests.servers import checkpoint_stub, free_port
from workflow_stubs.checkpoint.v1 import checkpoint_pb2 as pb


async def test_concurrent_saves_share_commits(service, tenant) -> None:
    """On a service of its own (not the shared one): it counts every commit the service makes."""
    channel, s, md = await checkpoint_stub(service.address, tenant)
    before = await s.GetServerInfo(pb.GetServerInfoRequest(), metadata=md)
    await asyncio.gather(*(save(s, md, f"gc-{i}", {"i": i}) for i in range(64)))
    after = await s.GetServerInfo(pb.GetServerInfoRequest(), metadata=md)
    await channel.close()
    operations = after.committed_operations - before.committed_operations
    commits = after.commits - before.commits
    assert operations == 64
    assert commits < operations, f"{commits} commits for {operations} concurrent saves"


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_prometheus_metrics(service_factory, backend, tenant) -> None:
    port = free_port()
    svc = service_factory(backend, "--metrics-port", str(port))
    channel, s, md = await checkpoint_stub(svc.address, tenant)
    await save(s, md, "m")
    await s.Restore(pb.RestoreRequest(namespace="runs", thread_id="m"), metadata=md)
    text = await asyncio.to_thread(
        lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
    )
    body = text.decode()
    assert "checkpoint_commits_total" in body
    assert 'checkpoint_restores_total{tier="MEMORY"} 1.0' in body
    assert "checkpoint_batch_size_bucket" in body
    await channel.close()


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_sigterm_exits_cleanly(service_process, tenant) -> None:
    service = service_process
    channel, s, md = await checkpoint_stub(service.address, tenant)
    await save(s, md, "bye")
    await channel.close()
    code = await asyncio.to_thread(service.terminate)
    assert code == 0
    assert '"msg": "stopped"' in service.log_tail(20)


def test_logged_urls_hide_their_passwords() -> None:
    """Issue 12, defect 12: the start-up log's URLs through SQLAlchemy's own rendering, not a
    hand-written split (which took an `@` in the query for the end of the credentials)."""
    from checkpoint_svc.server import redacted

    assert redacted("postgresql+asyncpg://app:s3cret@db:5432/wf") == (
        "postgresql+asyncpg://app:***@db:5432/wf"
    )
    assert redacted("redis://:s3cret@cache:6379/0") == "redis://:***@cache:6379/0"
    with_query = redacted("postgresql://app:s3cret@db/wf?application_name=a@b")
    assert with_query.startswith("postgresql://app:***@db/wf?") and "s3cret" not in with_query
    assert redacted("sqlite+aiosqlite:///data/checkpoints.db") == (
        "sqlite+aiosqlite:///data/checkpoints.db"
    )
