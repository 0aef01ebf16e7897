#!/usr/bin/env node
// `make bench-precopy`: what a snapshot of a lazily restored VM costs against a background
// snapshot of the same guest. Boots the test guest (256 MiB, workload running), takes `runs`
// background snapshots of it, snapshots it once more into a directory on a disk filesystem,
// stops it and restores it from there with --lazy: its RAM is now a private mapping of that
// file, which userfaultfd cannot write-protect, so qsnap snapshots it by pre-copy — `runs`
// times with the strategy qsnap picks (live-precopy; stopped-precopy on QEMU < 9.0 under TCG),
// and with --force-live also `runs` times live-precopy forced by its test fault (on 7.2 TCG
// those snapshots are not consistent: the timings only). The workload's check runs after each.
//
//   node scripts/bench-precopy.mjs [--runs 5] [--qemu <qemu-system-x86_64>] [--dir <dir>]
//       [--force-live] [--tuning '{"downtimeLimitMs":300}'] [--workload-mib 64]
//       [--max-bandwidth <MiB/s>] [--skip-background] [--json]
//
// --dir must be on a disk filesystem (default: .qsnap/bench-precopy in the checkout); for the
// chroot'ed QEMU 10 of scripts/qemu-chroot.sh, a directory under its WORK.
import { execFileSync } from 'node:child_process';
import { mkdir, mkdtemp, rm, statfs } from 'node:fs/promises';
import os from 'node:os';
import { join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { TMPFS_MAGIC } from '../dist/engine/ram-protection.js';
import { GuestConsole } from '../dist/guest/console.js';
import { bootTestGuest } from '../dist/guest/test-guest.js';
import { restore, snapshot } from '../dist/index.js';

const ROOT = resolve(fileURLToPath(new URL('..', import.meta.url)));
const { values } = parseArgs({
  options: {
    runs: { type: 'string', default: '5' },
    qemu: { type: 'string' },
    dir: { type: 'string', default: join(ROOT, '.qsnap', 'bench-precopy') },
    'force-live': { type: 'boolean', default: false },
    tuning: { type: 'string' },
    'workload-mib': { type: 'string', default: '64' },
    'max-bandwidth': { type: 'string' },
    'skip-background': { type: 'boolean', default: false },
    'gap-ms': { type: 'string', default: '500' },
    json: { type: 'boolean', default: false },
  },
});
const runs = Number(values.runs);
const gapMs = Number(values['gap-ms']);
const tuning = values.tuning ? JSON.parse(values.tuning) : undefined;
const maxBandwidth = values['max-bandwidth'] ? Number(values['max-bandwidth']) * 2 ** 20 : undefined;
const log = (line) => process.stderr.write(`${line}\n`);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function stats(xs) {
  const s = [...xs].sort((a, b) => a - b);
  const median = s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
  return { median, min: s[0], max: s[s.length - 1], n: s.length };
}

/** One snapshot of `qmp`, timed, then the workload's check on the guest's console. */
/** QEMU's events during one snapshot, by name and status, in ms since the STOP (first of each). */
function recordEvents(monitor) {
  const seen = [];
  const offs = ['STOP', 'RESUME', 'MIGRATION'].map((name) => monitor.on(name, (e) => seen.push(e)));
  return () => {
    for (const off of offs) off();
    const first = (name, status) =>
      seen.find((e) => e.event === name && (status === undefined || e.data.status === status))?.timestampUs;
    const stop = first('STOP');
    const at = (name, status) => {
      const t = first(name, status);
      return t === undefined || stop === undefined ? Number.NaN : (t - stop) / 1000;
    };
    return {
      preSwitchover: at('MIGRATION', 'pre-switchover'),
      device: at('MIGRATION', 'device'),
      setup: at('MIGRATION', 'setup'),
      completed: at('MIGRATION', 'completed'),
      resume: at('RESUME'),
    };
  };
}

async function measure(kind, qmp, guestConsole, out, faults, monitor) {
  execFileSync('sync');
  await guestConsole.nextHeartbeat({ timeoutMs: 20_000 });
  const events = recordEvents(monitor);
  const r = await snapshot({
    qmp,
    out,
    ...(faults ? { faults: new Set(faults) } : {}),
    ...(maxBandwidth ? { maxBandwidth } : {}),
    ...(tuning ? { precopy: tuning } : {}),
  }).result;
  const t = events();
  const check = await guestConsole.check({ timeoutMs: 60_000 });
  await rm(out, { force: true });
  const row = {
    kind,
    strategy: r.strategy,
    pauseMs: r.downtimeMs,
    totalMs: r.totalMs,
    streamMiB: r.streamBytes / 2 ** 20,
    duplicatePages: r.duplicatePages,
    passes: r.precopy?.passes ?? 0,
    precopyMs: r.precopy?.precopyMs ?? 0,
    throttlePercent: r.precopy?.throttlePercent ?? 0,
    // The pause's parts, from QEMU's events. live-precopy: QEMU's last dirty sync (STOP →
    // pre-switchover), qsnap's freeze and migrate-continue (→ device), the last pages and the
    // device state (→ completed), qsnap's resume (→ RESUME). stopped-precopy: qsnap's stop,
    // freeze and migrate (STOP → setup), all of RAM (→ completed), the resume.
    syncMs: t.preSwitchover,
    freezeMs: r.strategy === 'live-precopy' ? t.device - t.preSwitchover : t.setup,
    lastPagesMs: r.strategy === 'live-precopy' ? t.completed - t.device : t.completed - t.setup,
    resumeMs: t.resume - t.completed,
    checkOk: check.ok,
  };
  log(
    `${kind.padEnd(12)} ${r.strategy.padEnd(20)} pause ${row.pauseMs.toFixed(1).padStart(7)} ms  total ${row.totalMs.toFixed(0).padStart(6)} ms  ` +
      `stream ${row.streamMiB.toFixed(0).padStart(5)} MiB  dup ${String(row.duplicatePages).padStart(7)}  passes ${row.passes}  ` +
      `parts ${[row.syncMs, row.freezeMs, row.lastPagesMs, row.resumeMs].map((x) => (Number.isNaN(x) ? '-' : x.toFixed(0))).join('/')} ms  ` +
      `check ${check.ok ? 'ok' : check.line}`,
  );
  await sleep(gapMs);
  return row;
}

async function main() {
  await mkdir(values.dir, { recursive: true });
  const dir = await mkdtemp(join(resolve(values.dir), 'run-'));
  const qemuOpt = values.qemu ? { qemuBinary: values.qemu } : {};
  const rows = [];
  let guest;
  let restored;
  let restoredConsole;
  try {
    if ((await statfs(dir)).type === TMPFS_MAGIC)
      throw new Error(`${dir} is on tmpfs: choose --dir on a disk`);
    process.env.TMPDIR = dir;
    process.env.QSNAP_STATE_DIR = join(dir, 'state');
    guest = await bootTestGuest({
      dir: join(dir, 'vm'),
      accel: 'tcg',
      workloadMiB: Number(values['workload-mib']),
      ...qemuOpt,
    });
    const version = (await guest.vm.qmp.execute('query-version')).qemu;
    log(
      `QEMU ${version.major}.${version.minor}.${version.micro}, load ${os.loadavg()[0].toFixed(1)}, ${dir}`,
    );
    for (let i = 0; i < (values['skip-background'] ? 0 : runs); i++)
      rows.push(
        await measure(
          'background',
          guest.vm.qmpPath,
          guest.console,
          join(dir, `bg-${i}.qsnap`),
          undefined,
          guest.vm.qmp,
        ),
      );
    const mapped = join(dir, 'mapped.qsnap');
    await snapshot({ qmp: guest.vm.qmpPath, out: mapped }).result;
    const argv = values.qemu ? [values.qemu, ...guest.argv] : guest.argv;
    const serial = guest.vm.serial.socket;
    await guest.stop();
    guest = undefined;
    restored = (await restore({ file: mapped, argv, lazy: true, attached: true }).result).vm;
    restoredConsole = await GuestConsole.connect(serial);
    await restoredConsole.waitReady({ timeoutMs: 30_000 });
    for (let i = 0; i < runs; i++)
      rows.push(
        await measure(
          'lazy',
          restored.qmpPath,
          restoredConsole,
          join(dir, `lazy-${i}.qsnap`),
          undefined,
          restored.qmp,
        ),
      );
    if (values['force-live'])
      for (let i = 0; i < runs; i++)
        rows.push(
          await measure(
            'lazy-forced',
            restored.qmpPath,
            restoredConsole,
            join(dir, `forced-${i}.qsnap`),
            ['live-precopy-on-tcg'],
            restored.qmp,
          ),
        );
  } finally {
    await restoredConsole?.close().catch(() => undefined);
    await restored?.stop().catch(() => restored.kill());
    await guest?.stop().catch(() => guest.vm.kill());
    await rm(dir, { recursive: true, force: true });
  }
  report(rows);
}

function report(rows) {
  const kinds = [...new Set(rows.map((r) => r.kind))];
  const summary = Object.fromEntries(
    kinds.map((kind) => {
      const of = rows.filter((r) => r.kind === kind);
      const pick = (key) => stats(of.map((r) => r[key]));
      return [
        kind,
        {
          strategy: of[0].strategy,
          pauseMs: pick('pauseMs'),
          totalMs: pick('totalMs'),
          streamMiB: pick('streamMiB'),
          duplicatePages: pick('duplicatePages'),
          passes: pick('passes'),
          precopyMs: pick('precopyMs'),
          syncMs: pick('syncMs'),
          freezeMs: pick('freezeMs'),
          lastPagesMs: pick('lastPagesMs'),
          resumeMs: pick('resumeMs'),
          checks: `${of.filter((r) => r.checkOk).length}/${of.length}`,
        },
      ];
    }),
  );
  const cell = (s, digits = 0) =>
    `${s.median.toFixed(digits)} [${s.min.toFixed(digits)}–${s.max.toFixed(digits)}]`;
  for (const [kind, s] of Object.entries(summary)) {
    const parts =
      s.strategy === 'background-snapshot'
        ? ''
        : `, pause parts ${['syncMs', 'freezeMs', 'lastPagesMs', 'resumeMs']
            .filter((k) => !Number.isNaN(s[k].median))
            .map((k) => `${k.replace('Ms', '')} ${cell(s[k])}`)
            .join(', ')} ms`;
    log(
      `${kind} (${s.strategy}): pause ${cell(s.pauseMs, 1)} ms, total ${cell(s.totalMs)} ms, stream ${cell(s.streamMiB)} MiB, ` +
        `duplicates ${cell(s.duplicatePages)}, passes ${cell(s.passes)}, pre-copy ${cell(s.precopyMs)} ms${parts}, checks ${s.checks}`,
    );
  }
  if (values.json) process.stdout.write(`${JSON.stringify({ summary, rows }, null, 2)}\n`);
}

await main();
