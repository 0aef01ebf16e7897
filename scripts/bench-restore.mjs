#!/usr/bin/env node
// `make bench-restore`: qsnap's restore against stock QEMU loading the same state, side by
// side in one run, for several guest sizes, plus the checkpoint-revert rate a test harness
// gets. For each size: boot the test guest, let its workload dirty memory, take one qsnap
// snapshot, export it as a raw QEMU stream (`qsnap export`), stop the guest. Then, run after
// run (order rotated):
//   lazy    qsnap restore --lazy (RAM mapped from the snapshot file)
//   full    qsnap restore (stream rebuilt from the file, every page verified)
//   stock   QEMU alone: the same command line with -incoming "exec:cat <raw stream>"
// each timed from the call (process start for stock) to the guest running, on a fresh disk
// overlay each time. Then Machine.revert() in a loop on the smallest size.
//
//   node scripts/bench-restore.mjs [--sizes 256,1024,2048] [--runs 5] [--reverts 10]
//       [--quick] [--json]
import { execFileSync } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { GuestConsole } from '../dist/guest/console.js';
import { bootTestGuest, testGuestSpec } from '../dist/guest/test-guest.js';
import { exportStream, Machine, restore, snapshot } from '../dist/index.js';
import { resolveAccel } from '../dist/vm/accel.js';
import { buildArgv } from '../dist/vm/args.js';
import { Vm } from '../dist/vm/launcher.js';
import { VmSpec } from '../dist/vm/spec.js';

const { values } = parseArgs({
  options: {
    sizes: { type: 'string', default: '256,1024,2048' },
    runs: { type: 'string', default: '5' },
    reverts: { type: 'string', default: '10' },
    quick: { type: 'boolean', default: false },
    json: { type: 'boolean', default: false },
  },
});
const sizes = values.quick ? [256] : values.sizes.split(',').map(Number);
const runs = values.quick ? 2 : Number(values.runs);
const reverts = values.quick ? 3 : Number(values.reverts);
const log = (line) => process.stderr.write(`${line}\n`);
const cleanups = [];
const median = (xs) => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length
    ? s.length % 2
      ? s[(s.length - 1) / 2]
      : (s[s.length / 2 - 1] + s[s.length / 2]) / 2
    : Number.NaN;
};

/** The guest's command line with its disk replaced by a fresh overlay on the frozen layer. */
function stockArgv(argv, frozenFile, overlayFile, stream) {
  execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', frozenFile, '-F', 'qcow2', overlayFile]);
  return [
    ...argv.map((a) => a.replace(`filename=${frozenFile}`, `filename=${overlayFile}`)),
    '-incoming',
    `exec:cat ${stream}`,
  ];
}

async function timeStock(argv, frozenFile, dir, stream, index) {
  const overlay = join(dir, `stock-${index}.qcow2`);
  const args = stockArgv(argv, frozenFile, overlay, stream);
  const started = performance.now();
  const vm = await Vm.launchArgv(args, {
    qmpPath: join(dir, 'qmp.sock'),
    runDir: join(dir, `stock-run-${index}`),
  });
  try {
    for (;;) {
      const info = await vm.qmp.execute('query-migrate');
      if (info.status === 'completed') break;
      if (info.status === 'failed') throw new Error(`stock QEMU failed to load: ${info['error-desc']}`);
      await new Promise((r) => setTimeout(r, 1));
    }
    await vm.qmp.execute('cont');
    return performance.now() - started;
  } finally {
    await vm.stop();
    await rm(overlay, { force: true });
  }
}

async function timeQsnap(file, argv, lazy, dir, index) {
  const started = performance.now();
  const result = await restore({
    file,
    argv: ['qemu-system-x86_64', ...argv],
    lazy,
    attached: true,
    runDir: join(dir, `run-${index}`),
  }).result;
  const wallMs = performance.now() - started;
  await result.vm.stop();
  for (const d of result.disks) await rm(d.overlayFile, { force: true });
  return { wallMs, restoreMs: result.restoreMs, loadMs: result.loadMs };
}

async function benchSize(sizeMiB) {
  const dir = await mkdtemp(join(os.tmpdir(), `qsnap-bench-restore-${sizeMiB}-`));
  cleanups.push(() => rm(dir, { recursive: true, force: true }));
  log(`# ${sizeMiB} MiB guest: boot, snapshot, export`);
  const guest = await bootTestGuest({
    dir: join(dir, 'vm'),
    memoryMiB: sizeMiB,
    workloadMiB: Math.min(512, sizeMiB / 4),
  });
  cleanups.push(() => guest.stop());
  await guest.console.nextHeartbeat({ timeoutMs: 30_000 });
  const file = join(dir, 'snap.qsnap');
  const snap = await snapshot({ qmp: guest.vm.qmpPath, out: file }).result;
  const stream = join(dir, 'snap.stream');
  await exportStream({ file, out: stream }).result;
  const argv = guest.argv;
  await guest.console.close();
  await guest.vm.stop();
  const frozen = snap.disks[0].frozenFile;
  const rows = { lazy: [], full: [], stock: [] };
  const order = ['lazy', 'full', 'stock'];
  for (let run = 0; run < runs; run++) {
    for (let k = 0; k < order.length; k++) {
      const kind = order[(run + k) % order.length];
      if (kind === 'stock') rows.stock.push(await timeStock(argv, frozen, dir, stream, run));
      else rows[kind].push((await timeQsnap(file, argv, kind === 'lazy', dir, `${kind}-${run}`)).wallMs);
    }
    log(
      `  run ${run + 1}: lazy ${rows.lazy.at(-1).toFixed(0)} ms, full ${rows.full.at(-1).toFixed(0)} ms, stock ${rows.stock.at(-1).toFixed(0)} ms`,
    );
  }
  return {
    sizeMiB,
    dataPages: snap.pagesWritten,
    lazyMs: rows.lazy,
    fullMs: rows.full,
    stockMs: rows.stock,
    argv,
    file,
    dir,
  };
}

async function benchReverts(sizeMiB) {
  const dir = await mkdtemp(join(os.tmpdir(), 'qsnap-bench-revert-'));
  cleanups.push(() => rm(dir, { recursive: true, force: true }));
  // The command line a user would give: the test guest's, built from its spec.
  const disk = join(dir, 'disk.qcow2');
  execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', disk, '80M']);
  const spec = VmSpec.parse(
    testGuestSpec(dir, disk, { memoryMiB: sizeMiB, workloadMiB: Math.min(512, sizeMiB / 4) }),
  );
  const { argv, serial } = buildArgv(spec, { runDir: dir, accel: (await resolveAccel(spec.accel)).accel });
  const machine = await Machine.launch({ argv: ['qemu-system-x86_64', ...argv] });
  cleanups.push(() => machine.close());
  const guestConsole = await GuestConsole.connect(serial.socket);
  await guestConsole.waitReady({ timeoutMs: 60_000 });
  await guestConsole.close();
  const checkpoint = await machine.checkpoint('base');
  const each = [];
  const started = performance.now();
  for (let i = 0; i < reverts; i++) each.push((await machine.revert(checkpoint)).revertMs);
  const perSecond = reverts / ((performance.now() - started) / 1000);
  return { sizeMiB, reverts, perSecond, medianMs: median(each), eachMs: each };
}

async function main() {
  const results = [];
  for (const size of sizes) results.push(await benchSize(size));
  const revert = await benchReverts(sizes[0]);
  const table = [
    '| guest | lazy restore (median) | full restore (median) | stock QEMU load (median) | full / stock |',
    '|---|---|---|---|---|',
    ...results.map(
      (r) =>
        `| ${r.sizeMiB} MiB | ${median(r.lazyMs).toFixed(0)} ms | ${median(r.fullMs).toFixed(0)} ms | ${median(r.stockMs).toFixed(0)} ms | ${(median(r.fullMs) / median(r.stockMs)).toFixed(2)}× |`,
    ),
    '',
    `| revert rate (${revert.sizeMiB} MiB, lazy) | ${revert.perSecond.toFixed(2)} reverts/s | median ${revert.medianMs.toFixed(0)} ms per revert |`,
    '|---|---|---|',
  ].join('\n');
  if (values.json) {
    process.stderr.write(`${table}\n`);
    process.stdout.write(
      `${JSON.stringify({ sizes: results.map(({ argv, file, dir, ...r }) => r), revert }, null, 2)}\n`,
    );
  } else {
    process.stdout.write(`${table}\n`);
  }
}

let failed = false;
process.once('SIGINT', () => {
  failed = true;
});
try {
  await main();
} catch (err) {
  failed = true;
  log(`bench-restore failed: ${err.stack ?? err}`);
} finally {
  for (const cleanup of cleanups.reverse())
    await Promise.resolve()
      .then(cleanup)
      .catch(() => undefined);
}
process.exitCode = failed ? 1 : 0;
