import { randomUUID } from 'node:crypto';
import { constants } from 'node:fs';
import { access, mkdtemp, rm, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { SnapshotFileError, type SnapshotWriter } from '../../format/index.js';
import type { QmpClient, QmpEvent } from '../../qmp/index.js';
import { connectVm } from '../connect.js';
import {
  flushImages,
  freezeActions,
  type PlannedOverlay,
  planOverlays,
  prepareOverlays,
} from '../disks/freeze.js';
import { SnapshotError } from '../errors.js';
import { faultPoint } from '../faults.js';
import { acquireIntent, assertNotBusy, type IntentHandle } from '../intent.js';
import { configureMigration, type MigrationSettings, restoreMigration } from '../migration.js';
import { Operation, type OperationContext } from '../operation.js';
import { probeVm, type VmInfo, versionAtLeast } from '../probe.js';
import { cleanupAfterFailure } from './cleanup.js';
import { type ReceivedStream, StreamReceiver } from './receiver.js';
import { cancelled, qemuGone, timeout, waitMigrationCompleted, watchMigrationFailure } from './waits.js';

export type SnapshotStrategy = 'background-snapshot' | 'stopped-precopy';

export interface SnapshotOptions {
  /** QMP socket of the running VM (unix path or host:port), or a connected client. */
  qmp: string;
  /** Path of the snapshot file to create. */
  out: string;
  /** Migration bandwidth limit in bytes per second (default: unlimited). */
  maxBandwidth?: number;
  /** Replace an existing file at `out`. */
  overwrite?: boolean;
  /** Directory for the new disk overlays (default: beside each disk image). */
  overlayDir?: string;
  /** The QEMU command line, recorded in the manifest for restore. */
  commandLine?: string[];
  /** How long to wait for QEMU to capture the device state (default 60 s). */
  captureTimeoutMs?: number;
}

export interface SnapshotDisk {
  device: string;
  /** The image as of the snapshot instant; nothing writes to it any more. */
  frozenFile: string;
  /** Where the running VM's disk lives now. */
  overlayFile: string;
}

export interface SnapshotResult {
  file: string;
  id: string;
  strategy: SnapshotStrategy;
  /** Guest pause, from QEMU's STOP and RESUME event timestamps (0 when it was paused already). */
  downtimeMs: number;
  totalMs: number;
  streamMs: number;
  ramBytes: number;
  pagesWritten: number;
  zeroPages: number;
  streamBytes: number;
  fileBytes: number;
  allocatedBytes: number;
  pointInTime: string;
  qemuVersion: string;
  machine: string;
  disks: SnapshotDisk[];
  skippedDisks: { device: string; reason: string }[];
  runState: string;
}

/** Take a live, point-in-time snapshot of a running VM into one file. */
export function snapshot(options: SnapshotOptions): Operation<SnapshotResult> {
  return new Operation((op) => runSnapshot(options, op));
}

/** Devices whose state lives outside QEMU's migration stream, which background snapshots refuse. */
const UNSUPPORTED_DEVICES = ['vfio-pci', 'vfio-pci-nohotplug', 'vfio-ccw', 'vfio-ap', 'vfio-platform'];

function chooseStrategy(vm: VmInfo): SnapshotStrategy {
  if (vm.running) return 'background-snapshot';
  if (vm.runState === 'paused' || vm.runState === 'suspended') {
    // QEMU 7.2–8.2 resume the guest after a background snapshot's capture even if it was
    // paused (migration.c bg_migration_vm_start_bh); a paused guest is already frozen, so a
    // plain migration of it is point-in-time and leaves it stopped. ≥ 9.0 keep the state.
    return versionAtLeast(vm.qemu.version, 9, 0) ? 'background-snapshot' : 'stopped-precopy';
  }
  throw new SnapshotError(
    'QSNAP_SNAPSHOT_UNSUPPORTED',
    `the VM is ${vm.runState}; only a running or paused VM can be snapshotted`,
    {
      hint: vm.runState === 'postmigrate' ? 'resume it with `cont` first' : 'start the guest first',
      details: { runState: vm.runState },
    },
  );
}

async function checkOutput(out: string, overwrite: boolean): Promise<void> {
  const dir = dirname(out);
  try {
    await access(dir, constants.W_OK);
  } catch (err) {
    throw new SnapshotError('QSNAP_SNAPSHOT_OUTPUT', `cannot write to ${dir}`, {
      hint: 'choose an --out path in a writable directory',
      cause: err,
    });
  }
  if (!overwrite) {
    const exists = await stat(out).then(
      () => true,
      () => false,
    );
    if (exists) {
      throw new SnapshotError('QSNAP_SNAPSHOT_OUTPUT', `${out} already exists`, {
        hint: 'choose another --out path or pass --overwrite',
      });
    }
  }
}

export interface PauseState {
  stopEvent: QmpEvent | undefined;
  resumeEvent: QmpEvent | undefined;
  frozen: boolean;
  migrating: boolean;
}

async function runSnapshot(options: SnapshotOptions, op: OperationContext): Promise<SnapshotResult> {
  const startedAt = performance.now();
  const out = resolve(options.out);
  op.phase('connect', options.qmp);
  await assertNotBusy(options.qmp);
  const { qmp, recovery } = await connectVm(options.qmp);
  if (recovery.recovered)
    op.emit({ type: 'info', message: `recovered an interrupted qsnap: ${recovery.actions.join('; ')}` });
  try {
    op.phase('probe');
    const vm = await probeVm(qmp);
    const strategy = chooseStrategy(vm);
    if (
      vm.migrationStatus === 'active' ||
      vm.migrationStatus === 'setup' ||
      vm.migrationStatus === 'device'
    ) {
      throw new SnapshotError(
        'QSNAP_SNAPSHOT_BUSY',
        `a migration of this VM is already ${vm.migrationStatus}`,
        {
          hint: 'wait for it to finish or cancel it (migrate_cancel), then retry',
        },
      );
    }
    const blocking = vm.deviceTypes.filter((t) => UNSUPPORTED_DEVICES.includes(t));
    if (blocking.length) {
      throw new SnapshotError(
        'QSNAP_SNAPSHOT_UNSUPPORTED',
        `devices ${blocking.join(', ')} cannot be snapshotted live`,
        {
          hint: 'detach passthrough devices before snapshotting',
        },
      );
    }
    await checkOutput(out, options.overwrite ?? false);
    const id = randomUUID();
    const plan = await planOverlays(vm.disks, id, options.overlayDir);

    const intent = await acquireIntent(options.qmp, {
      operation: 'snapshot',
      vmWasRunning: vm.running,
      stage: 'prepared',
      tempFiles: [],
      overlays: plan.overlays.map((o) => ({
        device: o.device,
        node: o.node,
        overlayFile: o.overlayFile,
        overlayNode: o.overlayNode,
        inUse: false,
      })),
    });
    try {
      return await snapshotLocked({
        options,
        op,
        qmp,
        vm,
        strategy,
        id,
        out,
        overlays: plan.overlays,
        skipped: plan.skipped,
        intent,
        startedAt,
      });
    } finally {
      await intent.release();
    }
  } finally {
    await qmp.close();
  }
}

export interface LockedContext {
  options: SnapshotOptions;
  op: OperationContext;
  qmp: QmpClient;
  vm: VmInfo;
  strategy: SnapshotStrategy;
  id: string;
  out: string;
  overlays: PlannedOverlay[];
  skipped: { device: string; reason: string }[];
  intent: IntentHandle;
  startedAt: number;
}

async function snapshotLocked(ctx: LockedContext): Promise<SnapshotResult> {
  const { op, qmp, vm, strategy, intent, overlays } = ctx;
  const socketDir = await mkdtemp(join(tmpdir(), 'qsnap-stream-'));
  let settings: MigrationSettings | undefined;
  let writer: SnapshotWriter | undefined;
  const pause: PauseState = { stopEvent: undefined, resumeEvent: undefined, frozen: false, migrating: false };
  const receiver = new StreamReceiver({
    socketPath: join(socketDir, 'migration.sock'),
    out: ctx.out,
    overwrite: ctx.options.overwrite ?? false,
    onWriterCreated: (w) => {
      writer = w;
      void intent.update({ tempFiles: [socketDir, w.tempPath] }).catch(() => undefined);
    },
    onProgress: (done, total) => op.progress(done, total),
    maxBytesPerSecond: ctx.options.maxBandwidth,
  });
  const unsubscribe = [
    qmp.on('STOP', (e) => {
      pause.stopEvent ??= e;
    }),
    qmp.on('RESUME', (e) => {
      if (pause.stopEvent) pause.resumeEvent ??= e;
    }),
  ];
  try {
    op.phase('prepare');
    settings = await configureMigration(qmp, {
      background: strategy === 'background-snapshot',
      maxBandwidth: ctx.options.maxBandwidth,
    });
    await intent.update({ tempFiles: [socketDir], migration: settings.saved });
    await prepareOverlays(qmp, overlays);
    await receiver.listen();
    const migrationFailed = watchMigrationFailure(qmp);

    await intent.update({ stage: 'paused' });
    // Write the images' dirty host pages out now, so the flush QEMU does inside the
    // transaction (in the pause) has little left to do.
    await flushImages(overlays);
    op.phase('pause');
    // stop and transaction are sent back to back: QMP runs them in order, one round trip less.
    const stopped = vm.running ? qmp.execute('stop') : Promise.resolve();
    if (faultPoint('after-stop')) await stopped;
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
    await stopped;
    await freeze;
    if (overlays.length) {
      pause.frozen = true;
      // Recorded without waiting (the guest is paused); the next update waits for it. Until
      // then a recovery still keeps these files: QEMU refuses to delete a node in use.
      void intent
        .update({ overlays: intent.current.overlays.map((o) => ({ ...o, inUse: true })) })
        .catch(() => undefined);
      op.phase('frozen');
    }
    const uri = faultPoint('bad-migration-socket')
      ? `unix:${join(socketDir, 'nobody.sock')}`
      : `unix:${join(socketDir, 'migration.sock')}`;
    await qmp.execute('migrate', { uri });
    pause.migrating = true;
    if (faultPoint('fail-after-migrate'))
      throw new SnapshotError('QSNAP_SNAPSHOT_MIGRATION', 'injected fault: failed right after migrate');
    op.phase('migrating');

    if (strategy === 'background-snapshot') {
      await waitForCapture(ctx, receiver, migrationFailed.promise);
      if (vm.running) await resumeAfterCapture(ctx, pause);
    }
    await intent.update({ stage: 'streaming' });
    op.phase('stream');
    const received = await Promise.race([
      receiver.done,
      migrationFailed.promise,
      qemuGone(qmp),
      cancelled(op.signal),
    ]);
    migrationFailed.cancel();
    await waitMigrationCompleted(qmp);
    pause.migrating = false;

    op.phase('finish');
    await intent.update({ stage: 'finishing' });
    const result = await finishFile(ctx, received, pause);
    await restoreMigration(qmp, settings).catch((err) =>
      op.warn('QSNAP_MIGRATION_SETTINGS', `could not restore migration settings: ${(err as Error).message}`),
    );
    settings = undefined;
    return result;
  } catch (err) {
    throw await cleanupAfterFailure(ctx, err, { receiver, writer, pause, settings });
  } finally {
    for (const off of unsubscribe) off();
    await receiver.close().catch(() => undefined);
    await rm(socketDir, { recursive: true, force: true });
  }
}

async function waitForCapture(
  ctx: LockedContext,
  receiver: StreamReceiver,
  failed: Promise<never>,
): Promise<void> {
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
      receiver.captured,
      receiver.done.then(() => undefined),
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
async function resumeAfterCapture(ctx: LockedContext, pause: PauseState): Promise<void> {
  const { qmp } = ctx;
  if (versionAtLeast(ctx.vm.qemu.version, 9, 0)) {
    await qmp.execute('cont');
  }
  if (!pause.resumeEvent) {
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

function usToIso(us: number): string {
  return new Date(Math.floor(us / 1000)).toISOString();
}

async function finishFile(
  ctx: LockedContext,
  received: ReceivedStream,
  pause: PauseState,
): Promise<SnapshotResult> {
  const { vm, strategy, overlays } = ctx;
  const stopUs = pause.stopEvent?.timestampUs;
  const resumeUs = pause.resumeEvent?.timestampUs;
  const downtimeMs = stopUs !== undefined && resumeUs !== undefined ? (resumeUs - stopUs) / 1000 : 0;
  const streamMs = received.endAt - received.firstByteAt;
  const pointInTimeUs = stopUs ?? Date.now() * 1000;
  const summary = received.summary;
  const disks = overlays.map((o) => ({
    device: o.device,
    nodeName: o.node,
    format: o.format,
    virtualSize: o.virtualSize,
    frozenFile: o.frozenFile,
    overlayFile: o.overlayFile,
    overlayNodeName: o.overlayNode,
    backingChain: o.chain,
  }));
  let manifest: Awaited<ReturnType<SnapshotWriter['finish']>>;
  try {
    manifest = await received.writer.finish({
      prologue: Buffer.concat([received.prologue.bytes, received.ramSetup.bytes]),
      deviceTail: received.deviceTail,
      info: {
        id: ctx.id,
        qemu: {
          version: { ...vm.qemu.version },
          package: vm.qemu.package,
          machine: received.prologue.machine ?? vm.machine,
          accel: vm.accel,
          ...(ctx.options.commandLine ? { commandLine: ctx.options.commandLine } : {}),
        },
        vm: { ramBytes: vm.ramBytes, runStateBefore: vm.runState, ...(vm.name ? { name: vm.name } : {}) },
        strategy,
        pointInTime: { wallClock: usToIso(pointInTimeUs), qemuTimestampUs: Math.round(pointInTimeUs) },
        stream: {
          streamVersion: received.prologue.version,
          ramSectionId: received.ramSetup.sectionId,
          ...(summary.vmDescription ? { devices: summary.vmDescription.devices.map((d) => d.name) } : {}),
        },
        disks,
        skippedDisks: ctx.skipped,
        timings: {
          downtimeMs,
          totalMs: performance.now() - ctx.startedAt,
          streamMs,
        },
        counts: { streamBytes: received.streamBytes, ramParts: summary.ramParts },
      },
    });
  } catch (err) {
    if (err instanceof SnapshotFileError && err.code === 'QSNAP_FILE_INCOMPLETE') {
      throw new SnapshotError(
        'QSNAP_SNAPSHOT_INCOMPLETE',
        `the migration stream ended without every RAM page (${err.message})`,
        {
          hint: 'this is a QEMU or qsnap bug; no snapshot was written',
          cause: err,
        },
      );
    }
    throw err;
  }
  const st = await stat(received.writer.path);
  return {
    file: received.writer.path,
    id: manifest.id,
    strategy,
    downtimeMs,
    totalMs: performance.now() - ctx.startedAt,
    streamMs,
    ramBytes: manifest.ram.blocks.reduce((sum, b) => sum + b.usedLength, 0),
    pagesWritten: manifest.counts.pagesWritten,
    zeroPages: manifest.counts.zeroPages,
    streamBytes: received.streamBytes,
    fileBytes: st.size,
    allocatedBytes: st.blocks * 512,
    pointInTime: manifest.pointInTime.wallClock,
    qemuVersion: vm.qemu.text,
    machine: manifest.qemu.machine,
    disks: overlays.map((o) => ({ device: o.device, frozenFile: o.frozenFile, overlayFile: o.overlayFile })),
    skippedDisks: ctx.skipped,
    runState: vm.runState,
  };
}
