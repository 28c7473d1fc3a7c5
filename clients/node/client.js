'use strict';
/**
 * A small Node.js client for engine.v1.EngineService, loaded at run time from the engine's
 * .proto files with @grpc/proto-loader: no generated code, no protoc. The package ships them in
 * protos/ next to this file (`npm pack` copies them there); in the repository they are the
 * repository's protos/.
 *
 * Conventions (one set, used everywhere in this file):
 * - field names are lowerCamelCase (proto-loader `keepCase: false`): `runId`, `afterSeq`;
 * - enums are their full proto names (`'RUN_STATUS_COMPLETED'`); `statusName()` shortens them;
 * - int64 fields (`seq`, `version`) are JS numbers;
 * - google.protobuf.Struct / Value fields (`input`, `state`, `output`, `config`, `value`) are
 *   plain JS values both ways; Timestamps are Dates; Durations are seconds (numbers), and
 *   Duration fields of a definition may be given as seconds too.
 */

const fs = require('node:fs');
const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const ENGINE_PROTO = 'engine/v1/engine.proto';
// The package's copy next to this file if there is one, else the repository's protos/.
const PROTO_ROOT =
  [path.join(__dirname, 'protos'), path.resolve(__dirname, '..', '..', 'protos')].find((dir) =>
    fs.existsSync(path.join(dir, ENGINE_PROTO)),
  ) || path.resolve(__dirname, '..', '..', 'protos');
const LOADER_OPTIONS = Object.freeze({
  keepCase: false,
  longs: Number,
  enums: String,
  defaults: true,
  oneofs: true,
  // google/protobuf/{struct,duration,timestamp}.proto are bundled with protobufjs.
  includeDirs: [PROTO_ROOT],
});

const DEFAULT_DEADLINE_MS = 10_000;
// PauseRun/CancelRun/ResumeRun/CheckpointRun may wait for the engine executing the run for the
// engine's --control-wait (30 s by default): give them more than that.
const DEFAULT_CONTROL_DEADLINE_MS = 40_000;

let enginePackage;

/** The loaded `engine.v1` package (EngineService constructor and message types). */
function loadEngineProto() {
  if (!enginePackage) {
    const definition = protoLoader.loadSync(ENGINE_PROTO, LOADER_OPTIONS);
    enginePackage = grpc.loadPackageDefinition(definition).engine.v1;
  }
  return enginePackage;
}

// ---- google.protobuf.Struct / Value <-> plain JS ----------------------------------------

/** A plain JS value as a google.protobuf.Value object (JSON.stringify semantics). */
function toValue(value) {
  if (value !== null && typeof value === 'object' && typeof value.toJSON === 'function') {
    value = value.toJSON();
  }
  if (value === null || value === undefined) return { nullValue: 'NULL_VALUE' };
  switch (typeof value) {
    case 'number':
      if (!Number.isFinite(value)) throw new TypeError(`not representable in a Struct: ${value}`);
      return { numberValue: value };
    case 'bigint':
      return { numberValue: Number(value) };
    case 'string':
      return { stringValue: value };
    case 'boolean':
      return { boolValue: value };
    case 'object':
      if (Array.isArray(value)) return { listValue: { values: value.map(toValue) } };
      return { structValue: toStruct(value) };
    default:
      throw new TypeError(`not representable in a Struct: ${typeof value}`);
  }
}

/** A plain JS object as a google.protobuf.Struct object. */
function toStruct(object) {
  if (object === null || object === undefined) return { fields: {} };
  if (typeof object !== 'object' || Array.isArray(object)) {
    throw new TypeError('a Struct must be a plain object');
  }
  const fields = {};
  for (const [key, v] of Object.entries(object)) {
    if (v !== undefined) fields[key] = toValue(v); // as JSON.stringify drops undefined
  }
  return { fields };
}

/** A decoded google.protobuf.Value as a plain JS value; an unset Value is `undefined`. */
function fromValue(value) {
  if (value === null || value === undefined) return undefined;
  switch (value.kind) {
    case 'nullValue':
      return null;
    case 'numberValue':
      return value.numberValue;
    case 'stringValue':
      return value.stringValue;
    case 'boolValue':
      return value.boolValue;
    case 'structValue':
      return fromStruct(value.structValue);
    case 'listValue':
      return ((value.listValue && value.listValue.values) || []).map((v) => {
        const plain = fromValue(v);
        return plain === undefined ? null : plain;
      });
    default:
      return undefined; // a Value with no kind set
  }
}

/** A decoded google.protobuf.Struct as a plain JS object (`null` if unset). */
function fromStruct(struct) {
  if (struct === null || struct === undefined) return null;
  const out = {};
  for (const [key, v] of Object.entries(struct.fields || {})) {
    const plain = fromValue(v);
    out[key] = plain === undefined ? null : plain;
  }
  return out;
}

// ---- Timestamp / Duration ------------------------------------------------------------

function fromTimestamp(ts) {
  if (!ts) return null;
  return new Date(Number(ts.seconds) * 1000 + Math.floor((ts.nanos || 0) / 1e6));
}

function fromDuration(d) {
  if (!d) return null;
  return Number(d.seconds) + (d.nanos || 0) / 1e9;
}

/** Seconds (a number) as a Duration; a {seconds, nanos} object passes through. */
function toDuration(value) {
  if (value === null || value === undefined) return undefined;
  if (typeof value === 'object') return value;
  const seconds = Math.trunc(value);
  return { seconds, nanos: Math.round((value - seconds) * 1e9) };
}

// ---- messages ------------------------------------------------------------------------

/** 'RUN_STATUS_COMPLETED' -> 'COMPLETED'. */
function statusName(status) {
  return String(status).replace(/^RUN_STATUS_/, '');
}

function convertRun(run) {
  if (!run) return run;
  return {
    ...run,
    state: fromStruct(run.state),
    createdAt: fromTimestamp(run.createdAt),
    updatedAt: fromTimestamp(run.updatedAt),
  };
}

function convertEvent(event) {
  return {
    ...event,
    time: fromTimestamp(event.time),
    duration: fromDuration(event.duration),
    output: fromValue(event.output),
  };
}

/** A definition whose node configs are plain objects and durations seconds, as sent. */
function definitionToPb(def) {
  const nodes = (def.nodes || []).map((node) => {
    const out = { ...node, config: toStruct(node.config || {}) };
    if (node.timeout !== undefined) out.timeout = toDuration(node.timeout);
    if (node.retry) {
      out.retry = {
        ...node.retry,
        initialBackoff: toDuration(node.retry.initialBackoff),
        maxBackoff: toDuration(node.retry.maxBackoff),
      };
    }
    return out;
  });
  const out = { ...def, nodes };
  if (def.checkpoint) out.checkpoint = { ...def.checkpoint, interval: toDuration(def.checkpoint.interval) };
  return out;
}

function convertCheckpoint(checkpoint) {
  return {
    ...checkpoint,
    state: fromStruct(checkpoint.state),
    createdAt: fromTimestamp(checkpoint.createdAt),
  };
}

function definitionFromPb(def) {
  if (!def) return def;
  return {
    ...def,
    nodes: (def.nodes || []).map((node) => ({
      ...node,
      config: fromStruct(node.config),
      timeout: fromDuration(node.timeout),
      retry: node.retry && {
        ...node.retry,
        initialBackoff: fromDuration(node.retry.initialBackoff),
        maxBackoff: fromDuration(node.retry.maxBackoff),
      },
    })),
    checkpoint: def.checkpoint && { ...def.checkpoint, interval: fromDuration(def.checkpoint.interval) },
  };
}

// ---- error details (google.rpc.Status in grpc-status-details-bin) -------------------------
// Those protos are not in protos/, so this decodes the few fields it needs from the wire.

function readFields(buf) {
  const fields = [];
  let pos = 0;
  const varint = () => {
    let result = 0;
    let shift = 0;
    for (;;) {
      if (pos >= buf.length) throw new Error('truncated varint');
      const byte = buf[pos++];
      result += (byte & 0x7f) * 2 ** shift;
      if (byte < 0x80) return result;
      shift += 7;
    }
  };
  while (pos < buf.length) {
    const key = varint();
    const number = Math.floor(key / 8);
    const wire = key & 7;
    if (wire === 0) fields.push({ number, value: varint() });
    else if (wire === 2) {
      const len = varint();
      fields.push({ number, value: buf.subarray(pos, pos + len) });
      pos += len;
    } else if (wire === 1) pos += 8;
    else if (wire === 5) pos += 4;
    else throw new Error(`unsupported wire type ${wire}`);
  }
  return fields;
}

const BAD_REQUEST_URL = 'type.googleapis.com/google.rpc.BadRequest';

/** The field violations of a google.rpc.BadRequest in a grpc-status-details-bin value. */
function decodeFieldViolations(statusBytes) {
  const violations = [];
  for (const detail of readFields(statusBytes).filter((f) => f.number === 3)) {
    const any = readFields(detail.value);
    const typeUrl = any.find((f) => f.number === 1);
    const value = any.find((f) => f.number === 2);
    if (!typeUrl || typeUrl.value.toString('utf8') !== BAD_REQUEST_URL || !value) continue;
    for (const fv of readFields(value.value).filter((f) => f.number === 1)) {
      const parts = readFields(fv.value);
      const text = (n) => {
        const f = parts.find((p) => p.number === n);
        return f ? f.value.toString('utf8') : '';
      };
      violations.push({ field: text(1), description: text(2) });
    }
  }
  return violations;
}

/** A grpc-js error made easier to report: `codeName` and `fieldViolations` added. */
function enrichError(err) {
  if (!err || typeof err.code !== 'number') return err;
  err.codeName = grpc.status[err.code] || String(err.code);
  err.fieldViolations = [];
  const raw = err.metadata && err.metadata.get('grpc-status-details-bin');
  if (raw && raw.length) {
    try {
      err.fieldViolations = decodeFieldViolations(Buffer.from(raw[0]));
    } catch {
      // undecodable details: the message is still there
    }
  }
  return err;
}

/** One line for a gRPC error: `CODE: message` and any field violations. */
function formatError(err) {
  if (!err || typeof err.code !== 'number') return String(err && err.stack ? err.message : err);
  enrichError(err);
  const lines = [`${err.codeName}: ${err.details || err.message}`];
  for (const v of err.fieldViolations) lines.push(`  ${v.field}: ${v.description}`);
  return lines.join('\n');
}

// ---- the client ----------------------------------------------------------------------

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// watchRun stops at a run.status event with one of these (unless `follow`).
const STOP_STATUSES = new Set(['RUN_STATUS_WAITING', 'RUN_STATUS_PAUSED']);

/** The credential options the `wf` command takes from its environment (WF_TOKEN, WF_CA,
 * WF_CERT, WF_KEY), for `new EngineClient(address, { tenant, ...credentialsFromEnv() })`. */
function credentialsFromEnv(env = process.env) {
  return { token: env.WF_TOKEN, ca: env.WF_CA, cert: env.WF_CERT, key: env.WF_KEY };
}

/** The channel's credentials: `credentials` as given, TLS from `ca`/`cert`/`key` files, or
 * plaintext. */
function channelCredentials({ credentials, ca, cert, key } = {}) {
  if (credentials) return credentials;
  if (!ca && !cert && !key) return grpc.credentials.createInsecure();
  if (Boolean(cert) !== Boolean(key)) {
    throw new Error('a client certificate needs its key, and a key its certificate');
  }
  const read = (file) => (file ? fs.readFileSync(file) : null);
  return grpc.credentials.createSsl(read(ca), read(key), read(cert));
}

class EngineClient {
  /**
   * @param {string} address host:port of an engine
   * @param {object} [options]
   * @param {string} [options.tenant] sent as `x-tenant-id` (the engine's default is "default",
   *   or the token's tenant)
   * @param {string} [options.token] a bearer token, for an engine that checks credentials
   *   (docs/security.md); sent as `authorization: Bearer TOKEN`
   * @param {number} [options.deadlineMs] deadline of unary calls (10 s)
   * @param {number} [options.controlDeadlineMs] of Pause/Cancel/Resume/CheckpointRun (40 s)
   * @param {number} [options.reconnectForMs] how long watchRun keeps reconnecting (30 s)
   * @param {string} [options.ca] PEM file of the engine's CA: TLS (the system's roots with
   *   only `cert`/`key`)
   * @param {string} [options.cert] PEM file of this client's certificate, for mTLS
   * @param {string} [options.key] PEM file of its private key
   * @param {grpc.ChannelCredentials} [options.credentials] instead of ca/cert/key; insecure
   *   by default
   * @param {object} [options.channelOptions] grpc-js channel options
   */
  constructor(address, options = {}) {
    const { EngineService } = loadEngineProto();
    this.address = address;
    this.tenant = options.tenant || '';
    this.token = options.token || '';
    this.deadlineMs = options.deadlineMs ?? DEFAULT_DEADLINE_MS;
    this.controlDeadlineMs = options.controlDeadlineMs ?? DEFAULT_CONTROL_DEADLINE_MS;
    this.reconnectForMs = options.reconnectForMs ?? 30_000;
    const credentials = channelCredentials(options);
    this.stub = new EngineService(address, credentials, options.channelOptions || {});
  }

  close() {
    this.stub.close();
  }

  metadata() {
    const md = new grpc.Metadata();
    if (this.tenant) md.set('x-tenant-id', this.tenant);
    if (this.token) md.set('authorization', `Bearer ${this.token}`);
    return md;
  }

  unary(method, request, deadlineMs) {
    return new Promise((resolve, reject) => {
      this.stub[method](
        request,
        this.metadata(),
        { deadline: Date.now() + (deadlineMs ?? this.deadlineMs) },
        (err, response) => (err ? reject(enrichError(err)) : resolve(response)),
      );
    });
  }

  /** definition: {workflowId, description?, nodes: [{id, type, dependsOn?, config?, ...}]} */
  async registerWorkflow(definition, { deadlineMs } = {}) {
    return this.unary('RegisterWorkflow', { definition: definitionToPb(definition) }, deadlineMs);
  }

  async getWorkflow(workflowId, version = 0, { deadlineMs } = {}) {
    const res = await this.unary('GetWorkflow', { workflowId, version }, deadlineMs);
    return { ...res, definition: definitionFromPb(res.definition) };
  }

  /** Resolves to the Run; pass a requestId to make retries safe. */
  async startRun(workflowId, { input = {}, version = 0, runId = '', requestId = '', deadlineMs } = {}) {
    const res = await this.unary(
      'StartRun',
      { workflowId, version, input: toStruct(input), runId, requestId },
      deadlineMs,
    );
    return convertRun(res.run);
  }

  async getRun(runId, { deadlineMs } = {}) {
    return convertRun((await this.unary('GetRun', { runId }, deadlineMs)).run);
  }

  async listRuns({ workflowId = '', statuses = [], pageSize = 0, pageToken = '', deadlineMs } = {}) {
    const res = await this.unary('ListRuns', { workflowId, statuses, pageSize, pageToken }, deadlineMs);
    return { runs: res.runs.map(convertRun), nextPageToken: res.nextPageToken };
  }

  /** `value` answers a WAITING approval; leave it undefined otherwise. */
  async resumeRun(runId, { value, deadlineMs } = {}) {
    const request = { runId };
    if (value !== undefined) request.value = toValue(value);
    const res = await this.unary('ResumeRun', request, deadlineMs ?? this.controlDeadlineMs);
    return convertRun(res.run);
  }

  async pauseRun(runId, { deadlineMs } = {}) {
    const res = await this.unary('PauseRun', { runId }, deadlineMs ?? this.controlDeadlineMs);
    return convertRun(res.run);
  }

  async cancelRun(runId, { reason = '', deadlineMs } = {}) {
    const res = await this.unary('CancelRun', { runId, reason }, deadlineMs ?? this.controlDeadlineMs);
    return convertRun(res.run);
  }

  async checkpointRun(runId, name, { metadata = {}, deadlineMs } = {}) {
    const res = await this.unary(
      'CheckpointRun',
      { runId, name, metadata },
      deadlineMs ?? this.controlDeadlineMs,
    );
    return res.checkpointId;
  }

  /**
   * A workflow's versions (`[{version, createdAt, active}]`), the active one, and the history
   * of registrations and rollbacks that made a version active (`[{kind, version,
   * previousVersion, reason, requestedBy, time}]`, newest first). NOT_FOUND for an unknown
   * workflow.
   */
  async listWorkflowVersions(workflowId, { deadlineMs } = {}) {
    const res = await this.unary('ListWorkflowVersions', { workflowId }, deadlineMs);
    return {
      versions: res.versions.map((v) => ({ ...v, createdAt: fromTimestamp(v.createdAt) })),
      activeVersion: res.activeVersion,
      history: res.history.map((change) => ({ ...change, time: fromTimestamp(change.time) })),
    };
  }

  /**
   * Make `version` the workflow's active version at once (new runs use it, runs under way keep
   * theirs). Resolves to `{activeVersion, previousVersion}`; NOT_FOUND for an unknown version.
   */
  async rollbackWorkflow(workflowId, version, { reason = '', requestedBy = '', deadlineMs } = {}) {
    const res = await this.unary(
      'RollbackWorkflow',
      { workflowId, version, reason, requestedBy },
      deadlineMs,
    );
    return { activeVersion: res.activeVersion, previousVersion: res.previousVersion };
  }

  /**
   * One page of a run's checkpoints, newest first: `{checkpoints, nextPageToken}` (an empty
   * token on the last page). Each checkpoint is `{checkpointId, parentId, step, trigger, name,
   * completedNodeIds, progressPercent, createdAt, metadata, state, status}`; `state` (a plain
   * object) and `status` only with `includeState`, else `null` and `'RUN_STATUS_UNSPECIFIED'`.
   * `pageSize` 0 is the engine's default (100), at most 1000.
   */
  async getRunHistory(runId, { includeState = false, pageSize = 0, pageToken = '', deadlineMs } = {}) {
    const request = { runId, includeState, pageSize, pageToken };
    const res = await this.unary('GetRunHistory', request, deadlineMs);
    return {
      checkpoints: res.checkpoints.map(convertCheckpoint),
      nextPageToken: res.nextPageToken,
    };
  }

  /**
   * Start a new run from one of a run's checkpoints (see getRunHistory). `statePatch` is merged
   * into the state there: `input` (an object) into the input, and a node id sets that node's
   * output and counts it done. Only what comes after runs. Resolves to the new Run.
   */
  async forkRun(runId, checkpointId, { statePatch = {}, newRunId = '', deadlineMs } = {}) {
    const res = await this.unary(
      'ForkRun',
      { runId, checkpointId, statePatch: toStruct(statePatch), newRunId },
      deadlineMs,
    );
    return convertRun(res.run);
  }

  /**
   * Stream a run's events after `afterSeq` (0: all) to `onEvent(event)`, in order and each
   * once. Resolves with the last event delivered:
   * - at a `run.status` event whose status is WAITING or PAUSED, if GetRun says the run is
   *   still in that status (a replayed WAITING the run has since left goes on); the stream is
   *   cancelled then;
   * - with `follow: true`, only once the run's feed ends (after its terminal event), as it
   *   does anyway for a run that neither waits nor pauses.
   * A stream that fails with UNAVAILABLE is opened again from the last seq delivered, for up
   * to `reconnectForMs` without getting anything; other errors reject.
   * Options: `follow` (false), `onHeartbeat({time, lastSeq})` on an idle stream,
   * `onReconnect(error, afterSeq)` before each new attempt.
   */
  watchRun(runId, afterSeq = 0, onEvent = () => {}, { onHeartbeat, onReconnect, follow = false } = {}) {
    let lastSeq = Number(afterSeq) || 0;
    let lastEvent = null;
    let failingSince = null;
    let backoff = 100;
    let unchecked = null; // a WAITING/PAUSED event whose GetRun failed with UNAVAILABLE

    const mayStop = (event) =>
      !follow && event.type === 'run.status' && STOP_STATUSES.has(event.status);
    // Whether the run is still in the event's status: resolves to {done} or {error}.
    const check = async (event) => {
      try {
        const run = await this.getRun(runId);
        return { done: run.status === event.status };
      } catch (err) {
        unchecked = event;
        return { error: err };
      }
    };

    const attempt = () =>
      new Promise((resolve, reject) => {
        let finished = false;
        // Items are handled one at a time, in order, also while a check awaits GetRun.
        let queue = Promise.resolve();
        const call = this.stub.WatchRun({ runId, afterSeq: lastSeq }, this.metadata());
        const finish = (fn, value) => {
          if (!finished) {
            finished = true;
            fn(value);
          }
        };
        const stop = (fn, value) => {
          finish(fn, value);
          call.cancel();
        };
        const handle = async (item) => {
          if (finished) return; // a failed attempt's leftovers: the next one replays them
          failingSince = null;
          backoff = 100;
          if (item.item === 'heartbeat') {
            if (onHeartbeat) onHeartbeat({ time: fromTimestamp(item.heartbeat.time), lastSeq: item.heartbeat.lastSeq });
            return;
          }
          const event = convertEvent(item.event);
          if (event.seq <= lastSeq) return; // already delivered
          onEvent(event);
          lastSeq = event.seq;
          lastEvent = event;
          if (!mayStop(event)) return;
          call.pause();
          const result = await check(event);
          if (result.error || result.done) stop(resolve, { error: result.error || null });
          else call.resume();
        };
        const enqueue = (fn) => {
          queue = queue.then(fn).catch((err) => stop(reject, err));
        };
        call.on('data', (item) => enqueue(() => handle(item)));
        call.on('error', (err) => enqueue(() => finish(resolve, { error: enrichError(err) })));
        call.on('end', () => enqueue(() => finish(resolve, { error: null })));
      });

    return (async () => {
      for (;;) {
        let result = null;
        if (unchecked) {
          const event = unchecked;
          unchecked = null;
          result = await check(event);
          if (!result.error && !result.done) result = null;
        }
        const { error } = result || (await attempt());
        if (!error) return lastEvent;
        if (error.code !== grpc.status.UNAVAILABLE) throw error;
        failingSince = failingSince ?? Date.now();
        if (Date.now() - failingSince > this.reconnectForMs) throw error;
        if (onReconnect) onReconnect(error, lastSeq);
        await sleep(backoff);
        backoff = Math.min(backoff * 2, 2_000);
      }
    })();
  }
}

module.exports = {
  EngineClient,
  credentialsFromEnv,
  loadEngineProto,
  toStruct,
  fromStruct,
  toValue,
  fromValue,
  statusName,
  formatError,
  enrichError,
  PROTO_ROOT,
  LOADER_OPTIONS,
};
