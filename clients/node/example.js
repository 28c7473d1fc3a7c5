#!/usr/bin/env node
'use strict';
/**
 * Register a small workflow, start a run, and print its progress from WatchRun.
 *
 *   node clients/node/example.js --engine 127.0.0.1:50052 [--tenant T]
 *
 * Exit status: 0 if the run COMPLETED, 1 if it ended otherwise, 2 on bad usage, 3 if the
 * engine could not be reached or refused a call.
 */

const crypto = require('node:crypto');
const grpc = require('@grpc/grpc-js');
const { EngineClient, credentialsFromEnv, formatError, statusName } = require('./client');

const USAGE = 'usage: node clients/node/example.js --engine HOST:PORT [--tenant TENANT]';

// fetch -> (validate_qty, validate_price) in parallel -> summarise -> publish
const WORKFLOW = {
  workflowId: 'node-client-example',
  description: 'Sample workflow of the Node.js client example',
  nodes: [
    { id: 'fetch', type: 'sleep', config: { seconds: 0.2 } },
    {
      id: 'validate_qty',
      type: 'transform',
      dependsOn: ['fetch'],
      config: { expression: "all([o['qty'] > 0 for o in input['orders']])" },
    },
    {
      id: 'validate_price',
      type: 'transform',
      dependsOn: ['fetch'],
      config: { expression: "all([o['price'] >= 0 for o in input['orders']])" },
    },
    {
      id: 'summarise',
      type: 'transform',
      dependsOn: ['validate_qty', 'validate_price'],
      config: {
        expression:
          "{'orders': len(input['orders']), " +
          "'items': sum([o['qty'] for o in input['orders']]), " +
          "'total': sum([o['qty'] * o['price'] for o in input['orders']]), " +
          "'valid': validate_qty and validate_price}",
      },
    },
    { id: 'publish', type: 'noop', dependsOn: ['summarise'] },
  ],
};

const INPUT = {
  customer: 'acme',
  orders: [
    { id: 'A-1', qty: 2, price: 9.5 },
    { id: 'B-2', qty: 1, price: 20 },
    { id: 'C-3', qty: 3, price: 1.25 },
  ],
};

function parseArgs(argv) {
  const args = { engine: '', tenant: '' };
  for (let i = 0; i < argv.length; i++) {
    const [flag, inline] = argv[i].split(/=(.*)/s, 2);
    const value = () => (inline !== undefined ? inline : argv[++i]);
    if (flag === '--engine') args.engine = value();
    else if (flag === '--tenant') args.tenant = value();
    else if (flag === '-h' || flag === '--help') {
      console.log(USAGE);
      process.exit(0);
    } else throw new Error(`unknown argument ${argv[i]}`);
  }
  if (!args.engine) throw new Error('--engine is required');
  return args;
}

function progressLine(ev, runTotal) {
  const pct = `${ev.progressPercent.toFixed(1).padStart(5)}%`;
  // node.* events carry no run status (UNSPECIFIED); checkpoint.saved events no total.
  const what = ev.nodeId || statusName(ev.status);
  const total = ev.totalNodes || runTotal;
  const eta = ev.etaSeconds > 0 ? `${ev.etaSeconds.toFixed(1)}s` : '-';
  let line = `[${pct}] ${ev.completedNodes}/${total} ${ev.type} ${what} eta ${eta}`;
  if (ev.type === 'node.completed') {
    line += ` (${ev.duration !== null ? ev.duration.toFixed(3) : '?'}s)`;
    if (ev.output !== undefined) line += ` -> ${JSON.stringify(ev.output)}`;
  }
  if (ev.error) line += ` error: ${ev.error}`;
  return line;
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
  let run;
  try {
    const registered = await client.registerWorkflow(WORKFLOW);
    console.log(
      `workflow ${registered.workflowId} v${registered.version}` +
        (registered.created ? ' registered' : ' (unchanged)'),
    );
    run = await client.startRun(WORKFLOW.workflowId, {
      input: INPUT,
      requestId: crypto.randomUUID(),
    });
    console.log(`run ${run.runId} started: ${statusName(run.status)}, ${run.totalNodes} nodes`);

    await client.watchRun(run.runId, 0, (ev) => console.log(progressLine(ev, run.totalNodes)));

    const final = await client.getRun(run.runId);
    const status = statusName(final.status);
    console.log(`final status: ${status}${final.error ? ` (${final.error})` : ''}`);
    console.log(`final state: ${JSON.stringify(final.state)}`);
    return status === 'COMPLETED' ? 0 : 1;
  } catch (err) {
    if (err && err.code === grpc.status.UNAVAILABLE && !run) {
      console.error(`error: cannot reach the engine at ${args.engine}: ${formatError(err)}`);
    } else {
      console.error(`error: ${formatError(err)}`);
    }
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
