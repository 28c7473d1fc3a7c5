#!/usr/bin/env node
'use strict';
/**
 * prepack: copy engine/v1/engine.proto and the repository protos it imports (transitively)
 * from the repository's protos/ to protos/ next to client.js, so the package works where it
 * is installed. google/protobuf/* come with protobufjs and are not copied.
 * postpack (`--clean`): remove that copy again, so that in the repository client.js reads the
 * repository's protos/ and never a stale copy.
 */

const fs = require('node:fs');
const path = require('node:path');

const PACKAGE_DIR = path.resolve(__dirname, '..');
const SOURCE = path.resolve(PACKAGE_DIR, '..', '..', 'protos');
const TARGET = path.join(PACKAGE_DIR, 'protos');
const ENTRY = 'engine/v1/engine.proto';
const IMPORT = /^\s*import\s+(?:public\s+|weak\s+)?"([^"]+)"\s*;/gm;

function copy() {
  fs.rmSync(TARGET, { recursive: true, force: true });
  const pending = [ENTRY];
  const copied = new Set();
  while (pending.length) {
    const file = pending.pop();
    if (copied.has(file)) continue;
    const text = fs.readFileSync(path.join(SOURCE, file), 'utf8');
    fs.mkdirSync(path.dirname(path.join(TARGET, file)), { recursive: true });
    fs.writeFileSync(path.join(TARGET, file), text);
    copied.add(file);
    for (const [, imported] of text.matchAll(IMPORT)) {
      if (!imported.startsWith('google/protobuf/')) pending.push(imported);
    }
  }
  console.error(`copied ${[...copied].sort().join(', ')} from ${SOURCE}`);
}

if (process.argv.includes('--clean')) fs.rmSync(TARGET, { recursive: true, force: true });
else copy();
