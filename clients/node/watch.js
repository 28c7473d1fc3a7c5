#!/usr/bin/env node
'use strict';
/**
 * Follow any run's events until it ends, or until it waits for an answer or is paused (unless
 * --follow), reconnecting from the last seq if the engine goes away (it may be another engine
 * than the one executing the run).
 *
 *   node clients/node/watch.js --engine 127.0.0.1:50052 [--tenant T] [--after SEQ] [--follow] RUN_ID
 *
 * One line per event: `seq=N type node status completed/total percent%`, then
 * `final status: STATUS`. Exit status: 0 if the run COMPLETED, 1 if it ended otherwise,
 * 2 on bad usage, 3 on an error, 4 if it stopped at WAITING or PAUSED.
 */

const { EngineClient, credentialsFromEnv, formatError, statusName } = require('./client');

const USAGE =
  'usage: node clients/node/watch.js --engine HOST:PORT [--tenant T] [--after SEQ] [--follow] RUN_ID';

function parseArgs(argv) {
  const args = { engine: '', tenant: '', after: 0, follow: false, runId: '' };
  for (let i = 0; i < argv.length; i++) {
    const [flag, inline] = argv[i].split(/=(.*)/s, 2);
    const value = () => (inline !== undefined ? inline : argv[++i]);
    if (flag === '--engine') args.engine = value();
    else if (flag === '--tenant') args.tenant = value();
    else if (flag === '--after') args.after = Number(value());
    else if (flag === '--follow' && inline === undefined) args.follow = true;
    else if (flag.startsWith('-')) throw new Error(`unknown argument ${argv[i]}`);
    else if (!args.runId) args.runId = argv[i];
    else throw new Error(`unexpected argument ${argv[i]}`);
  }
  if (!args.engine || !args.runId) throw new Error('--engine and RUN_ID are required');
  if (!Number.isInteger(args.after) || args.after < 0) throw new Error('--after: a seq');
  return args;
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
    const onEvent = (ev) => {
      console.log(
        `seq=${ev.seq} ${ev.type} ${ev.nodeId || '-'} ${statusName(ev.status)} ` +
          `${ev.completedNodes}/${ev.totalNodes} ${ev.progressPercent.toFixed(1)}%` +
          (ev.terminal ? ' terminal' : ''),
      );
    };
    const onReconnect = (err, afterSeq) =>
      console.error(`reconnecting after seq ${afterSeq}: ${err.codeName}: ${err.details}`);
    const last = await client.watchRun(args.runId, args.after, onEvent, {
      onReconnect,
      follow: args.follow,
    });
    const status = last ? statusName(last.status) : 'UNKNOWN';
    console.log(`final status: ${status}`);
    if (status === 'WAITING' || status === 'PAUSED') return 4;
    return status === 'COMPLETED' ? 0 : 1;
  } catch (err) {
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
