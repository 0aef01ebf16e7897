#!/usr/bin/env node
// `make bench-daemon`: the daemon's figures, with real guests and `qsnap serve` as a process.
//   stream  a snapshot of a guest with --ram-mib of RAM (default 1 GiB, its workload rewriting
//           --workload-mib of it) while one client asks `status` every 5 ms, of that VM and of an
//           idle one: the latency of each answer (the event loop must not be held by the stream).
//   load    --clients × --requests (status, list, inspect) on loopback while a snapshot streams:
//           every request answered once, none lost, the latency of each kind.
//   frames  --frames malformed frames (not JSON, wrong types, unknown ops, binary, oversized)
//           and the daemon's resident memory before and after; it must answer and stay up.
//
//   node scripts/bench-daemon.mjs [--ram-mib 1024] [--workload-mib 512] [--clients 20]
//        [--requests 50] [--frames 1000] [--inline] [--json]
// --inline runs the stream work on the daemon's event loop instead of worker threads (the
// comparison docs/api.md gives).
import { spawn } from 'node:child_process';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import WebSocket from 'ws';

const { values } = parseArgs({
  options: {
    'ram-mib': { type: 'string', default: '1024' },
    'workload-mib': { type: 'string', default: '512' },
    clients: { type: 'string', default: '20' },
    requests: { type: 'string', default: '50' },
    frames: { type: 'string', default: '1000' },
    inline: { type: 'boolean', default: false },
    check: { type: 'boolean', default: false },
    json: { type: 'boolean', default: false },
  },
});
const log = (line) => process.stderr.write(`${line}\n`);
const cli = new URL('../dist/cli/main.js', import.meta.url).pathname;
const { bootTestGuest, connect } = await import('../dist/index.js');

function stats(xs) {
  const s = [...xs].sort((a, b) => a - b);
  const at = (q) => s[Math.min(s.length - 1, Math.floor(s.length * q))];
  return { n: s.length, p50: at(0.5), p99: at(0.99), max: s[s.length - 1] };
}
const fmt = (st) =>
  `n ${st.n}, p50 ${st.p50.toFixed(1)} ms, p99 ${st.p99.toFixed(1)} ms, max ${st.max.toFixed(1)} ms`;

async function rssKiB(pid) {
  return Number(/VmRSS:\s+(\d+)/.exec(await readFile(`/proc/${pid}/status`, 'utf8'))[1]);
}

async function startServe(env) {
  const child = spawn(process.execPath, [cli, 'serve', '--listen', '127.0.0.1:0'], {
    env: { ...process.env, ...env },
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  let out = '';
  child.stdout.setEncoding('utf8').on('data', (t) => {
    out += t;
  });
  for (let i = 0; i < 300 && !/listening (ws:\/\/\S+)/.test(out); i++)
    await new Promise((r) => setTimeout(r, 100));
  const url = /listening (ws:\/\/\S+)/.exec(out)?.[1];
  if (!url) throw new Error(`qsnap serve did not start: ${out}`);
  return { child, url };
}

const work = await mkdtemp(join(tmpdir(), 'qsnap-bench-daemon-'));
const env = {
  QSNAP_STATE_DIR: join(work, 'state'),
  QSNAP_STORE: join(work, 'store'),
  ...(values.inline ? { QSNAP_DAEMON_INLINE: '1' } : {}),
};
const guests = [];
let serve;
const results = {};
try {
  log(`booting a ${values['ram-mib']} MiB guest and an idle one…`);
  const busy = await bootTestGuest({
    dir: await mkdtemp(join(work, 'busy-')),
    memoryMiB: Number(values['ram-mib']),
    workloadMiB: Number(values['workload-mib']),
  });
  guests.push(busy);
  const idle = await bootTestGuest({ dir: await mkdtemp(join(work, 'idle-')) });
  guests.push(idle);
  serve = await startServe(env);
  const token = (await readFile(join(env.QSNAP_STATE_DIR, 'daemon.token'), 'utf8')).trim();
  const c = await connect(serve.url, { token });
  const busyId = (await c.attach({ qmp: busy.vm.qmpPath, name: 'busy' })).vm;
  const idleId = (await c.attach({ qmp: idle.vm.qmpPath, name: 'idle' })).vm;
  await c.snapshot({ vm: idleId, name: 'idle-0' });

  // ── stream: status every 5 ms while a snapshot of the big guest streams ──
  // The control: an idle Node process measuring its own event-loop delay meanwhile — what the
  // machine's load alone does to any event loop (the daemon can do no better than that).
  const control = spawn(
    process.execPath,
    [
      '-e',
      `const h = require('node:perf_hooks').monitorEventLoopDelay({ resolution: 10 }); h.enable();
       process.on('SIGTERM', () => { const ms = (n) => Math.round(n / 1e4) / 100;
         process.stdout.write(JSON.stringify({ p50: ms(h.percentile(50)), p99: ms(h.percentile(99)), max: ms(h.max) }));
         process.exit(0); }); setInterval(() => {}, 1000);`,
    ],
    { stdio: ['ignore', 'pipe', 'inherit'] },
  );
  let controlOut = '';
  control.stdout.setEncoding('utf8').on('data', (t) => {
    controlOut += t;
  });
  const poller = await connect(serve.url, { token });
  await c.vms({ resetStats: true });
  const lat = { busy: [], idle: [] };
  let streaming = true;
  let streamBytes = 0;
  const t0 = performance.now();
  const snap = c
    .snapshot({ vm: busyId, name: 'busy-0' }, (e) => {
      if (e.event === 'progress') streamBytes = e.totalBytes;
    })
    .finally(() => {
      streaming = false;
    });
  const poll = (async () => {
    for (let i = 0; streaming; i++) {
      const which = i % 2 ? 'idle' : 'busy';
      const t = performance.now();
      await poller.status({ vm: which === 'busy' ? busyId : idleId });
      lat[which].push(performance.now() - t);
      await new Promise((r) => setTimeout(r, 5));
    }
  })();
  const snapResult = await snap;
  await poll;
  const loop = (await c.vms({ resetStats: true })).daemon.eventLoopDelayMs;
  control.kill('SIGTERM');
  await new Promise((r) => control.once('exit', r));
  const idleLoop = JSON.parse(controlOut);
  results.stream = {
    ramBytes: snapResult.ramBytes,
    streamMs: snapResult.streamMs,
    totalMs: Math.round(performance.now() - t0),
    downtimeMs: snapResult.downtimeMs,
    statusBusyVm: stats(lat.busy),
    statusIdleVm: stats(lat.idle),
    all: stats([...lat.busy, ...lat.idle]),
    daemonEventLoopDelayMs: loop,
    idleProcessEventLoopDelayMs: idleLoop,
    workers: !values.inline,
  };
  log(
    `stream: ${(snapResult.ramBytes / 2 ** 30).toFixed(2)} GiB RAM streamed in ${snapResult.streamMs.toFixed(0)} ms (${values.inline ? 'on the event loop' : 'worker thread'})`,
  );
  log(`  status of the streaming VM: ${fmt(results.stream.statusBusyVm)}`);
  log(`  status of an idle VM:       ${fmt(results.stream.statusIdleVm)}`);
  log(`  all status:                 ${fmt(results.stream.all)}`);
  log(
    `  the daemon's event-loop delay meanwhile: p50 ${loop.p50} ms, p99 ${loop.p99} ms, max ${loop.max} ms`,
  );
  log(
    `  an idle Node process's, same time (control): p50 ${idleLoop.p50} ms, p99 ${idleLoop.p99} ms, max ${idleLoop.max} ms; load average ${(await readFile('/proc/loadavg', 'utf8')).split(' ').slice(0, 3).join(' ')}`,
  );
  void streamBytes;

  // ── load: clients × requests while a snapshot streams ──
  const nClients = Number(values.clients);
  const nRequests = Number(values.requests);
  const clients = await Promise.all(Array.from({ length: nClients }, () => connect(serve.url, { token })));
  const byKind = { status: [], list: [], inspect: [] };
  const seen = new Set();
  let duplicates = 0;
  const snap2 = c.snapshot({ vm: busyId, name: 'busy-1' });
  const tl = performance.now();
  await Promise.all(
    clients.map(async (cl, i) => {
      for (let n = 0; n < nRequests; n++) {
        const kind = ['status', 'list', 'inspect'][n % 3];
        const t = performance.now();
        if (kind === 'status') await cl.status({ vm: n % 2 ? busyId : idleId });
        else if (kind === 'list') await cl.list();
        else await cl.inspect({ name: 'idle-0' });
        byKind[kind].push(performance.now() - t);
        const key = `${i}/${n}`;
        if (seen.has(key)) duplicates++;
        seen.add(key);
      }
    }),
  );
  const loadMs = performance.now() - tl;
  await snap2;
  results.load = {
    clients: nClients,
    requests: nClients * nRequests,
    answered: seen.size,
    duplicates,
    seconds: loadMs / 1000,
    perSecond: (nClients * nRequests) / (loadMs / 1000),
    status: stats(byKind.status),
    list: stats(byKind.list),
    inspect: stats(byKind.inspect),
    all: stats([...byKind.status, ...byKind.list, ...byKind.inspect]),
  };
  log(
    `load: ${nClients} clients × ${nRequests} requests during a snapshot: ${seen.size} answered, ${duplicates} twice, ${results.load.perSecond.toFixed(0)}/s`,
  );
  for (const k of ['status', 'list', 'inspect', 'all']) log(`  ${k.padEnd(8)} ${fmt(results.load[k])}`);
  await Promise.all(clients.map((cl) => cl.close()));
  results.load.daemonEventLoopDelayMs = (await c.vms({ resetStats: true })).daemon.eventLoopDelayMs;
  log(`  the daemon's event-loop delay meanwhile: ${JSON.stringify(results.load.daemonEventLoopDelayMs)}`);

  // ── frames: malformed frames and the daemon's memory ──
  const nFrames = Number(values.frames);
  const rssBefore = await rssKiB(serve.child.pid);
  const bad = [
    '{',
    'null',
    '[]',
    '{"id":"1"}',
    '{"id":"1","op":"nosuch","args":{}}',
    '{"id":"1","op":"status","args":{"vm":1}}',
    '{"id":"1","op":"snapshot","args":{"vm":"vm-x","name":"../../etc"}}',
    JSON.stringify({ id: 'x'.repeat(100), op: 'list' }),
  ];
  let errors = 0;
  let closedOversized = 0;
  const raws = await Promise.all(
    Array.from({ length: 10 }, async () => {
      const ws = new WebSocket(serve.url, { headers: { Authorization: `Bearer ${token}` } });
      await new Promise((r) => ws.once('open', r));
      ws.on('message', (d) => {
        if (JSON.parse(d.toString()).ok === false) errors++;
      });
      return ws;
    }),
  );
  for (let i = 0; i < nFrames; i++) raws[i % raws.length].send(bad[i % bad.length]);
  for (let i = 0; i < 10 && errors < nFrames; i++) await new Promise((r) => setTimeout(r, 100));
  for (let i = 0; errors < nFrames && i < 100; i++) await new Promise((r) => setTimeout(r, 100));
  // Oversized frames: the daemon closes those connections (1009) and carries on.
  const big = await Promise.all(
    Array.from({ length: 10 }, async () => {
      const ws = new WebSocket(serve.url, { headers: { Authorization: `Bearer ${token}` } });
      await new Promise((r) => ws.once('open', r));
      const closed = new Promise((r) => ws.once('close', (code) => r(code)));
      ws.send('x'.repeat(1024 * 1024));
      return closed;
    }),
  );
  closedOversized = big.filter((code) => code === 1009).length;
  for (const ws of raws) ws.close();
  await new Promise((r) => setTimeout(r, 1000));
  const rssAfter = await rssKiB(serve.child.pid);
  const stillUp = (await c.vms()).vms.length;
  results.frames = {
    frames: nFrames,
    errorFrames: errors,
    closedOversized,
    rssBeforeKiB: rssBefore,
    rssAfterKiB: rssAfter,
    stillUp: stillUp > 0,
  };
  log(
    `frames: ${nFrames} malformed → ${errors} error frames; 10 oversized → ${closedOversized} closed with 1009; RSS ${(rssBefore / 1024).toFixed(1)} → ${(rssAfter / 1024).toFixed(1)} MiB; daemon up: ${stillUp > 0}`,
  );
  await c.close();
  await poller.close();
} finally {
  if (serve) {
    serve.child.kill('SIGTERM');
    await new Promise((r) => serve.child.once('exit', r));
  }
  for (const g of guests) await g.stop().catch(() => g.vm.kill());
  await rm(work, { recursive: true, force: true });
}
if (values.json) process.stdout.write(`${JSON.stringify(results, null, 2)}\n`);
// --check (make test-daemon): the proof's conditions, each a failure when not met.
if (values.check) {
  const failures = [];
  const { load, frames } = results;
  if (load.answered !== load.requests) failures.push(`load: ${load.requests - load.answered} requests lost`);
  if (load.duplicates !== 0) failures.push(`load: ${load.duplicates} requests answered twice`);
  if (frames.errorFrames !== frames.frames)
    failures.push(`frames: ${frames.errorFrames}/${frames.frames} answered`);
  if (frames.closedOversized !== 10) failures.push(`frames: ${frames.closedOversized}/10 oversized closed`);
  if (!frames.stillUp) failures.push('frames: the daemon stopped answering');
  if (frames.rssAfterKiB > frames.rssBeforeKiB + 64 * 1024)
    failures.push(
      `frames: memory grew ${((frames.rssAfterKiB - frames.rssBeforeKiB) / 1024).toFixed(0)} MiB`,
    );
  for (const f of failures) log(`FAIL ${f}`);
  if (failures.length) process.exitCode = 1;
  else log('ok: every request answered once, every malformed frame answered, memory flat');
}
