"""The web console in a real browser (docs/console.md): Debian's Chromium driven by
Playwright, against a real store, engine and console; engines and consoles killed and started
again while a page is open. Screenshots land in ARTIFACTS (the run's summary names it)."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest
import pytest_asyncio
from playwright.async_api import Browser, Page, async_playwright

from tests.servers import REPO_ROOT
from tests.test_security import ROLE_TOKENS, auth_args, write_tokens
from workflow_client.aio import AsyncEngineClient

SQLITE = pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
ARTIFACTS = REPO_ROOT / "data" / "test-artifacts" / "console"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
XSS = "<script>window.pwned = 1</script><img src=x onerror='window.pwned = 2'>"


@pytest_asyncio.fixture(scope="session")
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--no-proxy-server"]
        )
        yield launched
        await launched.close()


@pytest_asyncio.fixture
async def page(browser: Browser) -> AsyncIterator[Page]:
    # The page's CSP would refuse the tests' own probes (evaluated strings); without it, a
    # value drawn as markup would run its script, so the text-only checks below see it.
    context = await browser.new_context(viewport={"width": 1280, "height": 1000}, bypass_csp=True)
    opened = await context.new_page()
    problems: list[str] = []
    opened.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    opened.on("dialog", lambda dialog: problems.append(f"dialog: {dialog.message}"))
    yield opened
    await context.close()
    assert not problems, problems


async def shot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


async def states(page: Page) -> dict[str, str]:
    return await page.eval_on_selector_all(
        "#dag g.node",
        "nodes => Object.fromEntries(nodes.map(n => [n.dataset.nodeId, n.dataset.state]))",
    )


async def shown_seqs(page: Page) -> list[int]:
    return await page.eval_on_selector_all("#events li", "items => items.map(i => +i.dataset.seq)")


async def feed_of(engine: AsyncEngineClient, run_id: str) -> list[int]:
    return [event.seq async for event in engine.watch(run_id)]


async def until(page: Page, script: str, seconds: float = 30.0) -> None:
    await page.wait_for_function(script, timeout=seconds * 1000)


def stack(service_factory, engine_factory, console_factory, backend, *engine_args):
    store = service_factory(backend, in_process=True)
    engine = engine_factory(store, *engine_args)
    return store, engine, console_factory(engine)


@SQLITE
async def test_a_run_page_colours_nodes_and_advances_the_bar_showing_outputs_as_text(
    service_factory, engine_factory, console_factory, backend, page
) -> None:
    _, engine, console = stack(service_factory, engine_factory, console_factory, backend)
    client = AsyncEngineClient(engine.address)
    nodes = [
        {"id": "fetch", "type": "sleep", "config": {"seconds": 0.6}},
        {"id": "left", "type": "sleep", "depends_on": ["fetch"], "config": {"seconds": 0.6}},
        {"id": "right", "type": "transform", "depends_on": ["fetch"],
         "config": {"expression": json.dumps(XSS)}},
        {"id": "join", "type": "sleep", "depends_on": ["left", "right"],
         "config": {"seconds": 0.6}},
        {"id": "never", "type": "noop", "depends_on": ["join"], "when": "false"},
    ]  # fmt: skip
    await client.register({"workflow_id": "pipeline", "nodes": nodes})
    run = await client.start_run("pipeline")
    await page.goto(f"{console.url}/runs/{run.run_id}")
    await page.wait_for_selector("#dag g.node")

    # The page as the run goes: node states and the bar's percent, sampled until the end.
    seen: dict[str, list[str]] = {}
    percents: list[int] = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for node, state in (await states(page)).items():
            if not seen.get(node) or seen[node][-1] != state:
                seen.setdefault(node, []).append(state)
        # The status first: a percent read after COMPLETED was seen is the final one.
        status = await page.get_attribute("#run-status", "data-status")
        percents.append(int(await page.get_attribute("#progress", "data-percent")))
        if len(percents) == 3:
            await shot(page, "run-in-progress")
        if status == "COMPLETED":
            break
        await asyncio.sleep(0.05)
    await shot(page, "run-completed")
    assert await page.get_attribute("#run-status", "data-status") == "COMPLETED"
    assert percents == sorted(percents) and percents[-1] == 100 and percents[0] < 100
    for node in ("fetch", "left", "join"):
        assert seen[node][-1] == "completed" and "running" in seen[node], seen
    assert seen["never"][-1] == "skipped"
    assert await page.locator("#dag g.node.completed").count() == 4
    # Every event of the feed once, in order.
    assert await shown_seqs(page) == await feed_of(client, run.run_id)

    # A node's output holding markup is shown as the text it is: no element, no script run.
    await page.click("#dag g.node[data-node-id=right]")
    assert await page.text_content("#node-output") == json.dumps(XSS)
    assert await page.locator("#node-output *").count() == 0
    assert await page.evaluate("window.pwned") is None
    await client.close()


@SQLITE
async def test_the_page_goes_on_across_an_engine_killed_and_a_console_restarted(
    service_factory, engine_factory, console_factory, backend, page
) -> None:
    _, engine, console = stack(service_factory, engine_factory, console_factory, backend)
    client = AsyncEngineClient(engine.address)
    nodes = [{"id": "n0", "type": "sleep", "config": {"seconds": 0.5}}]
    nodes += [
        {"id": f"n{i}", "type": "sleep", "depends_on": [f"n{i - 1}"], "config": {"seconds": 0.5}}
        for i in range(1, 8)
    ]
    await client.register({"workflow_id": "long", "nodes": nodes})
    run = await client.start_run("long")
    await page.goto(f"{console.url}/runs/{run.run_id}")
    await until(page, "document.querySelector('#dag g.node[data-node-id=n1].completed')")

    engine.kill()  # mid-run, the page open
    engine.start()
    await until(page, "document.querySelector('#dag g.node[data-node-id=n4].completed')")
    console.kill()  # and the console: the page's EventSource comes back with Last-Event-ID
    console.start()
    await until(page, "document.querySelector('#run-status')?.dataset.status === 'COMPLETED'", 60)
    await shot(page, "run-after-restarts")
    feed = await feed_of(client, run.run_id)
    assert await shown_seqs(page) == feed == list(range(1, len(feed) + 1))
    assert await page.locator("#dag g.node.completed").count() == 8

    # The WebSocket endpoint gives the same feed as JSON, from any seq.
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(f"{console.url}/ws/runs/{run.run_id}?after_seq=3") as ws:
            got = [json.loads(m.data) async for m in ws]
    assert [e["seq"] for e in got[:-1]] == feed[3:] and got[-1] == {"end": True}
    await client.close()


@SQLITE
async def test_approve_pause_resume_fork_and_cancel_from_the_page(
    service_factory, engine_factory, console_factory, backend, page
) -> None:
    _, engine, console = stack(service_factory, engine_factory, console_factory, backend)
    client = AsyncEngineClient(engine.address)
    nodes = [
        {"id": "ask", "type": "approval", "config": {"prompt": "Ship <b>it</b>?"}},
        {"id": "work", "type": "sleep", "depends_on": ["ask"], "config": {"seconds": 1.5}},
        {"id": "more", "type": "sleep", "depends_on": ["work"], "config": {"seconds": 1.5}},
        {"id": "done", "type": "transform", "depends_on": ["more"],
         "config": {"expression": "input.get('label', 'none')"}},
    ]  # fmt: skip
    await client.register({"workflow_id": "release", "nodes": nodes})
    run = await client.start_run("release")
    await page.goto(f"{console.url}/runs/{run.run_id}")
    await page.wait_for_selector("#approval:not([hidden])")
    assert await page.text_content("#approval-prompt") == "Ship <b>it</b>?"
    assert await page.get_attribute("#dag g.node[data-node-id=ask]", "data-state") == "waiting"
    await shot(page, "run-waiting")
    await page.fill("#approval-value", '{"approved": true, "by": "page"}')
    await page.click("#approve")
    await until(page, "document.querySelector('#dag g.node[data-node-id=work].running')")
    assert (await client.get_run(run.run_id)).state["ask"] == {"approved": True, "by": "page"}

    await page.click("#pause-run")
    await until(page, "document.querySelector('#run-status')?.dataset.status === 'PAUSED'")
    assert await page.is_enabled("#resume-run") and not await page.is_enabled("#pause-run")
    await page.click("#resume-run")
    await until(page, "document.querySelector('#run-status')?.dataset.status === 'RUNNING'")

    await page.click("#cancel-run")
    await until(page, "document.querySelector('#run-status')?.dataset.status === 'CANCELLED'")
    await shot(page, "run-cancelled")
    assert (await client.get_run(run.run_id)).status == 7  # RUN_STATUS_CANCELLED
    assert not await page.is_enabled("#pause-run") and not await page.is_enabled("#cancel-run")

    # A new run from the checkpoint after the approval, with a patch, from the page.
    await page.locator("#checkpoints tbody tr button.fork").first.click()
    await page.fill(".fork-patch", '{"input": {"label": "forked"}}')
    await page.click(".fork-submit")
    await page.wait_for_url(lambda url: run.run_id not in url)
    forked_id = page.url.rsplit("/", 1)[1]
    await until(page, "document.querySelector('#run-status')?.dataset.status === 'COMPLETED'")
    forked = await client.get_run(forked_id)
    assert forked.state["done"] == "forked" and forked.state["ask"]["by"] == "page"
    await client.close()


@SQLITE
async def test_a_signed_in_tenant_sees_its_own_runs_only_and_csrf_is_required(
    service_factory, engine_factory, console_factory, backend, page, tmp_path
) -> None:
    write_tokens(tmp_path / "tokens.yaml")
    (tmp_path / "jwt.secret").write_bytes(b"a-secret-of-the-test-only-32-bytes!")
    (tmp_path / "engine.token").write_text("engine-token\n")
    store = service_factory(backend, *auth_args(tmp_path), in_process=True)
    token = ("--checkpoint-token-file", str(tmp_path / "engine.token"))
    engine = engine_factory(store, *auth_args(tmp_path), *token)
    console = console_factory(engine)
    mine = AsyncEngineClient(engine.address, token=ROLE_TOKENS["writer"])  # tenant a
    theirs = AsyncEngineClient(engine.address, token="writer-b-token")  # tenant b
    definition = {"workflow_id": "wf", "nodes": [{"id": "a", "type": "noop"}]}
    await mine.register(definition)
    await theirs.register(definition)
    run_a = await mine.start_run("wf")
    run_b = await theirs.start_run("wf")

    await page.goto(f"{console.url}/runs")
    await page.wait_for_url("**/sign-in")  # no credential: the engine says who is needed
    await page.fill("#token", "not-a-token")
    await page.click("#sign-in button")
    await until(page, "document.querySelector('#sign-in .error').textContent.length > 0")
    await page.fill("#token", ROLE_TOKENS["writer"])
    await page.click("#sign-in button")
    await page.wait_for_selector(f"#runs tr[data-run-id='{run_a.run_id}']")
    assert await page.locator(f"#runs tr[data-run-id='{run_b.run_id}']").count() == 0
    assert "wf_token" not in await page.evaluate("document.cookie")  # HttpOnly
    await shot(page, "runs-signed-in")

    # Tenant b's run by URL: as if it did not exist.
    await page.goto(f"{console.url}/runs/{run_b.run_id}")
    await page.wait_for_selector("main .error")
    answer = await page.evaluate(f"fetch('/api/runs/{run_b.run_id}').then(r => r.status)")
    made_up = await page.evaluate("fetch('/api/runs/no-such-run').then(r => r.status)")
    assert answer == made_up == 404

    # A state-changing request without the CSRF header is refused, whatever its cookie.
    status = await page.evaluate(
        f"fetch('/api/runs/{run_a.run_id}/cancel', {{method: 'POST', body: '{{}}'}})"
        ".then(r => r.status)"
    )
    assert status == 403
    # A reader may look but not act: the engine's refusal, shown.
    async with aiohttp.ClientSession() as http:
        headers = {"Authorization": f"Bearer {ROLE_TOKENS['reader']}"}
        async with http.post(
            f"{console.url}/api/runs/{run_a.run_id}/pause", headers=headers, json={}
        ) as refused:
            assert refused.status == 403
            assert (await refused.json())["error"] == "PERMISSION_DENIED"
    await mine.close()
    await theirs.close()


@SQLITE
async def test_a_workflow_page_lists_versions_and_rolls_back(
    service_factory, engine_factory, console_factory, backend, page
) -> None:
    _, engine, console = stack(service_factory, engine_factory, console_factory, backend)
    client = AsyncEngineClient(engine.address)
    for expression in ("1", "2"):
        nodes = [{"id": "a", "type": "transform", "config": {"expression": expression}}]
        await client.register({"workflow_id": "versions", "nodes": nodes})
    await page.goto(f"{console.url}/workflows/versions")
    await page.wait_for_selector("#versions tr[data-version='2'][data-active='true']")
    await page.fill("#versions tr[data-version='1'] .rollback-reason", "v2 <broke> it")
    await page.click("#versions tr[data-version='1'] .rollback")
    await page.wait_for_selector("#versions tr[data-version='1'][data-active='true']")
    assert "v2 <broke> it" in await page.text_content("#version-history")
    await shot(page, "workflow-versions")
    assert (await client.versions("versions")).active_version == 1
    await client.close()


def test_the_console_refuses_a_bad_flag_in_one_line() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "workflow_console", "--runs-refresh", "0"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "--runs-refresh" in done.stderr
