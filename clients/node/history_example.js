#!/usr/bin/env node
'use strict';
/**
 * Approvals, history, forks and versions with the Node.js client:
 * register a workflow with an approval, start a run, watch it until it WAITS, answer it while
 * a `follow` watch goes on to COMPLETED, list the run's checkpoints, fork it from its first one
 * with a state patch, then register a second version, list the versions and roll back to v1.
 *
 *   node clients/node/history_example.js --engine 127.0.0.1:50052 [--tenant T] [--workflow ID]
 *
 * One line per step: `label: JSON` (Dates as ISO strings). Exit status: 0 if every step went as
 * described, 1 if one did not (the reason goes to stderr), 2 on bad usage, 3 if the engine could
 * not be reached or refused a call.
 */

const assert = require('node:assert/strict');
const crypto = require('node:crypto');
const { EngineClient, credentialsFromEnv, formatError, statusName } = require('./client');

const USAGE =
  'usage: node clients/node/history_example.js --engine HOST:PORT [--tenant T] [--workflow ID]';

const PROMPT = 'Ship these orders?';
const INPUT = { qty: 3, price: 2.5 };
// The fork starts from the run's first checkpoint: a new quantity, and the approval answered.
const PATCH = { input: { qty: 10 }, approve: 'auto' };

function workflow(workflowId, shipExpression) {
  return {
    workflowId,
    description: 'Approvals, history, forks and versions from the Node.js client',
    nodes: [
      { id: 'total', type: 'transform', config: { expression: "input['qty'] * input['price']" } },
      { id: 'approve', type: 'approval', dependsOn: ['total'], config: { prompt: PROMPT } },
      {
        id: 'ship',
        type: 'transform',
        dependsOn: ['total', 'approve'],
        config: { expression: shipExpression },
      },
    ],
  };
}

const V1 = "{'total': total, 'approved': approve}";
const V2 = "{'total': total, 'approved': approve, 'v': 2}";

function parseArgs(argv) {
  const args = { engine: '', tenant: '', workflow: 'node-history-example' };
  for (let i = 0; i < argv.length; i++) {
    const [flag, inline] = argv[i].split(/=(.*)/s, 2);
    const value = () => (inline !== undefined ? inline : argv[++i]);
    if (flag === '--engine') args.engine = value();
    else if (flag === '--tenant') args.tenant = value();
    else if (flag === '--workflow') args.workflow = value();
    else throw new Error(`unknown argument ${argv[i]}`);
  }
  if (!args.engine) throw new Error('--engine is required');
  return args;
}

const print = (label, value) => console.log(`${label}: ${JSON.stringify(value)}`);

/** Watch a run; resolves to what it ended with and how many events it delivered. */
async function watch(client, runId, options = {}, onEvent = () => {}) {
  let events = 0;
  const last = await client.watchRun(
    runId,
    0,
    (ev) => {
      events += 1;
      onEvent(ev);
    },
    options,
  );
  const { type, seq, terminal } = last;
  return { status: statusName(last.status), type, seq, terminal, events };
}

function checkVersions(listed) {
  for (const v of listed.versions) {
    assert.equal(typeof v.version, 'number');
    assert.ok(v.createdAt instanceof Date);
  }
  for (const change of listed.history) assert.ok(change.time instanceof Date);
  return listed;
}

async function main() {
  let args;
  try {
    args = parseArgs(process.argv.slice(2));
  } catch (err) {
    console.error(`${err.message}\n${USAGE}`);
    return 2;
  }
  const client = new EngineClient(args.engine, { tenant: args.tenant, ...credentialsFromEnv() });
  try {
    print('registered', await client.registerWorkflow(workflow(args.workflow, V1)));
    const requestId = crypto.randomUUID();
    const run = await client.startRun(args.workflow, { input: INPUT, requestId });
    const runId = run.runId;
    print('started', { runId, status: statusName(run.status), version: run.version });

    // 1. watchRun returns once the run waits for its approval.
    const waited = await watch(client, runId);
    const waiting = await client.getRun(runId);
    const runStatus = statusName(waiting.status);
    print('waiting', { ...waited, runStatus, waitingFor: waiting.waitingFor });

    // 2. With follow, the watch goes past WAITING (replayed, then answered) to the end.
    let resumed = null;
    const followed = await watch(client, runId, { follow: true }, (ev) => {
      if (!resumed && ev.type === 'run.status' && statusName(ev.status) === 'WAITING') {
        resumed = client.resumeRun(runId, { value: 'yes' });
      }
    });
    print('resumed', { status: statusName((await resumed).status) });
    print('followed', followed);

    // 3. A replayed WAITING that the run has left does not stop a watch.
    print('replayed', await watch(client, runId));
    const final = await client.getRun(runId);
    print('final', { status: statusName(final.status), state: final.state });

    // 4. The run's checkpoints, newest first; and the same in pages of two.
    const history = await client.getRunHistory(runId, { includeState: true });
    for (const cp of history.checkpoints) {
      assert.ok(cp.createdAt instanceof Date);
      assert.equal(typeof cp.step, 'number');
      assert.ok(cp.state !== null && typeof cp.state === 'object');
    }
    print('history', {
      nextPageToken: history.nextPageToken,
      checkpoints: history.checkpoints.map((cp) => ({ ...cp, status: statusName(cp.status) })),
    });
    const first = await client.getRunHistory(runId, { pageSize: 2 });
    const pageToken = first.nextPageToken;
    const second = await client.getRunHistory(runId, { pageSize: 2, pageToken });
    assert.equal(first.checkpoints[0].state, null, 'no state without includeState');
    print('paged', {
      first: first.checkpoints.map((cp) => cp.checkpointId),
      second: second.checkpoints.map((cp) => cp.checkpointId),
      more: first.nextPageToken !== '',
    });

    // 5. Fork from the run's first checkpoint with a patch, and watch the fork to its end.
    const from = history.checkpoints[history.checkpoints.length - 1];
    const newRunId = crypto.randomUUID();
    const fork = await client.forkRun(runId, from.checkpointId, { statePatch: PATCH, newRunId });
    const { workflowId, version } = fork;
    print('forked', { runId: fork.runId, from: from.checkpointId, workflowId, version });
    print('fork watched', await watch(client, fork.runId));
    const forkFinal = await client.getRun(fork.runId);
    print('fork final', { status: statusName(forkFinal.status), state: forkFinal.state });

    // 6. A second version, the versions, a rollback to v1, the versions again.
    print('registered', await client.registerWorkflow(workflow(args.workflow, V2)));
    print('versions', checkVersions(await client.listWorkflowVersions(args.workflow)));
    const rollback = await client.rollbackWorkflow(args.workflow, 1, {
      reason: 'v2 ships too much',
      requestedBy: 'history_example.js',
    });
    print('rollback', rollback);
    print('versions', checkVersions(await client.listWorkflowVersions(args.workflow)));
    return 0;
  } catch (err) {
    if (err instanceof assert.AssertionError) {
      console.error(`check failed: ${err.message}`);
      return 1;
    }
    console.error(`error: ${formatError(err)}`);
    return 3;
  } finally {
    client.close();
  }
}

main().then(
  (code) => {
    process.exitCode = code;
  },
  (err) => {
    console.error(err);
    process.exitCode = 3;
  },
);
