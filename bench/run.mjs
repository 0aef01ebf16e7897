// One guest size on one QEMU: boot the test guest once, then run after run every path's save
// and restore on it, in an order rotated from run to run, and finally the revert loop.
import { execFileSync } from 'node:child_process';
import { mkdir } from 'node:fs/promises';
import os from 'node:os';
import { join } from 'node:path';
import { BenchGuest } from './lib/guest.mjs';
import { measureSave } from './lib/measure.mjs';
import { collapseChain, UNLIMITED_BANDWIDTH } from './lib/qemu.mjs';
import bgSnapshot from './paths/bg-snapshot.mjs';
import mappedRam from './paths/mapped-ram.mjs';
import qsnap, { qsnapUnix } from './paths/qsnap.mjs';
import { measureReverts } from './paths/revert.mjs';
import savevm from './paths/savevm.mjs';
import virshSave from './paths/virsh-save.mjs';

export const PATHS = [savevm, virshSave, mappedRam, bgSnapshot, qsnap, qsnapUnix];

/**
 * @param qemu {label, binary, major}
 * @param undo the caller's clean-up list: the guest goes on it while it runs
 */
export async function benchSize({ qemu, memoryMiB, workloadMiB, runs, reverts, idleMs, workDir, log, undo }) {
  const dir = join(workDir, `q${qemu.label}-${memoryMiB}`);
  await mkdir(dir, { recursive: true });
  const name = `[QEMU ${qemu.label}, ${memoryMiB} MiB]`;
  log(`${name} booting the test guest (workload ${workloadMiB} MiB, TCG)`);
  const guest = await BenchGuest.boot({ dir: join(dir, 'vm'), memoryMiB, workloadMiB, qemu: qemu.binary });
  const closeGuest = () => guest.close();
  undo.push(closeGuest);
  log(`${name} booted in ${guest.bootSeconds.toFixed(1)} s (QEMU pid ${guest.pid})`);
  // What qsnap and libvirt's save both do: no bandwidth limit for a migration to a file.
  await guest.qmp.execute('migrate-set-parameters', { 'max-bandwidth': UNLIMITED_BANDWIDTH });
  const paths = PATHS.filter((p) => p.available(qemu.major));
  const results = [];
  for (let i = 0; i < runs; i++) {
    const order = paths.map((_, k) => paths[(i + k) % paths.length]);
    const run = {
      run: i + 1,
      order: order.map((p) => p.id),
      loadAvg1: +os.loadavg()[0].toFixed(2),
      rows: {},
    };
    for (const path of order) {
      // The writeback of one path's file must not overlap the next measurement.
      execFileSync('sync');
      const ctx = { guest, dir, tag: `${i + 1}-${path.id}`, major: qemu.major };
      const prepared = path.prepare ? await path.prepare(ctx) : undefined;
      const { figures, restore } = await measureSave(guest, idleMs, () => path.save(ctx, prepared));
      if (path.checkAfter) figures.guestCheckOk = await guest.check();
      const restored = await path.restore(ctx, restore);
      run.rows[path.id] = figures;
      for (const [rowId, restoreMs] of Object.entries(restored)) {
        run.rows[rowId] = { ...(rowId === path.id ? figures : {}), restoreMs };
      }
      await collapseChain(guest.qmp);
    }
    log(`${name} run ${i + 1}/${runs}: ${describeRun(run)}`);
    results.push(run);
  }
  const revert = await measureReverts(guest, reverts);
  log(
    `${name} ${reverts} reverts: ${revert.revertMs.map((ms) => ms.toFixed(0)).join(', ')} ms ` +
      `(${revert.warm.filter(Boolean).length} by the warm spare); back to back: ` +
      `${revert.backToBackMs.map((ms) => ms.toFixed(0)).join(', ')} ms`,
  );
  const qemuPid = guest.pid;
  undo.splice(undo.indexOf(closeGuest), 1);
  await guest.close();
  return {
    memoryMiB,
    workloadMiB,
    bootSeconds: +guest.bootSeconds.toFixed(2),
    qemuPid,
    paths: paths.map((p) => p.id),
    runs: results,
    revert,
  };
}

function describeRun(run) {
  const f = (n) => (n === undefined ? '?' : n.toFixed(0));
  return run.order
    .map((id) => {
      const r = run.rows[id];
      return `${id} pause ${f(r.pauseMs)} total ${f(r.totalMs)} restore ${f(r.restoreMs)}`;
    })
    .join('; ');
}
