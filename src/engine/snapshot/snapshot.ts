import { randomUUID } from 'node:crypto';
import { mkdir, rm } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import type { QmpClient } from '../../qmp/index.js';
import { socketHome } from '../../vm/run-dir.js';
import { connectVm } from '../connect.js';
import { planOverlays } from '../disks/freeze.js';
import { NO_FAULTS, STREAM_FAULT_AFTER_BYTES } from '../faults.js';
import { IntentStore } from '../intent.js';
import { restoreMigration } from '../migration.js';
import { Operation, type OperationContext } from '../operation.js';
import { probeVm } from '../probe.js';
import { defaultStateDir } from '../state-dir.js';
import { cleanupAfterFailure } from './cleanup.js';
import type { SnapshotContext, SnapshotRun } from './context.js';
import { finishFile } from './finish.js';
import { pauseAndFreeze, prepare, resumeAfterMigration, startMigration } from './pause.js';
import { checkOutput, chooseTransport, preflight, qemuPidOf } from './preflight.js';
import { StreamReceiver } from './receiver.js';
import { precopyUntilSwitchover } from './switchover.js';
import type { SnapshotOptions, SnapshotResult } from './types.js';
import { cancelled, qemuGone, waitMigrationCompleted, watchMigrationFailure } from './waits.js';

export type { SnapshotDisk, SnapshotOptions, SnapshotResult, SnapshotStrategy } from './types.js';

/**
 * A live, point-in-time snapshot of a running VM into one file:
 * lock and probe → prepare (guest running) → pause + freeze → migrate → capture → resume →
 * stream RAM in the background → seal the file. Any failure puts the VM back (cleanup.ts).
 * Where QEMU cannot write-protect guest RAM: prepare → migrate (pre-copy, guest running) →
 * QEMU's switchover pause: freeze → the rest of RAM and the devices → resume → seal
 * (switchover.ts); or, where pre-copy misses writes (TCG before QEMU 9.0), pause + freeze →
 * migrate → resume once all of RAM is sent (preflight.ts precopyStrategy).
 */
export function snapshot(options: SnapshotOptions): Operation<SnapshotResult> {
  return new Operation((op) => runSnapshot(options, op));
}

async function runSnapshot(options: SnapshotOptions, op: OperationContext): Promise<SnapshotResult> {
  const startedAt = performance.now();
  const stateDir = options.stateDir ?? defaultStateDir();
  const intents = new IntentStore(stateDir);
  // Which process QEMU is (a scan of /proc, 10-40 ms): meanwhile qsnap connects and probes.
  const qemuPid = qemuPidOf(options.qmp);
  qemuPid.catch(() => undefined);
  op.phase('connect', options.qmp);
  await intents.assertNotBusy(options.qmp);
  const { qmp, recovery } = await connectVm(options.qmp, { stateDir });
  if (recovery.recovered)
    op.emit({ type: 'info', message: `recovered an interrupted qsnap: ${recovery.actions.join('; ')}` });
  try {
    const ctx = await lockVm(options, op, qmp, intents, startedAt, qemuPid);
    try {
      return await snapshotLocked(ctx);
    } finally {
      await ctx.intent.release();
    }
  } finally {
    await qmp.close();
  }
}

/** Probe the VM, check what can be checked before touching it, plan the disks, take the lock. */
async function lockVm(
  options: SnapshotOptions,
  op: OperationContext,
  qmp: QmpClient,
  intents: IntentStore,
  startedAt: number,
  qemuPid: Promise<number | undefined>,
): Promise<SnapshotContext> {
  op.phase('probe');
  const vm = await probeVm(qmp);
  const strategy = preflight(vm);
  const out = resolve(options.out);
  await checkOutput(out, options.overwrite ?? false);
  const id = randomUUID();
  const plan = await planOverlays(vm.disks, id, options.overlayDir);
  // Named before it exists and recorded with the intent, so no kill can leave it unrecorded.
  const socketDir = join(socketHome(), `qsnap-stream-${id.slice(0, 12)}`);
  const intent = await intents.acquire(options.qmp, {
    operation: 'snapshot',
    vmWasRunning: vm.running,
    stage: 'prepared',
    tempFiles: [socketDir],
    overlays: plan.overlays.map((o) => ({
      device: o.device,
      node: o.node,
      overlayFile: o.overlayFile,
      overlayNode: o.overlayNode,
      inUse: false,
    })),
  });
  op.phase('intent');
  const faults = options.faults ?? NO_FAULTS;
  const pid = await qemuPid;
  return {
    options,
    op,
    qmp,
    vm,
    strategy,
    id,
    out,
    socketDir,
    qemuPid: pid,
    transport: options.transport ?? (await chooseTransport(pid)),
    overlays: plan.overlays,
    skipped: plan.skipped,
    intent,
    faults,
    startedAt,
  };
}

async function snapshotLocked(ctx: SnapshotContext): Promise<SnapshotResult> {
  const run = await openRun(ctx);
  const unwatch = watchPause(ctx, run);
  try {
    await prepare(ctx, run);
    const migrationFailed = watchMigrationFailure(ctx.qmp);
    await freezeAndMigrate(ctx, run, migrationFailed.promise);
    await ctx.intent.update({ stage: 'streaming' });
    ctx.op.phase('stream');
    if (ctx.strategy !== 'background-snapshot' && ctx.vm.running)
      await resumeAfterMigration(ctx, migrationFailed.promise);
    const received = await Promise.race([
      run.receiver.done,
      migrationFailed.promise,
      qemuGone(ctx.qmp),
      cancelled(ctx.op.signal),
    ]);
    migrationFailed.cancel();
    await waitMigrationCompleted(ctx.qmp);
    run.pause.migrating = false;
    ctx.op.phase('finish');
    await ctx.intent.update({ stage: 'finishing' });
    const result = await finishFile(ctx, received, run);
    ctx.op.phase('published');
    await putSettingsBack(ctx, run);
    return result;
  } catch (err) {
    throw await cleanupAfterFailure(ctx, run, err);
  } finally {
    unwatch();
    await run.receiver.close().catch(() => undefined);
    await rm(run.socketDir, { recursive: true, force: true });
  }
}

/**
 * Freeze the disks and RAM at one instant: pause, transaction, `migrate` (background snapshot,
 * stopped-precopy); or `migrate` and the transaction in QEMU's switchover pause (live-precopy).
 */
async function freezeAndMigrate(
  ctx: SnapshotContext,
  run: SnapshotRun,
  failed: Promise<never>,
): Promise<void> {
  if (ctx.strategy === 'live-precopy') {
    await precopyUntilSwitchover(ctx, run, failed);
    return;
  }
  await pauseAndFreeze(ctx, run);
  await startMigration(ctx, run, failed);
}

/** The socket directory and the receiver listening in it. */
async function openRun(ctx: SnapshotContext): Promise<SnapshotRun> {
  const { socketDir } = ctx;
  // The id is random: a directory of that name that exists already is refused, never followed.
  await mkdir(socketDir, { mode: 0o700 });
  const run: SnapshotRun = {
    socketDir,
    writer: undefined,
    settings: undefined,
    precopy: undefined,
    pause: { stopEvent: undefined, resumeEvent: undefined, frozen: false, migrating: false },
    receiver: new StreamReceiver({
      dir: socketDir,
      transport: ctx.transport,
      out: ctx.out,
      overwrite: ctx.options.overwrite ?? false,
      onWriterCreated: (w) => {
        run.writer = w;
        void ctx.intent.update({ tempFiles: [socketDir, w.tempPath] }).catch(() => undefined);
      },
      onProgress: halfwayAt(ctx),
      onDeviceTail: () => ctx.op.phase('device-tail'),
      maxBytesPerSecond: ctx.options.maxBandwidth,
      needsDrainGuard: () => ctx.strategy === 'background-snapshot',
      fault: ctx.faults.has('stream-hang')
        ? { afterBytes: STREAM_FAULT_AFTER_BYTES, kind: 'hang' }
        : ctx.faults.has('stream-error')
          ? { afterBytes: STREAM_FAULT_AFTER_BYTES, kind: 'error' }
          : undefined,
    }),
  };
  return run;
}

/** Record QEMU's STOP and RESUME events: the guest's pause, timed by QEMU itself. */
function watchPause(ctx: SnapshotContext, run: SnapshotRun): () => void {
  const offs = [
    ctx.qmp.on('STOP', (e) => {
      run.pause.stopEvent ??= e;
    }),
    ctx.qmp.on('RESUME', (e) => {
      if (run.pause.stopEvent) run.pause.resumeEvent ??= e;
    }),
  ];
  return () => {
    for (const off of offs) off();
  };
}

async function putSettingsBack(ctx: SnapshotContext, run: SnapshotRun): Promise<void> {
  if (!run.settings) return;
  await restoreMigration(ctx.qmp, run.settings).catch((err) =>
    ctx.op.warn(
      'QSNAP_MIGRATION_SETTINGS',
      `could not restore migration settings: ${(err as Error).message}`,
    ),
  );
  run.settings = undefined;
}

/** Progress of the RAM stream, with the phase `mid-stream` once half of it has arrived. */
function halfwayAt(ctx: SnapshotContext): (done: number, total: number) => void {
  let halfway = false;
  return (done, total) => {
    ctx.op.progress(done, total);
    if (!halfway && total > 0 && done >= total / 2) {
      halfway = true;
      ctx.op.phase('mid-stream');
    }
  };
}
