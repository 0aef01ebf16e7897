#!/usr/bin/env node
// `make bench-snapshot`: qsnap's live snapshot against QEMU's own background snapshot, side by side,
// on the bundled test guest while its workload rewrites memory and disk at full speed.
//
// For each guest size, on ONE running guest, each run takes (order rotated run by run):
//   qsnap    snapshot() from dist/ through the public QMP socket, as a user would;
//   devnull  QEMU alone: background-snapshot to `exec:cat > /dev/null` (private QMP);
//   file     the same to `exec:cat > FILE` on the snapshot's filesystem.
// and reports the guest's pause and where it goes, the time of the whole command and of the
// migration alone (ratios per run pair), and the snapshot file's size against its RAM.
// docs/benchmarks.md explains every row and records a measured table.
//
//   node scripts/bench-snapshot.mjs [--sizes 256,2048] [--workloads 64,512] [--runs 5]
//       [--quick] [--json] [--out-dir DIR] [--gap-ms 500] [--thp always|madvise|never]
//       [--qemu-arg ARG]...
//
// The table goes to stdout (to stderr with --json, where stdout is the JSON document only);
// progress always goes to stderr. Every QEMU is stopped by pid, every file removed, and a
// /sys setting changed by --thp restored, also on an error or Ctrl-C.
import { execFileSync } from 'node:child_process';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { mkdir, mkdtemp, readFile, rm, stat } from 'node:fs/promises';
import os from 'node:os';
import { join, resolve } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { parseArgs } from 'node:util';

// dist/ is imported in main(), after the options are checked: --help and usage errors work unbuilt.
let bootTestGuest;
let snapshot;

const UNLIMITED_BANDWIDTH = 2 ** 40; // what qsnap sets by default (src/engine/migration.ts)
const THP_ENABLED = '/sys/kernel/mm/transparent_hugepage/enabled';
const THP_DEFRAG = '/sys/kernel/mm/transparent_hugepage/defrag';
const BASELINE_TIMEOUT_MS = 10 * 60_000;
const VARIANTS = ['qsnap', 'devnull', 'file'];

const USAGE = `usage: node scripts/bench-snapshot.mjs [options]
  --sizes 256,2048      guest RAM sizes in MiB (default 256,2048)
  --workloads 64,512    memory the workload rewrites, per size (default: a quarter of each size)
  --runs 5              runs per size; each run takes one snapshot of every kind
  --quick               one 256 MiB guest, 2 runs (the smoke test)
  --json                print the raw numbers as JSON on stdout (the table goes to stderr)
  --out-dir DIR         where snapshots are written (default: a temp dir); the bench's own
                        subdirectory there is removed afterwards
  --gap-ms 500          pause between snapshots
  --thp MODE            set ${THP_ENABLED} for the run (restored afterwards)
  --qemu-arg ARG        extra QEMU argument (repeatable), e.g. --qemu-arg=-mem-prealloc`;

function parseOptions(argv) {
  const { values } = parseArgs({
    args: argv,
    options: {
      sizes: { type: 'string' },
      workloads: { type: 'string' },
      runs: { type: 'string' },
      quick: { type: 'boolean', default: false },
      json: { type: 'boolean', default: false },
      'out-dir': { type: 'string' },
      'gap-ms': { type: 'string', default: '500' },
      thp: { type: 'string' },
      'qemu-arg': { type: 'string', multiple: true, default: [] },
      help: { type: 'boolean', short: 'h', default: false },
    },
  });
  if (values.help) {
    console.log(USAGE);
    process.exit(0);
  }
  const list = (text) => text.split(',').map((s) => positiveInt(s, text));
  const sizes = values.sizes ? list(values.sizes) : values.quick ? [256] : [256, 2048];
  const workloads = values.workloads ? list(values.workloads) : sizes.map((s) => Math.floor(s / 4));
  if (workloads.length !== sizes.length) fail('--workloads needs one value per size');
  if (values.thp && !['always', 'madvise', 'never'].includes(values.thp))
    fail('--thp takes always, madvise or never');
  return {
    sizes,
    workloads,
    runs: values.runs ? positiveInt(values.runs, '--runs') : values.quick ? 2 : 5,
    quick: values.quick,
    json: values.json,
    outDir: values['out-dir'] ? resolve(values['out-dir']) : undefined,
    gapMs: values['gap-ms'] === '0' ? 0 : positiveInt(values['gap-ms'], '--gap-ms'),
    thp: values.thp,
    qemuArgs: values['qemu-arg'],
  };
}

function positiveInt(text, what) {
  const n = Number(text);
  if (!Number.isInteger(n) || n <= 0) fail(`${what}: expected a positive integer, got ${text}`);
  return n;
}

function fail(message) {
  console.error(`bench-snapshot: ${message}\n${USAGE}`);
  process.exit(2);
}

const log = (message) => console.error(message);
const nowWallMs = () => performance.timeOrigin + performance.now();

// ---- cleanup: everything this run started or changed, undone in reverse order ------------

const undo = [];
let cleaning;

function cleanup() {
  cleaning ??= (async () => {
    while (undo.length) {
      const step = undo.pop();
      try {
        await step();
      } catch (err) {
        log(`cleanup: ${err.message}`);
      }
    }
  })();
  return cleaning;
}

for (const signal of ['SIGINT', 'SIGTERM']) {
  process.once(signal, () => {
    log(`\n${signal}: stopping the guests and removing the files`);
    void cleanup().finally(() => process.exit(130));
  });
}

// ---- the host ---------------------------------------------------------------------------

function sysfsChoice(path) {
  try {
    return readFileSync(path, 'utf8').match(/\[(\w[\w+]*)\]/)?.[1];
  } catch {
    return undefined;
  }
}

/** Set THP's `enabled` mode for this run; the old value goes back on the undo list first. */
function setThp(mode) {
  const before = sysfsChoice(THP_ENABLED);
  if (!before) throw new Error(`cannot read ${THP_ENABLED}`);
  undo.push(async () => {
    writeFileSync(THP_ENABLED, before);
    log(`restored ${THP_ENABLED} to ${before}`);
  });
  writeFileSync(THP_ENABLED, mode);
  log(`set ${THP_ENABLED} to ${mode} (was ${before})`);
}

function hostInfo() {
  const cpus = os.cpus();
  let qemu = 'unknown';
  try {
    qemu = execFileSync('qemu-system-x86_64', ['--version'], { encoding: 'utf8' }).split('\n')[0];
  } catch {
    // reported as unknown; booting the guest will fail with a clear error anyway
  }
  return {
    cpus: cpus.length,
    cpuModel: cpus[0]?.model ?? 'unknown',
    memoryMiB: Math.round(os.totalmem() / 2 ** 20),
    kernel: os.release(),
    qemu,
    node: process.version,
    accel: 'tcg',
    thp: { enabled: sysfsChoice(THP_ENABLED), defrag: sysfsChoice(THP_DEFRAG) },
    loadAvgStart: os.loadavg().map((l) => +l.toFixed(2)),
  };
}

/** Guest RAM QEMU has mapped with transparent huge pages (AnonHugePages, MiB). */
async function thpMappedMiB(pid) {
  try {
    const text = await readFile(`/proc/${pid}/smaps_rollup`, 'utf8');
    return Number(text.match(/^AnonHugePages:\s+(\d+) kB/m)?.[1] ?? Number.NaN) / 1024;
  } catch {
    return Number.NaN;
  }
}

/** CPU time of QEMU's reaped children (the `exec:` command), ms; /proc counts in USER_HZ = 100. */
async function childrenCpuMs(pid) {
  const stat = await readFile(`/proc/${pid}/stat`, 'utf8');
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return (Number(fields[13]) + Number(fields[14])) * 10;
}

/** childrenCpuMs once it moved past `before` (QEMU reaps cat in its cleanup, just after completion). */
async function reapedChildrenCpuMs(pid, before) {
  const deadline = Date.now() + 500;
  for (;;) {
    const now = await childrenCpuMs(pid);
    if (now > before || Date.now() > deadline) return now;
    await sleep(10);
  }
}

// ---- QMP events of one measurement ------------------------------------------------------

/** Collects STOP, RESUME and MIGRATION events on the guest's private QMP connection. */
function recordEvents(qmp) {
  const events = [];
  const off = ['STOP', 'RESUME', 'MIGRATION'].map((name) => qmp.on(name, (e) => events.push(e)));
  const atMs = (name, status) => {
    const e = events.find((x) => x.event === name && (status === undefined || x.data?.status === status));
    return e ? e.timestampUs / 1000 : undefined;
  };
  return {
    atMs,
    /** Guest pause by QEMU's own timestamps: first STOP to the RESUME after it. */
    pauseMs() {
      const stop = atMs('STOP');
      const resume = events.find((x) => x.event === 'RESUME' && x.timestampUs / 1000 >= (stop ?? 0));
      return stop !== undefined && resume ? resume.timestampUs / 1000 - stop : undefined;
    },
    stop: () => {
      for (const f of off) f();
    },
  };
}

async function ensureRunning(guest, label) {
  const status = await guest.vm.qmp.execute('query-status');
  if (status.running) return true;
  log(`  ${label}: the guest was left ${status.status}; resuming it`);
  await guest.vm.qmp.execute('cont');
  return false;
}

// ---- one qsnap snapshot -----------------------------------------------------------------

async function measureQsnap(guest, dir, tag) {
  const out = join(dir, `${tag}.qsnap`);
  const events = recordEvents(guest.vm.qmp);
  const phases = {};
  const cpuBefore = process.cpuUsage();
  try {
    const op = snapshot({ qmp: guest.vm.qmpPath, out, commandLine: guest.argv });
    op.on((e) => {
      if (e.type === 'phase') phases[e.phase] = +e.atMs.toFixed(2);
    });
    const r = await op.result;
    const cpu = process.cpuUsage(cpuBefore);
    const info = await finishedMigration(guest.vm.qmp);
    const stopAt = events.atMs('STOP');
    const migrateAt = events.atMs('MIGRATION', 'setup');
    const runningAfter = await ensureRunning(guest, tag);
    const check = await guest.console.check({ timeoutMs: 60_000 });
    return {
      downtimeMs: r.downtimeMs,
      // The pause split at QEMU's MIGRATION(setup) event: before it qsnap's stop, disk
      // transaction and migrate command; after it QEMU's setup, then QEMU's own downtime.
      beforeMigrateMs: stopAt !== undefined && migrateAt !== undefined ? migrateAt - stopAt : undefined,
      qemuSetupMs: info['setup-time'],
      qemuDowntimeMs: info.downtime,
      qemuTotalMs: info['total-time'],
      totalMs: r.totalMs,
      streamMs: r.streamMs,
      phasesMs: phases,
      finishMs: phases.finish === undefined ? undefined : r.totalMs - phases.finish,
      // All of this process's threads (parser, writer pool, GC) while snapshot() ran.
      consumerCpuMs: (cpu.user + cpu.system) / 1000,
      pagesWritten: r.pagesWritten,
      zeroPages: r.zeroPages,
      streamBytes: r.streamBytes,
      fileBytes: r.fileBytes,
      allocatedBytes: r.allocatedBytes,
      ramBytes: r.ramBytes,
      guestCheckOk: check.ok,
      ...(check.ok ? {} : { guestCheck: check.line }),
      guestRunningAfter: runningAfter,
    };
  } finally {
    events.stop();
    await rm(out, { force: true });
  }
}

// ---- one QEMU-only background snapshot --------------------------------------------------

async function measureBaseline(guest, target) {
  const qmp = guest.vm.qmp;
  const [caps, params] = await Promise.all([
    qmp.execute('query-migrate-capabilities'),
    qmp.execute('query-migrate-parameters'),
  ]);
  const wasOn = (name) => caps.find((c) => c.capability === name)?.state ?? false;
  const saved = { background: wasOn('background-snapshot'), events: wasOn('events') };
  await qmp.execute('migrate-set-capabilities', {
    capabilities: [
      { capability: 'background-snapshot', state: true },
      { capability: 'events', state: true },
    ],
  });
  await qmp.execute('migrate-set-parameters', { 'max-bandwidth': UNLIMITED_BANDWIDTH });
  const events = recordEvents(qmp);
  const childCpuBefore = await childrenCpuMs(guest.vm.pid);
  try {
    const done = waitMigrationEnd(qmp);
    const startedAt = nowWallMs();
    await qmp.execute('migrate', { uri: `exec:cat > ${target}` });
    const status = await done;
    const info = await finishedMigration(qmp);
    if (status !== 'completed' || info.status !== 'completed') {
      throw new Error(`QEMU's background snapshot to ${target} ended ${info.status}: ${info['error-desc']}`);
    }
    const completedAt = events.atMs('MIGRATION', 'completed');
    return {
      totalMs: completedAt - startedAt,
      qemuTotalMs: info['total-time'],
      qemuSetupMs: info['setup-time'],
      qemuDowntimeMs: info.downtime,
      pauseMs: events.pauseMs(),
      // cat is QEMU's child: its CPU shows in QEMU's cutime/cstime once QEMU has reaped it.
      consumerCpuMs: (await reapedChildrenCpuMs(guest.vm.pid, childCpuBefore)) - childCpuBefore,
      ...(target === '/dev/null' ? {} : { allocatedBytes: (await stat(target)).blocks * 512 }),
    };
  } finally {
    events.stop();
    if (target !== '/dev/null') await rm(target, { force: true });
    await qmp.execute('migrate-set-capabilities', {
      capabilities: [
        { capability: 'background-snapshot', state: saved.background },
        { capability: 'events', state: saved.events },
      ],
    });
    if (params['max-bandwidth'] !== undefined)
      await qmp.execute('migrate-set-parameters', { 'max-bandwidth': params['max-bandwidth'] });
  }
}

/**
 * query-migrate once QEMU has filled in the numbers: 7.2 sets status completed before it
 * computes total-time (migration.c: bg_migration_completion, then migration_iteration_finish),
 * so a query right after the event can read total-time 0.
 */
async function finishedMigration(qmp) {
  const deadline = Date.now() + 5000;
  for (;;) {
    const info = await qmp.execute('query-migrate');
    if (info.status !== 'completed' || info['total-time'] > 0 || Date.now() > deadline) return info;
    await sleep(5);
  }
}

/** Resolves with the migration's final status, from its MIGRATION events. */
function waitMigrationEnd(qmp) {
  return new Promise((resolvePromise, reject) => {
    const timer = setTimeout(() => {
      off();
      reject(new Error(`QEMU's background snapshot did not finish within ${BASELINE_TIMEOUT_MS} ms`));
    }, BASELINE_TIMEOUT_MS);
    timer.unref(); // a failed migrate command must not keep the process alive
    const off = qmp.on('MIGRATION', (e) => {
      if (['completed', 'failed', 'cancelled'].includes(e.data.status)) {
        clearTimeout(timer);
        off();
        resolvePromise(e.data.status);
      }
    });
  });
}

// ---- one guest size ---------------------------------------------------------------------

async function benchSize(options, workDir, memoryMiB, workloadMiB) {
  const guestDir = join(workDir, `guest-${memoryMiB}`);
  undo.push(() => rm(guestDir, { recursive: true, force: true }));
  log(`[${memoryMiB} MiB] booting the test guest (workload ${workloadMiB} MiB, TCG)`);
  const guest = await bootTestGuest({
    memoryMiB,
    workloadMiB,
    accel: 'tcg',
    dir: guestDir,
    extraArgs: options.qemuArgs,
  });
  undo.push(() => guest.stop());
  log(`[${memoryMiB} MiB] booted in ${guest.bootSeconds.toFixed(1)} s (QEMU pid ${guest.vm.pid})`);
  const runs = [];
  for (let i = 0; i < options.runs; i++) {
    // Rotate the order so that no kind always runs first (or right after another kind).
    const order = VARIANTS.map((_, k) => VARIANTS[(i + k) % VARIANTS.length]);
    const run = { run: i + 1, order, loadAvg1: +os.loadavg()[0].toFixed(2) };
    for (const kind of order) {
      if (options.gapMs > 0) await sleep(options.gapMs);
      // Start each measurement with a clean page cache: the writeback of the previous
      // measurement's file must not overlap this one.
      execFileSync('sync');
      const tag = `${memoryMiB}-${i + 1}-${kind}`;
      const thpMiB = await thpMappedMiB(guest.vm.pid);
      if (kind === 'qsnap') run.qsnap = { thpMiB, ...(await measureQsnap(guest, workDir, tag)) };
      else {
        const target = kind === 'devnull' ? '/dev/null' : join(workDir, `${tag}.bin`);
        run[kind] = { thpMiB, ...(await measureBaseline(guest, target)) };
        await ensureRunning(guest, tag);
      }
    }
    log(describeRun(memoryMiB, options.runs, run));
    runs.push(run);
  }
  await guest.stop();
  return { memoryMiB, workloadMiB, qemuPid: guest.vm.pid, bootSeconds: +guest.bootSeconds.toFixed(2), runs };
}

function describeRun(memoryMiB, total, { run, qsnap, devnull, file }) {
  const f = (n, d = 1) => (n === undefined ? '?' : n.toFixed(d));
  return (
    `[${memoryMiB} MiB] run ${run}/${total}: qsnap pause ${f(qsnap.downtimeMs)} ms ` +
    `(before migrate ${f(qsnap.beforeMigrateMs)} + QEMU setup ${qsnap.qemuSetupMs} + QEMU downtime ` +
    `${qsnap.qemuDowntimeMs}; THP ${f(qsnap.thpMiB, 0)} MiB), QEMU-alone pause ${f(devnull.pauseMs)} ms; ` +
    `total ${f(qsnap.totalMs / 1000, 2)} s vs ${f(devnull.totalMs / 1000, 2)} s (/dev/null), ` +
    `${f(file.totalMs / 1000, 2)} s (file)`
  );
}

// ---- summary ----------------------------------------------------------------------------

function stats(values) {
  const v = values.filter((x) => typeof x === 'number' && Number.isFinite(x)).sort((a, b) => a - b);
  if (!v.length) return undefined;
  const mid = v.length >> 1;
  const median = v.length % 2 ? v[mid] : (v[mid - 1] + v[mid]) / 2;
  return { median, min: v[0], max: v[v.length - 1], n: v.length };
}

/** For a row of 0/1 values: how many runs passed, in the shape of stats(). */
function count(values) {
  const passed = values.reduce((sum, v) => sum + v, 0);
  return { median: passed, min: passed, max: passed, n: values.length };
}

const MiB = 2 ** 20;

/** One row of the table: `of` picks its number from a run; `max` is the target. */
const row = (key, label, unit, of, extra = {}) => ({ key, label, unit, of, ...extra });
/** The pause minus its three measured parts: QEMU's async connect, the BH that resumes, waits for a CPU. */
const pauseRest = (q) =>
  q.beforeMigrateMs === undefined
    ? undefined
    : q.downtimeMs - q.beforeMigrateMs - q.qemuSetupMs - q.qemuDowntimeMs;
const ratio = (a, b) => (a === undefined || !b ? undefined : a / b);

const ROWS = [
  row('downtime_ms', 'guest pause, qsnap (STOP→RESUME)', 'ms', (r) => r.qsnap.downtimeMs, { max: 10 }),
  row('downtime_first_ms', '  first snapshot after boot', 'ms', (r) => r.qsnap.downtimeMs, { first: true }),
  row(
    'pause_before_migrate_ms',
    '  stop + disk transaction + migrate cmd',
    'ms',
    (r) => r.qsnap.beforeMigrateMs,
  ),
  row('pause_qemu_setup_ms', '  QEMU setup-time (populates RAM)', 'ms', (r) => r.qsnap.qemuSetupMs),
  row(
    'pause_qemu_downtime_ms',
    '  QEMU downtime (devices, write-protect)',
    'ms',
    (r) => r.qsnap.qemuDowntimeMs,
  ),
  row('pause_other_ms', '  the rest (QEMU connect, scheduling)', 'ms', (r) => pauseRest(r.qsnap)),
  row('baseline_pause_ms', 'guest pause, QEMU alone (→ /dev/null)', 'ms', (r) => r.devnull.pauseMs),
  row('load_avg', 'host load average (1 min) at the run', 'load', (r) => r.loadAvg1),
  row('thp_mib', 'guest RAM on huge pages before the run', 'MiB', (r) => r.qsnap.thpMiB),
  row('total_qsnap_ms', 'whole command, qsnap', 'ms', (r) => r.qsnap.totalMs),
  row(
    'qsnap_before_pause_ms',
    '  connect, probe, overlays (before pause)',
    'ms',
    (r) => r.qsnap.phasesMs.pause,
  ),
  row('qsnap_finish_ms', '  page table, manifest, fsync (after stream)', 'ms', (r) => r.qsnap.finishMs),
  row('total_devnull_ms', 'whole command, QEMU → /dev/null', 'ms', (r) => r.devnull.totalMs),
  row('total_file_ms', 'whole command, QEMU → file', 'ms', (r) => r.file.totalMs),
  row(
    'ratio_total_devnull',
    'ratio whole, qsnap / /dev/null',
    '×',
    (r) => ratio(r.qsnap.totalMs, r.devnull.totalMs),
    { max: 1.1 },
  ),
  row('ratio_total_file', 'ratio whole, qsnap / file', '×', (r) => ratio(r.qsnap.totalMs, r.file.totalMs)),
  row('stream_qsnap_ms', 'migration only (QEMU total-time), qsnap', 'ms', (r) => r.qsnap.qemuTotalMs),
  row('stream_devnull_ms', 'migration only, QEMU → /dev/null', 'ms', (r) => r.devnull.qemuTotalMs),
  row('stream_file_ms', 'migration only, QEMU → file', 'ms', (r) => r.file.qemuTotalMs),
  row(
    'ratio_stream_devnull',
    'ratio migration, qsnap / /dev/null',
    '×',
    (r) => ratio(r.qsnap.qemuTotalMs, r.devnull.qemuTotalMs),
    { max: 1.1 },
  ),
  row('ratio_stream_file', 'ratio migration, qsnap / file', '×', (r) =>
    ratio(r.qsnap.qemuTotalMs, r.file.qemuTotalMs),
  ),
  row('cpu_qsnap_ms', 'CPU of the receiving side, qsnap process', 'ms', (r) => r.qsnap.consumerCpuMs),
  row(
    'cpu_cat_devnull_ms',
    'CPU of the receiving side, cat → /dev/null',
    'ms',
    (r) => r.devnull.consumerCpuMs,
  ),
  row('file_allocated_mib', 'snapshot file, allocated', 'MiB', (r) => r.qsnap.allocatedBytes / MiB),
  row('ram_nonzero_mib', 'non-zero RAM pages × 4 KiB', 'MiB', (r) => (r.qsnap.pagesWritten * 4096) / MiB),
  row(
    'file_overhead_pct',
    'file overhead over non-zero RAM',
    '%',
    (r) => (r.qsnap.allocatedBytes / (r.qsnap.pagesWritten * 4096) - 1) * 100,
    { max: 1 },
  ),
  row('guest_checks_ok', 'guest invariant checks passed', 'runs', (r) => Number(r.qsnap.guestCheckOk), {
    count: true,
  }),
];

function summarize(sizes) {
  return ROWS.map((row) => {
    const values = {};
    for (const size of sizes) {
      const runs = row.first ? size.runs.slice(0, 1) : size.runs;
      const s = row.count ? count(runs.map(row.of)) : stats(runs.map(row.of));
      values[size.memoryMiB] = s
        ? { ...s, ...(row.max === undefined ? {} : { met: s.median <= row.max }) }
        : null;
    }
    return {
      key: row.key,
      label: row.label.trim(),
      unit: row.unit,
      ...(row.max === undefined ? {} : { target: `≤ ${row.max} ${row.unit}` }),
      values,
    };
  });
}

function formatNumber(n, unit) {
  if (unit === 'runs') return String(n);
  if (unit === '×' || unit === '%') return n.toFixed(2);
  return Math.abs(n) >= 1000 ? n.toFixed(0) : n.toFixed(1);
}

function formatTable(sizes, rows) {
  const header = [
    'metric',
    'unit',
    ...sizes.map((s) => `${s.memoryMiB} MiB (wl ${s.workloadMiB})`),
    'target',
  ];
  const body = ROWS.map((def, i) => {
    const row = rows[i];
    const cells = sizes.map((s) => {
      const v = row.values[s.memoryMiB];
      if (!v) return '–';
      if (def.count) return `${v.median}/${v.n}`;
      if (def.first) return formatNumber(v.median, row.unit);
      const range = `[${formatNumber(v.min, row.unit)}–${formatNumber(v.max, row.unit)}]`;
      return `${formatNumber(v.median, row.unit)} ${range}${v.met === false ? ' ✗' : ''}`;
    });
    return [def.label, row.unit, ...cells, row.target ?? ''];
  });
  const widths = header.map((h, c) => Math.max(h.length, ...body.map((r) => r[c].length)));
  const line = (cells) => `| ${cells.map((x, c) => x.padEnd(widths[c])).join(' | ')} |`;
  return [line(header), `|${widths.map((w) => '-'.repeat(w + 2)).join('|')}|`, ...body.map(line)].join('\n');
}

// ---- main -------------------------------------------------------------------------------

async function main() {
  const options = parseOptions(process.argv.slice(2));
  if (!existsSync(new URL('../dist/index.js', import.meta.url))) {
    console.error('bench-snapshot: dist/ is missing; run make build (or make bench-snapshot, which builds)');
    process.exit(2);
  }
  ({ snapshot } = await import('../dist/index.js'));
  ({ bootTestGuest } = await import('../dist/guest/test-guest.js'));
  const parent = options.outDir ?? os.tmpdir();
  await mkdir(parent, { recursive: true });
  const workDir = await mkdtemp(join(parent, 'qsnap-bench-'));
  undo.push(() => rm(workDir, { recursive: true, force: true }));
  // qsnap's intent records of this run stay in the work directory.
  process.env.QSNAP_STATE_DIR ??= join(workDir, 'state');
  if (options.thp) setThp(options.thp);
  const host = hostInfo();
  log(`qsnap bench: sizes ${options.sizes.join(', ')} MiB, ${options.runs} runs, work dir ${workDir}`);
  log(
    `host: ${host.cpus} cpus, ${host.qemu}, THP ${host.thp.enabled}/${host.thp.defrag}, load ${host.loadAvgStart.join(' ')}`,
  );
  const sizes = [];
  for (const [i, memoryMiB] of options.sizes.entries()) {
    sizes.push(await benchSize(options, workDir, memoryMiB, options.workloads[i]));
  }
  host.loadAvgEnd = os.loadavg().map((l) => +l.toFixed(2));
  const rows = summarize(sizes);
  const table = formatTable(sizes, rows);
  const result = {
    tool: 'qsnap scripts/bench-snapshot.mjs',
    date: new Date().toISOString(),
    host,
    options: { ...options, outDir: options.outDir ?? null },
    rows,
    sizes,
  };
  if (options.json) {
    console.error(`\n${table}`);
    console.log(JSON.stringify(result, null, 2));
  } else {
    console.log(
      `\n${table}\n\nload average ${host.loadAvgStart.join(' ')} → ${host.loadAvgEnd.join(' ')} (${host.cpus} cpus)`,
    );
  }
}

try {
  await main();
  await cleanup();
} catch (err) {
  console.error(`bench-snapshot failed: ${err?.stack ?? err}`);
  await cleanup();
  process.exitCode = 1;
}
