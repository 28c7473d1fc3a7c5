"""Who may do what (docs/security.md): credentials checked by the real servers, over every RPC
of both services; the tenant from the credential; the engine's namespaces written only by the
engine; the fencing token never disclosed; and the checks themselves, in this process."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import itertools
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from google.protobuf import descriptor_pool, message_factory
from google.rpc import code_pb2

from checkpoint_svc.servicer import REQUIRED_ROLES as STORE_ROLES
from engine_svc import expressions
from engine_svc.definition import NodeSpec
from engine_svc.http_policy import HttpPolicy
from engine_svc.nodes import NodeCall, NodeFailed, NodeRunner
from engine_svc.servicer import REQUIRED_ROLES as ENGINE_ROLES
from tests.engine_client import definition, wait_status
from tests.servers import free_port
from workflow_rpc import identities
from workflow_rpc.callers import Identity, Role
from workflow_rpc.identities import (
    Authenticator,
    JwtKeys,
    PermissionDenied,
    TokenFile,
    Unauthenticated,
    token_hash,
)
from workflow_rpc.serving import check_exposure
from workflow_rpc.tls import channel_credentials
from workflow_stubs.checkpoint.v1 import checkpoint_pb2 as cpb
from workflow_stubs.checkpoint.v1 import checkpoint_pb2_grpc as cpb_grpc
from workflow_stubs.engine.v1 import engine_pb2 as pb
from workflow_stubs.engine.v1 import engine_pb2_grpc as pb_grpc

SQLITE = pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
BOTH = pytest.mark.parametrize("backend", ["sqlite", "postgres+redis"], indirect=True)

AUDIENCE = "durable-workflows"
SECRET = b"a-secret-of-the-test-only-32-bytes!"
# Tenant "a", one role each (the system role is the engine's token's).
ROLE_TOKENS = {role: f"{role}-token" for role in Role if role != Role.SYSTEM}


def _entry(token: str, subject: str, tenant: str, roles: list[str]) -> dict[str, object]:
    return {"sha256": token_hash(token), "subject": subject, "tenant": tenant, "roles": roles}


def write_tokens(path: Path, *extra: dict[str, object]) -> None:
    entries = [_entry(t, f"{r}-a", "a", [r]) for r, t in ROLE_TOKENS.items()]
    entries += [
        _entry("engine-token", "engine", "*", ["system"]),
        _entry("operator-token", "operator", "*", ["admin"]),
        _entry("writer-b-token", "writer-b", "b", ["writer"]),
        *extra,
    ]
    path.write_text(json.dumps({"tokens": entries}))  # JSON is YAML


def hs256(claims: dict[str, object], secret: bytes = SECRET) -> str:
    return jwt.encode({"aud": AUDIENCE, "exp": time.time() + 600, **claims}, secret, "HS256")


@pytest.fixture
def credentials(tmp_path: Path) -> Path:
    """The token file, the JWT secret and the engine's token, in tmp_path."""
    write_tokens(tmp_path / "tokens.yaml")
    (tmp_path / "jwt.secret").write_bytes(SECRET)
    (tmp_path / "engine.token").write_text("engine-token\n")
    return tmp_path


def _store_and_engine(service_factory, engine_factory, backend, credentials):
    """A store in this process and an engine, both checking credentials, the engine with its
    system token."""
    store = service_factory(backend, *auth_args(credentials), in_process=True)
    token = ("--checkpoint-token-file", str(credentials / "engine.token"))
    return store, engine_factory(store, *auth_args(credentials), *token)


def auth_args(where: Path) -> tuple[str, ...]:
    return (
        "--auth-token-file", str(where / "tokens.yaml"),
        "--auth-jwt-secret-file", str(where / "jwt.secret"),
    )  # fmt: skip


def md(token: str | None, *tenants: str) -> tuple[tuple[str, str], ...]:
    named = tuple(("x-tenant-id", t) for t in tenants)
    return (*named, ("authorization", f"Bearer {token}")) if token else named


# ---- the checks, in this process ---------------------------------------------------------


@pytest.fixture
def fast_reload(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(identities, "RELOAD_CHECK_SECONDS", 0.0)


def test_a_token_file_is_read_again_when_it_changes(tmp_path, fast_reload) -> None:
    path = tmp_path / "tokens.yaml"
    write_tokens(path)
    tokens = TokenFile(path)
    assert tokens.identity("reader-token") == Identity(
        subject="reader-a", tenant="a", roles=frozenset({Role.READER})
    )
    assert tokens.identity("new-token") is None
    write_tokens(path, _entry("new-token", "newcomer", "c", ["writer"]))
    assert tokens.identity("new-token") is not None
    path.write_text("tokens: [{sha256: not-a-hash}]")  # broken: the last good file stays
    assert tokens.identity("new-token") is not None
    with pytest.raises(
        ValueError, match=r"not a token file: tokens\.0\.subject: Field required \(and 3 more\)"
    ):
        TokenFile(path)  # but a bad file at start is an error, saying where


@pytest.mark.parametrize(
    ("claims", "secret", "refusal"),
    [
        ({"exp": time.time() - 120}, SECRET, "has expired"),
        ({"aud": "someone-else"}, SECRET, "not for this audience"),
        ({}, b"another-secret-of-32-bytes-or-more!", "not valid"),
        ({"tenant": None}, SECRET, "no tenant"),
        ({"roles": ["root"]}, SECRET, "do not parse"),
        ({"tenant": "not a tenant!"}, SECRET, "do not parse"),
    ],
)
def test_a_jwt_that_does_not_hold_is_refused(claims, secret, refusal, tmp_path) -> None:
    base = {"sub": "svc", "tenant": "a", "roles": "reader writer"}
    token = hs256({**base, **claims}, secret)
    auth = Authenticator(jwts=_keys_in(tmp_path, {"jwt.secret": SECRET}, secret="jwt.secret"))
    with pytest.raises(Unauthenticated, match=refusal):
        auth.identity(md(token))


def _keys_in(where: Path, files: dict[str, bytes], *, secret: str = "", jwks: str = "") -> JwtKeys:
    for name, content in files.items():
        (where / name).write_bytes(content)
    return JwtKeys(
        audience=AUDIENCE,
        secret_file=where / secret if secret else None,
        jwks_file=where / jwks if jwks else None,
    )


def test_jwts_signed_with_a_secret_or_a_key_of_a_jwks_file_name_their_caller(tmp_path) -> None:
    auth = Authenticator(jwts=_keys_in(tmp_path, {"jwt.secret": SECRET}, secret="jwt.secret"))
    found = auth.identity(md(hs256({"sub": "svc", "tenant": "a", "roles": ["reader"]})))
    assert found == Identity(subject="svc", tenant="a", roles=frozenset({Role.READER}))
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(private.public_key()))
    jwks = json.dumps({"keys": [{**public, "kid": "k1", "alg": "RS256"}]}).encode()
    auth = Authenticator(jwts=_keys_in(tmp_path, {"jwks.json": jwks}, jwks="jwks.json"))
    claims = {"sub": "ops", "tenant": "*", "roles": ["admin"], "aud": AUDIENCE}
    signed = jwt.encode(
        {**claims, "exp": time.time() + 60}, private, "RS256", headers={"kid": "k1"}
    )
    assert auth.identity(md(signed)).tenant == "*"
    other = jwt.encode({**claims, "exp": time.time() + 60}, private, "RS256", headers={"kid": "k2"})
    with pytest.raises(Unauthenticated, match="no RS256 key of the JWKS file has kid 'k2'"):
        auth.identity(md(other))
    with pytest.raises(Unauthenticated, match="'HS256' are not accepted"):
        auth.identity(md(hs256({"sub": "x", "tenant": "a", "roles": ["reader"]})))


def test_roles_include_lesser_ones_and_a_tenant_bound_credential_names_only_its_own(
    tmp_path,
) -> None:
    write_tokens(tmp_path / "tokens.yaml")
    auth = Authenticator(tokens=TokenFile(tmp_path / "tokens.yaml"), system_tenant="engine.sys")
    get = "/checkpoint.v1.CheckpointService/GetThread"
    assert auth.admit(get, Role.READER, md("admin-token", "a")).subject == "admin-a"
    with pytest.raises(PermissionDenied, match="GetThread needs the admin role; reader-a has"):
        auth.admit(get, Role.ADMIN, md("reader-token"))
    with pytest.raises(PermissionDenied, match="acts for tenant 'a' only, not 'b'"):
        auth.admit(get, Role.READER, md("reader-token", "b"))
    with pytest.raises(PermissionDenied, match="acts for tenant 'a' only"):
        auth.admit(get, Role.READER, md("reader-token", "a", "b"))
    assert auth.admit(get, Role.ADMIN, md("operator-token", "b")).subject == "operator"
    with pytest.raises(PermissionDenied, match="the engine's own"):
        auth.admit(get, Role.READER, md("operator-token", "engine.sys"))
    assert auth.admit(get, Role.READER, md("engine-token", "engine.sys")).subject == "engine"
    with pytest.raises(PermissionDenied, match="a role no credential has"):
        auth.admit("/checkpoint.v1.CheckpointService/Unlisted", None, md("engine-token"))
    for bad, why in [
        (md(None), "no credentials"),
        ((("authorization", "Basic abc"),), "must be 'Bearer TOKEN'"),
        ((*md("reader-token"), *md("admin-token")), "2 authorization headers"),
        (md("nobody-token"), "not known here"),
    ]:
        with pytest.raises(Unauthenticated, match=why):
            auth.admit(get, Role.READER, bad)


def test_without_credentials_a_service_listens_on_loopback_only(caplog, capsys) -> None:
    for address in ("127.0.0.1:1", "localhost:1", "[::1]:1"):
        check_exposure(address, authenticated=False, insecure=False, what="svc")
    for address in ("0.0.0.0:1", "[::]:1", "10.1.2.3:1", "example.org:1", ":1"):
        with pytest.raises(SystemExit) as refused:
            check_exposure(address, authenticated=False, insecure=False, what="svc")
        assert refused.value.code == 2
        check_exposure(address, authenticated=True, insecure=False, what="svc")
    assert "with no credentials checked" in capsys.readouterr().err
    check_exposure("0.0.0.0:1", authenticated=False, insecure=True, what="svc")
    assert "--insecure" in caplog.text


def test_every_rpc_of_both_services_has_a_role() -> None:
    for service, roles in [
        (cpb.DESCRIPTOR.services_by_name["CheckpointService"], STORE_ROLES),
        (pb.DESCRIPTOR.services_by_name["EngineService"], ENGINE_ROLES),
    ]:
        methods = {f"/{service.full_name}/{m.name}" for m in service.methods}
        assert methods == set(roles)


# ---- over the wire ------------------------------------------------------------------------


# How long an admitted stream is given: a tenant-wide Stream follows until its heartbeat, and a
# refusal comes at once.
STREAM_WAIT = 0.5


def _calls(
    channel: grpc.aio.Channel, service: str
) -> Iterator[tuple[str, Callable[..., object], bool]]:
    """(full method name, a callable taking metadata, whether it streams responses), with an
    empty request, for every RPC of `service`."""
    found = descriptor_pool.Default().FindServiceByName(service)
    for method in found.methods:
        name = f"/{service}/{method.name}"
        request = message_factory.GetMessageClass(method.input_type)()
        if "namespace_prefix" in request.DESCRIPTOR.fields_by_name:  # outside the engine's
            request.namespace_prefix = "lg:"
        response = message_factory.GetMessageClass(method.output_type)
        kwargs = {
            "request_serializer": type(request).SerializeToString,
            "response_deserializer": response.FromString,
        }
        if method.client_streaming:
            call = channel.stream_stream(name, **kwargs)
            yield (
                name,
                (lambda c=call: lambda m: c(iter(()), metadata=m, timeout=STREAM_WAIT))(),
                True,
            )
        elif method.server_streaming:
            call = channel.unary_stream(name, **kwargs)
            yield (
                name,
                (lambda c=call, r=request: lambda m: c(r, metadata=m, timeout=STREAM_WAIT))(),
                True,
            )
        else:
            call = channel.unary_unary(name, **kwargs)
            yield name, (lambda c=call, r=request: lambda m: c(r, metadata=m, timeout=5))(), False


async def _code(call: Callable[..., object], streams: bool, metadata) -> grpc.StatusCode:
    try:
        if streams:
            async for _ in call(metadata):  # type: ignore[attr-defined]
                break
        else:
            await call(metadata)  # type: ignore[misc]
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def _matrix(address: str, service: str, roles: dict[str, Role]) -> list[str]:
    """What went wrong over every RPC of the service and every kind of credential."""
    expired = hs256({"sub": "late", "tenant": "a", "roles": ["admin"], "exp": time.time() - 99})
    auth_codes = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}
    # An admitted call with an empty request is answered, refused for its fields, not found,
    # or (a stream) still open: never a failure of ours.
    ours = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
    wrong: list[str] = []
    async with grpc.aio.insecure_channel(address) as channel:
        for name, call, streams in _calls(channel, service):
            cases = [
                ("no token", md(None, "a"), grpc.StatusCode.UNAUTHENTICATED),
                ("a bad token", md("forged", "a"), grpc.StatusCode.UNAUTHENTICATED),
                ("an expired JWT", md(expired, "a"), grpc.StatusCode.UNAUTHENTICATED),
                ("A's token for B", md("admin-token", "b"), grpc.StatusCode.PERMISSION_DENIED),
            ]
            for role, token in ROLE_TOKENS.items():
                admitted = Identity(subject="", tenant="a", roles=frozenset({role})).may(
                    roles[name]
                )
                cases.append((f"{role}", md(token, "a"), None if admitted else "denied"))
            cases.append(("the engine", md("engine-token", "a"), None))
            cases.append(
                ("a JWT writer", md(hs256(_writer_claims()), "a"), _jwt_expect(roles[name]))
            )
            for what, metadata, expected in cases:
                code = await _code(call, streams, metadata)
                if expected is None and code in auth_codes | ours:
                    wrong.append(f"{name} with {what}: {code.name}, expected admitted")
                elif expected == "denied" and code != grpc.StatusCode.PERMISSION_DENIED:
                    wrong.append(f"{name} with {what}: {code.name}, expected PERMISSION_DENIED")
                elif isinstance(expected, grpc.StatusCode) and code != expected:
                    wrong.append(f"{name} with {what}: {code.name}, expected {expected.name}")
    return wrong


def _writer_claims() -> dict[str, object]:
    return {"sub": "jwt-writer", "tenant": "a", "roles": ["writer"]}


def _jwt_expect(needed: Role) -> str | None:
    return None if needed in (Role.READER, Role.WRITER) else "denied"


@BOTH
async def test_every_rpc_of_the_store_checks_credentials_roles_and_tenant(
    service_factory, backend, credentials
) -> None:
    store = service_factory(backend, *auth_args(credentials), in_process=True)
    assert await _matrix(store.address, "checkpoint.v1.CheckpointService", STORE_ROLES) == []


@SQLITE
async def test_every_rpc_of_the_engine_checks_credentials_roles_and_tenant(
    service_factory, engine_factory, backend, credentials
) -> None:
    _store, engine = _store_and_engine(service_factory, engine_factory, backend, credentials)
    assert await _matrix(engine.address, "engine.v1.EngineService", ENGINE_ROLES) == []


def _ran(engine_address: str, token: str | None, *args: str, tenant: str | None = None):
    """`wf` through its real entry point, with WF_TOKEN (and WF_TENANT) as given."""
    env = {k: v for k, v in os.environ.items() if k not in ("WF_TOKEN", "WF_TENANT")}
    env |= {"WF_TOKEN": token} if token else {}
    env |= {"WF_TENANT": tenant} if tenant else {}
    wf = str(Path(sys.executable).with_name("wf"))
    return subprocess.run(
        [wf, "--engine", engine_address, *args], env=env, capture_output=True, text=True
    )


@BOTH
async def test_a_tenant_sees_only_its_own_and_the_engines_namespaces_are_the_engines(
    service_factory, engine_factory, backend, credentials, tmp_path
) -> None:
    store, engine = _store_and_engine(service_factory, engine_factory, backend, credentials)
    path = tmp_path / "wf.json"
    nodes = [{"id": "nap", "type": "sleep", "config": {"seconds": 30}}]
    path.write_text(json.dumps({"workflow_id": "wf", "nodes": nodes}))
    # wf: the tenant comes from the token; exit codes say what was refused.
    assert _ran(engine.address, None, "runs").returncode == 7
    assert _ran(engine.address, "forged", "runs").returncode == 7
    refused = _ran(engine.address, "reader-token", "register", str(path))
    assert refused.returncode == 8, refused.stderr
    assert "RegisterWorkflow needs the writer role; reader-a has reader" in refused.stderr
    assert _ran(engine.address, "writer-token", "register", str(path)).returncode == 0
    other = _ran(engine.address, "writer-token", "runs", tenant="b")
    assert other.returncode == 8 and "acts for tenant 'a' only" in other.stderr
    started = _ran(engine.address, "writer-token", "start", "wf")
    assert started.returncode == 0, started.stderr
    run_id = started.stdout.split()[0]
    listed = _ran(engine.address, "reader-token", "runs")
    assert listed.returncode == 0 and run_id in listed.stdout

    async with grpc.aio.insecure_channel(engine.address) as channel:
        s = pb_grpc.EngineServiceStub(channel)
        await wait_status(s, md("reader-token"), run_id, pb.RUN_STATUS_RUNNING)
        # B's writer asks for A's run, and for a run that does not exist: the same answer.
        fake = run_id[:-4] + ("0000" if not run_id.endswith("0000") else "1111")
        answers = []
        for asked in (run_id, fake):
            with pytest.raises(grpc.aio.AioRpcError) as refused_rpc:
                await s.GetRun(pb.GetRunRequest(run_id=asked), metadata=md("writer-b-token"))
            err = refused_rpc.value
            answers.append((err.code(), (err.details() or "").replace(asked, "ID")))
        assert answers[0] == answers[1] == (grpc.StatusCode.NOT_FOUND, "run 'ID' not found")
        with pytest.raises(grpc.aio.AioRpcError) as cancel:
            await s.CancelRun(pb.CancelRunRequest(run_id=run_id), metadata=md("writer-b-token"))
        assert cancel.value.code() == grpc.StatusCode.NOT_FOUND

    async with grpc.aio.insecure_channel(store.address) as channel:
        c = cpb_grpc.CheckpointServiceStub(channel)
        writer = md("writer-token")
        thread = (
            await c.GetThread(
                cpb.GetThreadRequest(namespace="runs", thread_id=run_id), metadata=writer
            )
        ).thread
        assert thread.lease_owner and thread.fencing_token == 0  # leased, and its token unsaid
        listed_threads = await c.ListThreads(
            cpb.ListThreadsRequest(namespace="runs"), metadata=writer
        )
        assert [t.fencing_token for t in listed_threads.threads] == [0]
        # A's own writer (and admin) cannot write into the run behind the engine: a guessed
        # fencing token would not help, as the namespace itself is closed to them.
        forged_save = cpb.SaveRequest(
            checkpoint=cpb.Checkpoint(namespace="runs", thread_id=run_id), fencing_token=1
        )
        forged = [
            c.Save(forged_save, metadata=writer),
            c.Publish(
                cpb.PublishRequest(
                    namespace="runs",
                    thread_id=run_id,
                    fencing_token=1,
                    events=[cpb.NewEvent(type="node.completed")],
                ),
                metadata=writer,
            ),
            c.AcquireLease(
                cpb.AcquireLeaseRequest(
                    namespace="runs", thread_id=run_id, owner="thief", ttl_seconds=30
                ),
                metadata=writer,
            ),
            c.DeleteThread(
                cpb.DeleteThreadRequest(namespace="runs", thread_id=run_id),
                metadata=md("admin-token"),
            ),
        ]
        for call in forged:
            with pytest.raises(grpc.aio.AioRpcError) as denied:
                await call
            assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "namespace 'runs' is the engine's" in (denied.value.details() or "")
        # An admin's copy, prune or delete under a prefix that covers the engine's namespaces
        # (a copied run would be one the engine runs again).
        admin = md("admin-token")
        covering = [
            c.CopyThread(
                cpb.CopyThreadRequest(source_thread_id=run_id, target_thread_id="clone"),
                metadata=admin,
            ),
            c.CopyThread(
                cpb.CopyThreadRequest(
                    source_thread_id=run_id, target_thread_id="clone", namespace_prefix="run"
                ),
                metadata=admin,
            ),
            c.PruneThreads(
                cpb.PruneThreadsRequest(
                    thread_ids=[run_id], strategy=cpb.PRUNE_STRATEGY_DELETE, namespace_prefix=""
                ),
                metadata=admin,
            ),
            c.DeleteForRuns(cpb.DeleteForRunsRequest(run_ids=[run_id]), metadata=admin),
            c.DeleteThread(
                cpb.DeleteThreadRequest(thread_id=run_id, namespace_prefix="r"), metadata=admin
            ),
        ]
        for call in covering:
            with pytest.raises(grpc.aio.AioRpcError) as denied:
                await call
            assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "covers the engine's namespaces" in (denied.value.details() or "")
        # On a Session stream too.
        async with contextlib.aclosing(_session_answers(c, writer, forged_save)) as answers:
            async for answer in answers:
                assert answer.error.code == code_pb2.PERMISSION_DENIED, answer
                break
        # Its own namespaces are its to write (a LangGraph saver's, say), and a stale token
        # there does not tell it the current one.
        saved = await c.Save(
            cpb.SaveRequest(
                checkpoint=cpb.Checkpoint(namespace="lg:", thread_id="t"),
                lease_owner="me",
                lease_ttl_seconds=30,
            ),
            metadata=writer,
        )
        assert saved.checkpoint.checkpoint_id and saved.fencing_token == 1
        for call in (
            c.Save(
                cpb.SaveRequest(
                    checkpoint=cpb.Checkpoint(namespace="lg:", thread_id="t"), fencing_token=9
                ),
                metadata=writer,
            ),
            c.RenewLease(
                cpb.RenewLeaseRequest(
                    namespace="lg:", thread_id="t", owner="other", fencing_token=9, ttl_seconds=9
                ),
                metadata=writer,
            ),
            c.ReleaseLease(
                cpb.ReleaseLeaseRequest(
                    namespace="lg:", thread_id="t", owner="other", fencing_token=9
                ),
                metadata=writer,
            ),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as stale:
                await call
            assert stale.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "1" not in (stale.value.details() or ""), stale.value.details()
        copied = await c.CopyThread(
            cpb.CopyThreadRequest(
                source_thread_id="t", target_thread_id="t2", namespace_prefix="lg:"
            ),
            metadata=admin,
        )
        assert copied.threads_copied == 1
        # The engine's own tenant is the system role's only.
        with pytest.raises(grpc.aio.AioRpcError) as reserved:
            await c.ListThreads(
                cpb.ListThreadsRequest(), metadata=md("operator-token", "engine.system")
            )
        assert reserved.value.code() == grpc.StatusCode.PERMISSION_DENIED
    cancelled = _ran(engine.address, "writer-token", "cancel", run_id)  # A's own writer may
    assert cancelled.returncode == 0, cancelled.stderr


@SQLITE
async def test_an_engine_without_the_system_identity_is_refused_by_the_store(
    service_factory, engine_factory, backend, credentials
) -> None:
    store = service_factory(backend, *auth_args(credentials), in_process=True)
    good = engine_factory(
        store, *auth_args(credentials), "--checkpoint-token-file", str(credentials / "engine.token")
    )
    registered = definition([{"id": "a", "type": "noop"}])
    async with grpc.aio.insecure_channel(good.address) as channel:
        request = pb.RegisterWorkflowRequest(definition=registered)
        await pb_grpc.EngineServiceStub(channel).RegisterWorkflow(
            request, metadata=md("writer-token")
        )
    (credentials / "writer.token").write_text("writer-token")
    for engine_token in (None, "writer.token"):
        token_args = (
            ("--checkpoint-token-file", str(credentials / engine_token)) if engine_token else ()
        )
        engine = engine_factory(store, *auth_args(credentials), *token_args)
        async with grpc.aio.insecure_channel(engine.address) as channel:
            s = pb_grpc.EngineServiceStub(channel)
            other = definition([{"id": "b", "type": "noop"}], "other")
            for call in (  # a unary store call, and a run's calls on its Session stream
                s.RegisterWorkflow(
                    pb.RegisterWorkflowRequest(definition=other), metadata=md("writer-token")
                ),
                s.StartRun(pb.StartRunRequest(workflow_id="wf"), metadata=md("writer-token")),
            ):
                started = time.monotonic()
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await call
                assert refused.value.code() == grpc.StatusCode.INTERNAL, refused.value
                assert "refused this engine's credential" in (refused.value.details() or "")
                assert "--checkpoint-token-file" in (refused.value.details() or "")
                assert time.monotonic() - started < 5  # at once: no retry makes it pass


@SQLITE
async def test_a_token_added_to_the_file_is_accepted_without_a_restart(
    service_factory, backend, credentials
) -> None:
    store = service_factory(backend, *auth_args(credentials), in_process=True)
    async with grpc.aio.insecure_channel(store.address) as channel:
        c = cpb_grpc.CheckpointServiceStub(channel)
        request = cpb.ListThreadsRequest()
        with pytest.raises(grpc.aio.AioRpcError) as before:
            await c.ListThreads(request, metadata=md("late-token"))
        assert before.value.code() == grpc.StatusCode.UNAUTHENTICATED
        write_tokens(credentials / "tokens.yaml", _entry("late-token", "late", "a", ["reader"]))
        deadline = time.monotonic() + 10
        while True:
            try:
                await c.ListThreads(request, metadata=md("late-token"))
                break
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAUTHENTICATED
                assert time.monotonic() < deadline, "the new token was never accepted"
                await asyncio.sleep(0.1)
        write_tokens(credentials / "tokens.yaml")  # and taken away again
        while True:
            try:
                await c.ListThreads(request, metadata=md("late-token"))
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAUTHENTICATED
                break
            assert time.monotonic() < deadline + 10, "the removed token stayed accepted"
            await asyncio.sleep(0.1)


def test_a_service_without_credentials_refuses_to_listen_beyond_loopback(tmp_path) -> None:
    port = free_port()
    for module in ("checkpoint_svc", "engine_svc"):
        db = ["--db", f"sqlite+aiosqlite:///{tmp_path}/s.db"] if module == "checkpoint_svc" else []
        done = subprocess.run(
            [sys.executable, "-m", module, "--listen", f"0.0.0.0:{port}", *db],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 2
        assert f"refusing to listen on 0.0.0.0:{port} with no credentials checked" in done.stderr
        assert "--insecure" in done.stderr and "Traceback" not in done.stderr
    # With --insecure it listens there, and says what that means.
    engine = subprocess.Popen(
        [sys.executable, "-m", "engine_svc", "--listen", f"0.0.0.0:{port}", "--insecure",
         "--recovery-interval", "0"],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert engine.stderr is not None
        lines = [engine.stderr.readline() for _ in range(2)]
    finally:
        engine.terminate()
        engine.wait(30)
    assert "no credentials checked (--insecure)" in lines[0]
    assert json.loads(lines[1])["msg"] == "listening"


@SQLITE
async def test_the_node_client_sends_its_token(
    service_factory, engine_factory, backend, credentials
) -> None:
    from tests.test_node_client import EXAMPLE, node, node_env

    _store, engine = _store_and_engine(service_factory, engine_factory, backend, credentials)
    results = {}
    for token in (None, "writer-token"):
        env = {k: v for k, v in node_env().items() if k != "WF_TOKEN"}
        env |= {"WF_TOKEN": token} if token else {}
        proc = await asyncio.create_subprocess_exec(
            node(), EXAMPLE, "--engine", engine.address, cwd=Path(__file__).parents[1], env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        results[token] = (proc.returncode, out.decode(), err.decode())
    code, _, err = results[None]
    assert code != 0 and "UNAUTHENTICATED" in err, results[None]
    code, out, err = results["writer-token"]
    assert code == 0, (out, err)
    assert "run.status COMPLETED" in out  # in the token's tenant, "a"


# ---- nodes that cannot escape ------------------------------------------------------------


@SQLITE
async def test_python_handlers_outside_the_allowed_modules_are_refused_at_registration(
    service, engine_factory, tenant
) -> None:
    from workflow_client.errors import from_rpc_error

    engine = engine_factory(service, "--handlers", "tests.engine_handlers")
    refused = {
        "os:system": "module 'os' is not allowed (--handlers)",
        "tests.engine_handlers:_private": 'a name starting with "_" is not a handler',
        "tests.engine_handlers:asyncio": "not a function of tests.engine_handlers",
        "tests.engine_handlers:missing": "no function 'missing' in tests.engine_handlers",
    }
    async with grpc.aio.insecure_channel(engine.address) as channel:
        s = pb_grpc.EngineServiceStub(channel)
        for handler, why in refused.items():
            nodes = [
                {"id": "ok", "type": "python", "config": {"handler": "tests.engine_handlers:step"}},
                {"id": "bad", "type": "python", "config": {"handler": handler}},
            ]
            with pytest.raises(grpc.aio.AioRpcError) as bad:
                await s.RegisterWorkflow(
                    pb.RegisterWorkflowRequest(definition=definition(nodes)),
                    metadata=(("x-tenant-id", tenant),),
                )
            error = from_rpc_error(bad.value)
            assert error.code == grpc.StatusCode.INVALID_ARGUMENT, handler
            assert [f for f, _ in error.violations] == ["nodes[1].config.handler"], handler
            assert why in error.violations[0][1], (handler, error.violations)
        ok = [{"id": "ok", "type": "python", "config": {"handler": "tests.engine_handlers:step"}}]
        await s.RegisterWorkflow(
            pb.RegisterWorkflowRequest(definition=definition(ok)),
            metadata=(("x-tenant-id", tenant),),
        )


async def _session_answers(stub, metadata, save: cpb.SaveRequest):
    """The answers of a Session stream that sends one Save (and then waits)."""
    done = asyncio.Event()

    async def requests():
        yield cpb.SessionRequest(call_id=1, save=save)
        await done.wait()

    call = stub.Session(requests(), metadata=metadata)
    try:
        async for answer in call:
            yield answer
    finally:
        done.set()
        call.cancel()


@BOTH
async def test_a_revoked_token_ends_its_open_streams(
    service_factory, backend, credentials, fast_reload
) -> None:
    """A Session and a Stream opened with a token end once it leaves the file."""
    write_tokens(credentials / "tokens.yaml", _entry("late-token", "late", "a", ["writer"]))
    # Heartbeats every second: an idle Stream is checked again at each one.
    store = service_factory(backend, *auth_args(credentials), "--heartbeat", "1", in_process=True)
    async with grpc.aio.insecure_channel(store.address) as channel:
        c = cpb_grpc.CheckpointServiceStub(channel)
        late = md("late-token")
        stream = c.Stream(cpb.StreamRequest(follow=True), metadata=late)
        sent: asyncio.Queue[cpb.SessionRequest | None] = asyncio.Queue()

        async def requests():
            while (request := await sent.get()) is not None:
                yield request

        session = c.Session(requests(), metadata=late)
        save = cpb.SaveRequest(checkpoint=cpb.Checkpoint(namespace="lg:", thread_id="s"))
        await sent.put(cpb.SessionRequest(call_id=1, save=save))
        first = await session.read()
        assert first.HasField("save"), first
        write_tokens(credentials / "tokens.yaml")  # revoked
        await asyncio.sleep(1.2)  # past the recheck interval
        for n in range(2, 40):  # each call after it fails, or the stream ends
            await sent.put(cpb.SessionRequest(call_id=n, save=save))
            try:
                answer = await asyncio.wait_for(session.read(), 5)
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAUTHENTICATED
                break
            assert answer is not grpc.aio.EOF and not answer.HasField("save"), answer
            await asyncio.sleep(0.1)
        code = await session.code()
        assert code == grpc.StatusCode.UNAUTHENTICATED, code
        await sent.put(None)
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            async with asyncio.timeout(10):  # its next heartbeat is checked
                async for _ in stream:
                    pass
        assert ended.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_a_credential_of_the_engines_tenant_needs_the_system_role(tmp_path) -> None:
    write_tokens(
        tmp_path / "tokens.yaml", _entry("sneaky-token", "sneaky", "engine.sys", ["admin"])
    )
    auth = Authenticator(tokens=TokenFile(tmp_path / "tokens.yaml"), system_tenant="engine.sys")
    with pytest.raises(PermissionDenied, match="the engine's own"):
        auth.admit("/checkpoint.v1.CheckpointService/ListThreads", Role.READER, md("sneaky-token"))


def test_algorithm_confusion_and_bad_key_files_are_refused(tmp_path) -> None:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(private.public_key()))
    files = {
        "jwt.secret": SECRET,
        "jwks.json": json.dumps({"keys": [{**public, "kid": "k1"}]}).encode(),
    }
    auth = Authenticator(jwts=_keys_in(tmp_path, files, secret="jwt.secret", jwks="jwks.json"))
    claims = {"sub": "x", "tenant": "a", "roles": ["admin"], "aud": AUDIENCE}
    unsigned = jwt.encode({**claims, "exp": time.time() + 60}, None, "none")
    with pytest.raises(Unauthenticated, match="'none' are not accepted"):
        auth.identity(md(unsigned))
    # HS256 signed with the RSA public key (as PEM) is checked against the secret, not the key.
    pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    forged = _hmac_jwt({**claims, "exp": int(time.time()) + 60}, pem)
    with pytest.raises(Unauthenticated, match="not valid"):
        auth.identity(md(forged))
    assert auth.identity(md(hs256({"sub": "x", "tenant": "a", "roles": ["reader"]}))).subject
    for name, content, why in [
        ("short.secret", b"too-short", "at least 32 bytes"),
        ("list.json", b"[1, 2]", "not a JWKS file"),
        ("secret-only.json", json.dumps({"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}).encode(),
         "no RSA, EC or OKP public key"),
    ]:  # fmt: skip
        (tmp_path / name).write_bytes(content)
        kind = {"secret_file" if name.endswith(".secret") else "jwks_file": tmp_path / name}
        with pytest.raises(ValueError, match=why):
            JwtKeys(audience=AUDIENCE, **kind)
    (tmp_path / "empty.yaml").write_text("")
    with pytest.raises(ValueError, match="it is empty"):
        TokenFile(tmp_path / "empty.yaml")


def _hmac_jwt(claims: dict[str, object], key: bytes) -> str:
    """An HS256 JWT made by hand (PyJWT itself refuses a PEM key as an HMAC secret)."""
    import base64
    import hashlib
    import hmac

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps(claims).encode())
    mac = hmac.new(key, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(mac)}"


@pytest.fixture
def web() -> Iterator[tuple[int, list[str]]]:
    """A local HTTP server: /ok, /go?to=URL (a redirect), /big (200 kB), /trickle (a byte
    every 0.1 s); its port, and the paths it was asked for."""
    asked: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            asked.append(self.path)
            path, _, query = self.path.partition("?")
            if path == "/go":
                self.send_response(302)
                self.send_header("Location", query.removeprefix("to="))
                self.end_headers()
                return
            body = b'{"ok": true}' if path == "/ok" else b"x" * 200_000
            self.send_response(200)
            self.send_header("Content-Length", str(50 if path == "/trickle" else len(body)))
            self.end_headers()
            if path == "/trickle":
                for _ in range(50):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.1)
                return
            self.wfile.write(body)

    server = ThreadingHTTPServer(("0.0.0.0", 0), Handler)  # loopback, and this machine's address
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1], asked
    finally:
        server.shutdown()


def _own_address() -> str:
    """This machine's address on its network (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("10.255.255.255", 1))
        address = probe.getsockname()[0]
    assert not address.startswith("127."), "the test needs a network address besides loopback"
    return address


async def _http_node(policy: HttpPolicy, url: str, seconds: float = 10.0) -> object:
    runner = NodeRunner(set(), http_policy=policy)
    node = NodeSpec("h", "http", config={"url": url, "timeout_seconds": seconds})
    try:
        return await runner.run(NodeCall("t", "r"), node, {})
    finally:
        await runner.close()


async def test_http_nodes_reach_only_what_the_operator_allows(web) -> None:
    port, asked = web
    for url, kind in [
        (f"http://127.0.0.1:{port}/ok", "loopback"),
        (f"http://localhost:{port}/ok", "loopback"),
        (f"http://[::ffff:127.0.0.1]:{port}/ok", "loopback"),
        (f"http://0.0.0.0:{port}/ok", "unspecified"),
        ("http://169.254.169.254/latest/meta-data/", "cloud metadata"),
        ("http://[fd00:ec2::254]/latest/meta-data/", "cloud metadata"),
        ("http://169.254.10.10/", "link-local"),
    ]:
        with pytest.raises(NodeFailed, match=f"a {kind} address: http nodes may not reach it"):
            await _http_node(HttpPolicy(), url)
    assert asked == []  # refused before any connection
    trusted = HttpPolicy(allow=("127.0.0.1",))
    assert await _http_node(trusted, f"http://127.0.0.1:{port}/ok") == {
        "status": 200,
        "body": {"ok": True},
    }
    # A redirect to a place the allowlist does not cover, or to loopback under another name.
    prefix = HttpPolicy(allow=(f"http://127.0.0.1:{port}/go",))
    away = f"http://127.0.0.1:{port}/go?to=http://127.0.0.1:{port}/ok"
    with pytest.raises(NodeFailed, match="is not in the engine's --http-allow"):
        await _http_node(prefix, away)
    # With no allowlist, this machine's own address is any host's: its redirect to loopback is
    # refused when the connection would be made.
    own = _own_address()
    assert await _http_node(HttpPolicy(), f"http://{own}:{port}/ok") == {
        "status": 200,
        "body": {"ok": True},
    }
    to_loopback = f"http://{own}:{port}/go?to=http://localhost:{port}/ok"
    with pytest.raises(NodeFailed, match=r"localhost is \S+, a loopback address"):
        await _http_node(HttpPolicy(), to_loopback)
    # The refused hops were never asked for (only the allowed /ok and the two redirects).
    hops = [away.split(str(port), 1)[1], to_loopback.split(str(port), 1)[1]]
    assert asked == ["/ok", hops[0], "/ok", hops[1]]
    # Bounded in size and, however slowly the bytes come, in time.
    small = HttpPolicy(allow=("127.0.0.1",), max_bytes=100_000)
    with pytest.raises(NodeFailed, match="over 100000 bytes"):
        await _http_node(small, f"http://127.0.0.1:{port}/big")
    started = time.monotonic()
    with pytest.raises(NodeFailed, match=r"no whole answer within 0\.5s"):
        await _http_node(trusted, f"http://127.0.0.1:{port}/trickle", seconds=0.5)
    assert time.monotonic() - started < 3


@pytest.mark.parametrize(
    ("expression", "why"),
    [
        ("9**4000000 > 0", "digits"),
        ("2 ** 100000", "digits"),
        ("1 << 100000", "bits"),
        ("'ab' * 60000", "is longer than"),
        ("[0] * 200000", "is longer than"),
    ],
)
def test_expression_bombs_are_refused_at_registration(expression, why) -> None:
    assert why in (expressions.check(expression) or ""), expressions.check(expression)


@pytest.mark.parametrize(
    ("expression", "why"),
    [
        ("input['n'] ** input['n']", "digits"),
        ("input['n'] ** 3000 * input['n'] ** 3000", "bits"),
        ("','.join([input['s'] * 1000] * 1000)", "is longer than"),
        ("input['s'].ljust(10 ** 8)", "is longer than"),
        ("input['s'].replace('a', input['s'] * 999)", "is longer than"),
        ("[x * y for x in input['xs'] for y in input['xs']] and 1", "too many elements"),
        ("[sum(sorted(input['xs'] + input['xs'])) for _ in input['xs']]", "s of CPU"),
    ],
)
def test_expression_bombs_fail_within_bounded_time(expression, why) -> None:
    state = {"input": {"n": 100_000, "s": "a" * 100, "xs": list(range(10_000))}}
    started = time.monotonic()
    with pytest.raises(expressions.ExpressionError, match=why):
        expressions.evaluate(expression, state)
    assert time.monotonic() - started < 10  # a second of CPU, on however busy a machine


async def test_a_long_transform_does_not_hold_the_event_loop() -> None:
    """A transform runs off the event loop: timers there keep firing while it works."""
    runner = NodeRunner(set())
    node = NodeSpec(
        "t",
        "transform",
        config={"expression": "len([sum(sorted(input['xs'])) for _ in input['xs'][:1000]])"},
    )
    state = {"input": {"xs": list(range(10_000, 0, -1))}}
    ticks: list[float] = []

    async def tick() -> None:
        while True:
            ticks.append(time.monotonic())
            await asyncio.sleep(0.005)

    ticker = asyncio.create_task(tick())
    try:
        assert await runner.run(NodeCall("t", "r"), node, state) == 1000
    finally:
        ticker.cancel()
    gaps = [b - a for a, b in itertools.pairwise(ticks)]
    assert len(ticks) > 5 and max(gaps) < 0.2, (len(ticks), max(gaps, default=None))


# ---- TLS and mTLS --------------------------------------------------------------------------


class CertificateAuthority:
    """A CA of the test's own, and the certificates it signs (PEM files in `where`)."""

    def __init__(self, where: Path, name: str) -> None:
        self.where, self.name = where, name
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} CA")])
        self.cert = (
            self._builder(subject, self.key.public_key(), subject)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.ca_file = where / f"{name}-ca.pem"
        self.ca_file.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def _builder(self, subject, public_key, issuer) -> x509.CertificateBuilder:
        now = datetime.datetime.now(datetime.UTC)
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
        )

    def issue(self, label: str, names: list[x509.GeneralName]) -> tuple[Path, Path]:
        """(certificate file, key file) for `names`."""
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, label)])
        cert = (
            self._builder(subject, key.public_key(), self.cert.subject)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        cert_file, key_file = self.where / f"{label}.pem", self.where / f"{label}.key"
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_file.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return cert_file, key_file


LOCAL_NAMES = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]


def _uri(name: str) -> list[x509.GeneralName]:
    return [x509.UniformResourceIdentifier(name)]


def _certificate_identities(where: Path) -> None:
    """The token file, with client certificates' names mapped to identities."""
    write_tokens(where / "tokens.yaml")
    tokens = json.loads((where / "tokens.yaml").read_text())
    tokens["certificates"] = [
        {"san": "spiffe://test/engine", "subject": "engine", "tenant": "*", "roles": ["system"]},
        {
            "san": "spiffe://test/reader",
            "subject": "mesh-reader",
            "tenant": "a",
            "roles": ["reader"],
        },
    ]
    (where / "tokens.yaml").write_text(json.dumps(tokens))


async def _code_of(call: object) -> grpc.StatusCode:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


@BOTH
async def test_mtls_admits_only_certificates_of_its_ca_and_maps_their_names(
    service_factory, engine_factory, backend, credentials
) -> None:
    ca, other = (
        CertificateAuthority(credentials, "ours"),
        CertificateAuthority(credentials, "theirs"),
    )
    server_cert, server_key = ca.issue("store", LOCAL_NAMES)
    engine_server = ca.issue("engine-server", LOCAL_NAMES)
    engine_client = ca.issue("engine-client", _uri("spiffe://test/engine"))
    reader = ca.issue("reader", _uri("spiffe://test/reader"))
    stranger = ca.issue("stranger", _uri("spiffe://test/stranger"))
    foreign = other.issue("foreign", _uri("spiffe://test/reader"))
    _certificate_identities(credentials)
    tls = ("--tls-cert-file", str(server_cert), "--tls-key-file", str(server_key))
    store = service_factory(
        backend, *auth_args(credentials), *tls, "--tls-client-ca-file", str(ca.ca_file),
        in_process=True, probe_credentials=channel_credentials(ca.ca_file, *reader),
    )  # fmt: skip
    get = cpb.GetThreadRequest(namespace="lg:", thread_id="nothing")
    save = cpb.SaveRequest(checkpoint=cpb.Checkpoint(namespace="lg:", thread_id="t"))

    def channel(cert: tuple[Path, Path] | None, roots: Path | None = ca.ca_file):
        creds = channel_credentials(roots, *(cert or (None, None)))
        return grpc.aio.secure_channel(store.address, creds)

    async with grpc.aio.insecure_channel(store.address) as plain:
        stub = cpb_grpc.CheckpointServiceStub(plain)
        assert await _code_of(stub.GetThread(get, timeout=5)) == grpc.StatusCode.UNAVAILABLE
    for refused in (None, foreign):  # no client certificate, or one of another CA
        async with channel(refused) as c:
            code = await _code_of(cpb_grpc.CheckpointServiceStub(c).GetThread(get, timeout=5))
            assert code == grpc.StatusCode.UNAVAILABLE, refused
    async with channel(reader) as c:
        stub = cpb_grpc.CheckpointServiceStub(c)
        assert await _code_of(stub.GetThread(get)) == grpc.StatusCode.NOT_FOUND  # admitted
        assert await _code_of(stub.Save(save)) == grpc.StatusCode.PERMISSION_DENIED  # a reader
    async with channel(stranger) as c:
        stub = cpb_grpc.CheckpointServiceStub(c)
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await stub.GetThread(get)
        assert unknown.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "no name of the client certificate is in the token file" in unknown.value.details()
        assert await _code_of(stub.Save(save, metadata=md("writer-token"))) == grpc.StatusCode.OK

    # The container probe, over mTLS as the service wants it.
    probe = [sys.executable, "-m", "workflow_rpc.probe", store.address, "--ca", str(ca.ca_file)]
    keys = ["--cert", str(reader[0]), "--key", str(reader[1])]
    answered = await asyncio.to_thread(
        subprocess.run, [*probe, *keys], capture_output=True, text=True, timeout=30
    )
    assert answered.returncode == 0, answered.stderr
    refused = await asyncio.to_thread(
        subprocess.run, probe, capture_output=True, text=True, timeout=30
    )
    assert refused.returncode == 1 and "UNAVAILABLE" in refused.stderr
    # The engine reaches the store with its own certificate (its identity: the system role),
    # and serves TLS itself; wf speaks TLS to it.
    engine = engine_factory(
        store, *auth_args(credentials),
        "--tls-cert-file", str(engine_server[0]), "--tls-key-file", str(engine_server[1]),
        "--checkpoint-ca-file", str(ca.ca_file),
        "--checkpoint-cert-file", str(engine_client[0]),
        "--checkpoint-key-file", str(engine_client[1]),
        probe_credentials=channel_credentials(ca.ca_file),
    )  # fmt: skip
    path = credentials / "wf.json"
    path.write_text(json.dumps({"workflow_id": "tls", "nodes": [{"id": "a", "type": "noop"}]}))
    ca_flag = ("--ca", str(ca.ca_file))
    assert _ran(engine.address, "writer-token", *ca_flag, "register", str(path)).returncode == 0
    done = _ran(engine.address, "writer-token", *ca_flag, "start", "tls", "--watch")
    assert done.returncode == 0 and "COMPLETED" in done.stdout, done
    plain = _ran(engine.address, "writer-token", "runs")
    assert plain.returncode == 6, plain  # a plaintext client cannot reach a TLS engine


@SQLITE
async def test_a_rotated_server_certificate_is_served_without_a_restart(
    service_factory, backend, credentials
) -> None:
    old_ca, new_ca = (
        CertificateAuthority(credentials, "old"),
        CertificateAuthority(credentials, "new"),
    )
    cert, key = old_ca.issue("store", LOCAL_NAMES)
    store = service_factory(
        backend, *auth_args(credentials), "--tls-cert-file", str(cert), "--tls-key-file", str(key),
        in_process=True, probe_credentials=channel_credentials(old_ca.ca_file),
    )  # fmt: skip
    request = cpb.ListThreadsRequest()

    async def code_trusting(ca: CertificateAuthority) -> grpc.StatusCode:
        creds = channel_credentials(ca.ca_file)
        async with grpc.aio.secure_channel(store.address, creds) as c:
            call = cpb_grpc.CheckpointServiceStub(c).ListThreads(
                request, metadata=md("reader-token"), timeout=5
            )
            return await _code_of(call)

    assert await code_trusting(old_ca) == grpc.StatusCode.OK
    assert await code_trusting(new_ca) == grpc.StatusCode.UNAVAILABLE
    rotated_cert, rotated_key = new_ca.issue("store-rotated", LOCAL_NAMES)
    # Half written (the new certificate, the old key): not taken, the old pair stays served.
    cert.write_bytes(rotated_cert.read_bytes())
    await asyncio.sleep(1.2)
    assert await code_trusting(old_ca) == grpc.StatusCode.OK
    key.write_bytes(rotated_key.read_bytes())
    deadline = time.monotonic() + 15
    while await code_trusting(new_ca) != grpc.StatusCode.OK:
        assert time.monotonic() < deadline, "the rotated certificate was never served"
        await asyncio.sleep(0.2)
    assert await code_trusting(old_ca) == grpc.StatusCode.UNAVAILABLE


# ---- the audit log -------------------------------------------------------------------------


@BOTH
async def test_every_control_action_is_in_the_audit_log_with_who_made_it(
    service_factory, engine_factory, backend, credentials, tmp_path
) -> None:
    store, engine = _store_and_engine(service_factory, engine_factory, backend, credentials)
    e = engine.address

    def wf(token: str, *args: str) -> str:
        done = _ran(e, token, *args)
        assert done.returncode == 0, (args, done.stderr)
        return done.stdout

    def register(version: str) -> None:
        nodes = [
            {"id": "ask", "type": "approval", "config": {"prompt": f"go {version}?"}},
            {"id": "nap", "type": "sleep", "depends_on": ["ask"], "config": {"seconds": 1.5}},
            {"id": "end", "type": "noop", "depends_on": ["nap"]},  # a pause stops before it
        ]
        path = tmp_path / f"{version}.json"
        path.write_text(json.dumps({"workflow_id": "audited", "nodes": nodes}))
        wf("writer-token", "register", str(path))

    register("v1")
    run = wf("writer-token", "start", "audited").split()[0]
    async with grpc.aio.insecure_channel(e) as channel:
        s = pb_grpc.EngineServiceStub(channel)
        await wait_status(s, md("reader-token"), run, pb.RUN_STATUS_WAITING)
        wf("writer-token", "resume", run, "--value", '{"ok": true}')
        await wait_status(s, md("reader-token"), run, pb.RUN_STATUS_RUNNING)
        wf("writer-token", "pause", run)
        await wait_status(s, md("reader-token"), run, pb.RUN_STATUS_PAUSED, timeout=60)
        wf("admin-token", "cancel", run, "--reason", "enough")
        first = json.loads(wf("reader-token", "--json", "checkpoints", run))[-1]["checkpoint_id"]
        fork = wf("writer-token", "fork", run, first).split()[0]
        wf("writer-token", "cancel", fork)
    register("v2")
    wf("writer-token", "rollback", "audited", "1", "--reason", "v2 asks too much", "--by", "ops")
    async with grpc.aio.insecure_channel(store.address) as channel:
        c = cpb_grpc.CheckpointServiceStub(channel)
        save = cpb.SaveRequest(checkpoint=cpb.Checkpoint(namespace="lg:", thread_id="t"))
        await c.Save(save, metadata=md("writer-token"))
        await c.PruneThreads(
            cpb.PruneThreadsRequest(
                thread_ids=["t"], strategy=cpb.PRUNE_STRATEGY_KEEP_LATEST, namespace_prefix="lg:"
            ),
            metadata=md("admin-token"),
        )
        await c.DeleteThread(
            cpb.DeleteThreadRequest(namespace="lg:", thread_id="t"), metadata=md("admin-token")
        )
        # Nobody writes the log but the services: not a tenant's writer, nor its admin.
        forged = cpb.PublishRequest(
            namespace="audit", thread_id="actions", events=[cpb.NewEvent(type="audit.pause")]
        )
        for token in ("writer-token", "admin-token"):
            with pytest.raises(grpc.aio.AioRpcError) as denied:
                await c.Publish(forged, metadata=md(token))
            assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED

    refused = _ran(e, "reader-token", "audit")
    assert refused.returncode == 8 and "ListAuditEntries needs the admin role" in refused.stderr
    entries = json.loads(wf("admin-token", "--json", "audit"))
    seen = [(x["action"], x["subject"], x["target"]) for x in entries]
    assert seen == [
        ("resume", "writer-a", run),
        ("pause", "writer-a", run),
        ("cancel", "admin-a", run),
        ("fork", "writer-a", run),
        ("cancel", "writer-a", fork),
        ("rollback", "writer-a", "audited"),
        ("prune", "admin-a", "t"),
        ("delete", "admin-a", "t"),
    ], seen
    by_action = {x["action"]: x for x in entries}
    assert by_action["resume"]["details"] == {"value": {"ok": True}}
    assert entries[2]["details"] == {"reason": "enough"}
    assert by_action["fork"]["details"]["new_run_id"] == fork
    assert by_action["fork"]["details"]["checkpoint_id"] == first
    assert by_action["rollback"]["details"]["reason"] == "v2 asks too much"
    assert by_action["prune"]["details"]["strategy"] == "PRUNE_STRATEGY_KEEP_LATEST"
    assert [x["seq"] for x in entries] == list(range(1, len(entries) + 1))
    # Paged by seq; another tenant's admin sees none of it.
    assert [x["seq"] for x in json.loads(wf("admin-token", "--json", "audit", "--after", "6"))] == [
        7,
        8,
    ]
    assert len(json.loads(wf("admin-token", "--json", "audit", "--limit", "3"))) == 3
    assert json.loads(wf("operator-token", "--tenant", "b", "--json", "audit")) == []


@pytest.mark.parametrize(
    "expression",
    [
        "'%0200000d' % 1",
        "'%0*d' % (200000, 1)",
        "f'{1:>200000}'",
        "'\\t'.expandtabs(tabsize=200000)",
        "(1).to_bytes(200000, 'big')",
        "'a'.translate({97: 'b'})",
        "input.clear() or true",  # the run's own state is read, never changed
        "round(5, -10 ** 6)",
        "sum([[0] * 1000] * 1000, [])",
        "str(['a' * 99999] * 99999)",
        "['a' * 99999] * 99999",
        "1+" * 400 + "1",
    ],
)
def test_expressions_cannot_build_or_burn_past_their_bounds(expression) -> None:
    state = {"input": {"n": 1}}
    started = time.monotonic()
    with pytest.raises(expressions.ExpressionError):
        expressions.evaluate(expression, state)
    assert time.monotonic() - started < 5
    assert state == {"input": {"n": 1}}


def test_many_references_to_one_value_cost_no_walk_of_them_all() -> None:
    """simpleeval itself walks every container a step makes, at every step (10**10 visits for
    a 10**5 list of one 10**5 list): the bounded evaluator looks at the value only."""
    started = time.monotonic()
    assert expressions.evaluate("len([list('a' * 1000)] * 1000)", {}) == 1000
    assert expressions.check("[[0] * 2000] * 2000 == 0") is None
    assert time.monotonic() - started < 0.5


def test_expressions_nested_too_deep_are_refused_at_registration() -> None:
    assert "nests deeper" in (expressions.check("1+" * 3000 + "1") or "")
    assert "nests deeper" in (expressions.check("[" * 150 + "]" * 150) or "")


@BOTH
async def test_the_audit_log_is_an_admins_to_read_on_the_store_too(
    service_factory, backend, credentials
) -> None:
    store = service_factory(backend, *auth_args(credentials), in_process=True)
    async with grpc.aio.insecure_channel(store.address) as channel:
        c = cpb_grpc.CheckpointServiceStub(channel)
        await c.Save(
            cpb.SaveRequest(checkpoint=cpb.Checkpoint(namespace="lg:", thread_id="t")),
            metadata=md("writer-token"),
        )
        await c.DeleteThread(
            cpb.DeleteThreadRequest(namespace="lg:", thread_id="t"), metadata=md("admin-token")
        )
        for call in (
            c.GetThread(
                cpb.GetThreadRequest(namespace="audit", thread_id="actions"),
                metadata=md("reader-token"),
            ),
            c.List(
                cpb.ListRequest(namespace="audit", thread_id="actions"), metadata=md("writer-token")
            ),
        ):
            assert await _code_of(call) == grpc.StatusCode.PERMISSION_DENIED
        request = cpb.StreamRequest(until_now=True)  # the whole tenant's feed

        async def feed(token: str) -> list[cpb.Event]:
            return [
                i.event async for i in c.Stream(request, metadata=md(token)) if i.HasField("event")
            ]

        as_reader, as_admin = await feed("reader-token"), await feed("admin-token")
        assert [e.feed_seq for e in as_reader] == [e.feed_seq for e in as_admin]  # still dense
        hidden = [e for e in as_reader if e.namespace == "audit"]
        assert [e.type for e in hidden] == ["audit.hidden"] and not hidden[0].payload.fields
        shown = [e for e in as_admin if e.namespace == "audit"]
        assert shown[0].type == "audit.delete" and shown[0].payload["subject"] == "admin-a"
