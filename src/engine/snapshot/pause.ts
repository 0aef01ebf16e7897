import { join } from 'node:path';
import { flushImages, freezeActions, prepareOverlays } from '../disks/freeze.js';
import { SnapshotError } from '../errors.js';
import { hangForever } from '../faults.js';
import { configureMigration, type MigrationSettings, type MigrationWant } from '../migration.js';
import { versionAtLeast } from '../probe.js';
import { isRamNotWriteProtectable } from '../ram-protection.js';
import type { SnapshotContext, SnapshotRun } from './context.js';
import { prefaultFileRam } from './prefault.js';
import { precopyStrategy } from './preflight.js';
import { precopyTuning } from './tuning.js';
import { cancelled, qemuGone, timeout, waitRunStateSettled } from './waits.js';

/**
 * The steps around the guest's pause: everything that can be done while it runs is done
 * before (migration settings, overlays opened, the socket listening, images flushed); in the
 * pause only `stop`, one transaction and `migrate`; the guest resumes as soon as QEMU has
 * captured the device state. (live-precopy pauses differently: switchover.ts.)
 */

/** While the guest runs: qsnap's migration settings, the overlays opened in QEMU, the socket. */
export async function prepare(ctx: SnapshotContext, run: SnapshotRun): Promise<void> {
  const { qmp, intent } = ctx;
  ctx.op.phase('prepare');
  run.settings = await configure(ctx);
  await intent.update({ tempFiles: [run.socketDir], migration: run.settings.saved });
  await prepareOverlays(qmp, ctx.overlays);
  // RAM mapped from a file (a lazy restore): its page faults taken now, not in the pause.
  if (ctx.strategy === 'background-snapshot') await prefaultFileRam(qmp, ctx.qemuPid);
  await run.receiver.listen();
  ctx.op.phase('prepared');
  await intent.update({ stage: ctx.strategy === 'live-precopy' ? 'precopy' : 'paused' });
  // Write the images' dirty host pages out now, so the flush QEMU does inside the
  // transaction (in the pause) has little left to do.
  await flushImages(ctx.overlays);
}

/**
 * qsnap's migration settings for the strategy. A background snapshot QEMU refuses because it
 * cannot write-protect guest RAM (ram-protection.ts) becomes a live-precopy of a running guest,
 * a stopped-precopy of a paused one; QEMU changed nothing when it refused.
 */
async function configure(ctx: SnapshotContext): Promise<MigrationSettings> {
  try {
    return await configureMigration(ctx.qmp, migrationWant(ctx));
  } catch (err) {
    if (ctx.strategy !== 'background-snapshot' || !isRamNotWriteProtectable(err)) throw err;
    ctx.strategy = precopyStrategy(ctx.vm, ctx.faults);
    const memPath = err.details['memPath'];
    ctx.op.emit({
      type: 'info',
      message: `QEMU cannot write-protect guest RAM mapped from ${memPath}: snapshot by ${ctx.strategy} instead`,
      data: { strategy: ctx.strategy, memPath },
    });
    if (ctx.vm.running && ctx.strategy === 'stopped-precopy')
      ctx.op.warn(
        'QSNAP_PRECOPY_STOPPED',
        `QEMU ${ctx.vm.qemu.text} under TCG loses dirty pages in a live pre-copy (fixed in QEMU 9.0): the guest is paused while all of its RAM is sent`,
      );
    return configureMigration(ctx.qmp, migrationWant(ctx));
  }
}

function migrationWant(ctx: SnapshotContext): MigrationWant {
  const maxBandwidth = ctx.options.maxBandwidth;
  if (ctx.strategy === 'background-snapshot') return { mode: 'background', maxBandwidth };
  if (ctx.strategy === 'stopped-precopy') return { mode: 'precopy', maxBandwidth };
  const tuning = precopyTuning(ctx.options.precopy);
  return {
    mode: 'switchover',
    maxBandwidth,
    downtimeLimitMs: tuning.downtimeLimitMs,
    autoConverge: tuning.autoConverge,
  };
}

/** Pause the guest (if it runs) and switch every disk to its overlay in one transaction. */
export async function pauseAndFreeze(ctx: SnapshotContext, run: SnapshotRun): Promise<void> {
  if (ctx.strategy === 'stopped-precopy' && ctx.faults.has('precopy-freeze-early'))
    await freezeEarly(ctx, run);
  ctx.op.phase('pause');
  // stop and transaction are sent back to back: QMP runs them in order, one round trip less.
  const stopped = ctx.vm.running
    ? ctx.qmp.execute('stop').then(() => ctx.op.phase('paused'))
    : Promise.resolve();
  if (ctx.faults.has('after-stop')) {
    await stopped;
    hangForever();
  }
  if (run.pause.frozen) await stopped;
  else await freezeDisks(ctx, run, stopped);
}

/** Fault `precopy-freeze-early`: the disks frozen while the guest runs, a second before the RAM instant. */
export async function freezeEarly(ctx: SnapshotContext, run: SnapshotRun): Promise<void> {
  await freezeDisks(ctx, run);
  await new Promise((r) => setTimeout(r, 1000));
}

/**
 * Switch every disk to its overlay in one transaction (the guest paused), sent right behind
 * `before` (the `stop`, if any). Records the overlays as in use without waiting: the guest is
 * paused, and the next update waits for it. Until then a recovery still keeps these files:
 * QEMU refuses to delete a node in use.
 */
export async function freezeDisks(
  ctx: SnapshotContext,
  run: SnapshotRun,
  before: Promise<unknown> = Promise.resolve(),
): Promise<void> {
  const { qmp, overlays } = ctx;
  const freeze = overlays.length
    ? qmp.execute('transaction', { actions: freezeActions(overlays) }).catch((err: unknown) => {
        throw new SnapshotError(
          'QSNAP_SNAPSHOT_DISK',
          `QEMU could not freeze the disks: ${(err as Error).message}`,
          {
            hint: 'check the disks with qsnap status; the guest was resumed and nothing changed',
            cause: err,
          },
        );
      })
    : Promise.resolve();
  freeze.catch(() => undefined);
  await before;
  await freeze;
  if (overlays.length === 0) return;
  run.pause.frozen = true;
  void ctx.intent
    .update({ overlays: ctx.intent.current.overlays.map((o) => ({ ...o, inUse: true })) })
    .catch(() => undefined);
  ctx.op.phase('frozen');
}

/** `migrate` to qsnap's socket; for a background snapshot, resume the guest once QEMU captured. */
export async function startMigration(
  ctx: SnapshotContext,
  run: SnapshotRun,
  migrationFailed: Promise<never>,
): Promise<void> {
  const uri = ctx.faults.has('bad-migration-socket')
    ? `unix:${join(run.socketDir, 'nobody.sock')}`
    : run.receiver.uri;
  await ctx.qmp.execute('migrate', { uri });
  run.pause.migrating = true;
  run.receiver.attach();
  if (ctx.faults.has('fail-after-migrate'))
    throw new SnapshotError('QSNAP_SNAPSHOT_MIGRATION', 'injected fault: failed right after migrate');
  ctx.op.phase('migrating');
  if (ctx.strategy !== 'background-snapshot') return;
  await waitForCapture(ctx, run, migrationFailed);
  if (ctx.vm.running) await resumeAfterCapture(ctx, run);
}

async function waitForCapture(ctx: SnapshotContext, run: SnapshotRun, failed: Promise<never>): Promise<void> {
  const timeoutMs = ctx.options.captureTimeoutMs ?? 60_000;
  const limit = timeout(
    timeoutMs,
    () =>
      new SnapshotError(
        'QSNAP_SNAPSHOT_MIGRATION',
        `QEMU did not capture the device state within ${timeoutMs} ms`,
        {
          hint: 'the host may be overloaded; the guest was resumed and no snapshot was written',
        },
      ),
  );
  try {
    await Promise.race([
      run.receiver.captured,
      run.receiver.done.then(() => undefined),
      failed,
      qemuGone(ctx.qmp),
      cancelled(ctx.op.signal),
      limit.promise,
    ]);
  } finally {
    limit.clear();
  }
  ctx.op.phase('captured');
}

/**
 * QEMU 7.2–8.2 resume the guest by themselves right after the capture; ≥ 9.0 restore the
 * run state from before `migrate` (paused, since we stopped it), so qsnap resumes it — only
 * now, once the first RAM section proves the capture is done.
 */
async function resumeAfterCapture(ctx: SnapshotContext, run: SnapshotRun): Promise<void> {
  const { qmp } = ctx;
  if (versionAtLeast(ctx.vm.qemu.version, 9, 0)) await qmp.execute('cont');
  if (!run.pause.resumeEvent) {
    try {
      await qmp.waitFor('RESUME', undefined, { timeoutMs: 5000 });
    } catch {
      const status = await qmp.execute('query-status');
      if (!status.running) {
        ctx.op.warn('QSNAP_RESUME_LATE', 'QEMU did not resume the guest after the capture; qsnap resumed it');
        await qmp.execute('cont');
        await qmp.waitFor('RESUME', undefined, { timeoutMs: 5000 }).catch(() => undefined);
      }
    }
  }
  ctx.op.phase('resumed');
}

/**
 * After a pre-copy of a guest that ran (live-precopy, or stopped-precopy paused by qsnap),
 * resume it once QEMU completed the migration: not before, or the guest would run while its
 * device state is saved. Completion is signalled before QEMU sets `postmigrate`
 * (migration_iteration_finish), and a `cont` in between would be undone by it: wait for the
 * run state too.
 */
export async function resumeAfterMigration(ctx: SnapshotContext, failed: Promise<never>): Promise<void> {
  const { qmp } = ctx;
  const completed = qmp.waitFor('MIGRATION', (e) => e.data.status === 'completed');
  completed.catch(() => undefined);
  if ((await qmp.execute('query-migrate')).status !== 'completed')
    await Promise.race([completed, failed, qemuGone(qmp), cancelled(ctx.op.signal)]);
  const status = await waitRunStateSettled(qmp);
  if (!status.running) {
    const resumed = qmp.waitFor('RESUME', undefined, { timeoutMs: 5000 });
    resumed.catch(() => undefined);
    await qmp.execute('cont');
    await resumed;
  }
  ctx.op.phase('resumed');
}
