import { rm } from 'node:fs/promises';
import { join } from 'node:path';
import type { QmpClient } from '../../qmp/index.js';
import { discardOverlays } from '../disks/freeze.js';
import type { Intent, IntentStore } from '../intent.js';
import { MIGRATION_UNSETTLED, pollMigration, restoreMigration } from '../migration.js';
import { killLeftPlaceholder, PLACEHOLDER_PID_FILE } from './pipe-source.js';
import { waitRunStateSettled } from './waits.js';

export interface RecoveryReport {
  recovered: boolean;
  resumed: boolean;
  actions: string[];
  overlaysInUse: { device: string; overlayFile: string }[];
}

/**
 * Put a VM back in order after a qsnap that died mid-operation: let its migration end, resume
 * the guest if it ran before, remove overlays and temporary files nothing uses, put the
 * migration settings back. Safe to call on every connect: it does nothing unless a record
 * exists whose owner is gone.
 */
export async function recoverStaleIntent(
  intents: IntentStore,
  qmpPath: string,
  qmp: QmpClient,
): Promise<RecoveryReport> {
  const report: RecoveryReport = { recovered: false, resumed: false, actions: [], overlaysInUse: [] };
  const stale = await intents.findStale(qmpPath);
  if (!stale) return report;
  report.recovered = true;
  const { intent } = stale;
  if (intent) {
    const before = await qmp.execute('query-status');
    await settleMigration(qmp, intent, report);
    if (intent.vmWasRunning) await resumeGuest(qmp, intent, report, before.status);
    await releaseOverlays(qmp, intent, report);
    if (intent.migration) {
      await restoreMigration(qmp, { saved: intent.migration }).catch(() => undefined);
      report.actions.push('restored migration settings');
    }
    if (intent.operation === 'merge') await dismissMergeJobs(qmp, report);
    for (const file of intent.tempFiles) await rm(file, { force: true, recursive: true });
    if (intent.tempFiles.length) report.actions.push(`removed ${intent.tempFiles.length} temporary file(s)`);
  }
  await stale.remove();
  return report;
}

/**
 * A background snapshot the dead qsnap began is being read to its end by its drain guard
 * (drain-guard.ts): cancelling it would hang the guest on QEMU 7.2, so wait for it. A plain
 * migration is cancelled, in any state: one held in `pre-switchover` (a live-precopy whose
 * qsnap died in the switchover pause, the guest stopped) ends `cancelled` and QEMU resumes the
 * guest (verified on 7.2 and 10.0).
 */
async function settleMigration(qmp: QmpClient, intent: Intent, report: RecoveryReport): Promise<void> {
  const info = await qmp.execute('query-migrate');
  if (!MIGRATION_UNSETTLED.has(info.status ?? 'none')) return;
  const caps = await qmp.execute('query-migrate-capabilities');
  const background = caps.some((c) => c.capability === 'background-snapshot' && c.state);
  if (!background) {
    await qmp.execute('migrate_cancel');
    report.actions.push('cancelled the unfinished migration');
    // Over a pipe (pipe-source.ts), a placeholder the dead qsnap had not killed yet would keep
    // the cancelled migration blocked until its sleep ends.
    for (const dir of intent.tempFiles)
      if (killLeftPlaceholder(join(dir, PLACEHOLDER_PID_FILE)))
        report.actions.push('stopped the migration pipe placeholder');
  }
  const settled = await pollMigration(qmp, {
    done: (status) => !MIGRATION_UNSETTLED.has(status),
    intervalMs: 50,
    timeoutMs: 10 * 60_000,
  });
  if (background)
    report.actions.push(`let the interrupted background snapshot run out (${settled.info.status})`);
}

/**
 * A store merge (block-stream) goes on in QEMU when qsnap dies; once it concluded it waits to be
 * dismissed (auto-dismiss off, so its error can be read). The next command reads the result
 * off the image headers.
 */
async function dismissMergeJobs(qmp: QmpClient, report: RecoveryReport): Promise<void> {
  const deadline = Date.now() + 10 * 60_000;
  for (;;) {
    const jobs = (await qmp.execute('query-jobs')).filter((j) => j.id.startsWith('qsnap-merge-'));
    for (const job of jobs.filter((j) => j.status === 'concluded')) {
      await qmp.execute('job-dismiss', { id: job.id });
      report.actions.push(`dismissed the finished merge ${job.id}${job.error ? ` (${job.error})` : ''}`);
    }
    if (jobs.every((j) => j.status === 'concluded') || Date.now() > deadline) return;
    await new Promise((r) => setTimeout(r, 50)); // a merge still copying: let it finish first
  }
}

/** Run states a dead qsnap leaves a guest in that it had been running before. */
const LEFT_STOPPED = new Set(['paused', 'postmigrate', 'finish-migrate']);

/**
 * Resume a guest the dead qsnap left stopped. A cancelled pre-copy migration resumes a guest
 * QEMU stopped for its switchover by itself (7.2 and 10.0): that is reported as a resume too.
 */
async function resumeGuest(
  qmp: QmpClient,
  intent: Intent,
  report: RecoveryReport,
  before: string,
): Promise<void> {
  const status = await waitRunStateSettled(qmp);
  if (status.running) {
    if (LEFT_STOPPED.has(before)) {
      report.resumed = true;
      report.actions.push(`the guest left ${before} by qsnap pid ${intent.owner.pid} runs again`);
    }
    return;
  }
  if (!LEFT_STOPPED.has(status.status)) return;
  await qmp.execute('cont');
  report.resumed = true;
  report.actions.push(`resumed the guest left ${status.status} by qsnap pid ${intent.owner.pid}`);
}

/**
 * An overlay not marked in use may still be: qsnap can die between the transaction and the
 * record's update. Only a node QEMU lets go of (or never had) loses its file.
 */
async function releaseOverlays(qmp: QmpClient, intent: Intent, report: RecoveryReport): Promise<void> {
  const unused = intent.overlays.filter((o) => !o.inUse);
  const kept = new Set(await discardOverlays(qmp, unused));
  for (const overlay of intent.overlays) {
    if (overlay.inUse || kept.has(overlay)) {
      report.overlaysInUse.push({ device: overlay.device, overlayFile: overlay.overlayFile });
      report.actions.push(`disk ${overlay.device} now writes to ${overlay.overlayFile}`);
    } else {
      report.actions.push(`removed unused overlay ${overlay.overlayFile}`);
    }
  }
}
