import { stat } from 'node:fs/promises';
import { type Manifest, SnapshotFileError, type SnapshotInfo } from '../../format/index.js';
import { SnapshotError } from '../errors.js';
import type { PauseState, SnapshotContext, SnapshotRun } from './context.js';
import type { ReceivedStream } from './receiver.js';
import type { PrecopyReport, SnapshotResult } from './types.js';

/** Seal the file (page table, manifest, trailer, fsync, rename) and say what was written. */
export async function finishFile(
  ctx: SnapshotContext,
  received: ReceivedStream,
  run: SnapshotRun,
): Promise<SnapshotResult> {
  const timing = pauseTiming(run.pause);
  const streamMs = received.endAt - received.firstByteAt;
  const manifest = await seal(received, snapshotInfo(ctx, received, timing, streamMs, run.precopy));
  const st = await stat(received.writer.path);
  return {
    file: received.writer.path,
    id: manifest.id,
    strategy: ctx.strategy,
    transport: ctx.transport,
    downtimeMs: timing.downtimeMs,
    totalMs: performance.now() - ctx.startedAt,
    streamMs,
    ramBytes: manifest.ram.blocks.reduce((sum, b) => sum + b.usedLength, 0),
    pagesWritten: manifest.counts.pagesWritten,
    zeroPages: manifest.counts.zeroPages,
    streamBytes: received.streamBytes,
    duplicatePages: manifest.counts.duplicatePages,
    fileBytes: st.size,
    allocatedBytes: st.blocks * 512,
    pointInTime: manifest.pointInTime.wallClock,
    qemuVersion: ctx.vm.qemu.text,
    machine: manifest.qemu.machine,
    disks: ctx.overlays.map((o) => ({
      device: o.device,
      frozenFile: o.frozenFile,
      overlayFile: o.overlayFile,
    })),
    skippedDisks: ctx.skipped,
    runState: ctx.vm.runState,
    ...(run.precopy ? { precopy: run.precopy } : {}),
  };
}

interface PauseTiming {
  /** Guest pause from QEMU's STOP and RESUME timestamps; 0 when it was paused already. */
  downtimeMs: number;
  /** The snapshot's instant: QEMU's STOP timestamp (now, for a guest paused before). */
  pointInTimeUs: number;
}

function pauseTiming(pause: PauseState): PauseTiming {
  const stopUs = pause.stopEvent?.timestampUs;
  const resumeUs = pause.resumeEvent?.timestampUs;
  return {
    downtimeMs: stopUs !== undefined && resumeUs !== undefined ? (resumeUs - stopUs) / 1000 : 0,
    pointInTimeUs: stopUs ?? Date.now() * 1000,
  };
}

/** The manifest's description of the snapshot, from the probe, the plan and the stream. */
function snapshotInfo(
  ctx: SnapshotContext,
  received: ReceivedStream,
  timing: PauseTiming,
  streamMs: number,
  precopy: PrecopyReport | undefined,
): SnapshotInfo {
  const { vm } = ctx;
  const devices = received.summary.vmDescription?.devices.map((d) => d.name);
  return {
    id: ctx.id,
    qemu: {
      version: { ...vm.qemu.version },
      package: vm.qemu.package,
      machine: received.prologue.machine ?? vm.machine,
      accel: vm.accel,
      ...(ctx.options.commandLine ? { commandLine: ctx.options.commandLine } : {}),
    },
    vm: { ramBytes: vm.ramBytes, runStateBefore: vm.runState, ...(vm.name ? { name: vm.name } : {}) },
    strategy: ctx.strategy,
    pointInTime: {
      wallClock: new Date(Math.floor(timing.pointInTimeUs / 1000)).toISOString(),
      qemuTimestampUs: Math.round(timing.pointInTimeUs),
    },
    stream: {
      streamVersion: received.prologue.version,
      ramSectionId: received.ramSetup.sectionId,
      ...(devices ? { devices } : {}),
    },
    disks: ctx.overlays.map((o) => ({
      device: o.device,
      nodeName: o.node,
      format: o.format,
      virtualSize: o.virtualSize,
      frozenFile: o.frozenFile,
      overlayFile: o.overlayFile,
      overlayNodeName: o.overlayNode,
      backingChain: o.chain,
    })),
    skippedDisks: ctx.skipped,
    ...timingsAndCounts(ctx, received, { downtimeMs: timing.downtimeMs, streamMs }, precopy),
  };
}

/** The manifest's timings and counts; live-precopy adds its pre-copy time and passes. */
function timingsAndCounts(
  ctx: SnapshotContext,
  received: ReceivedStream,
  times: { downtimeMs: number; streamMs: number },
  precopy: PrecopyReport | undefined,
): Pick<SnapshotInfo, 'timings' | 'counts'> {
  return {
    timings: {
      ...times,
      totalMs: performance.now() - ctx.startedAt,
      ...(precopy ? { precopyMs: precopy.precopyMs } : {}),
    },
    counts: {
      streamBytes: received.streamBytes,
      ramParts: received.summary.ramParts,
      ...(precopy ? { precopyPasses: precopy.passes } : {}),
    },
  };
}

async function seal(received: ReceivedStream, info: SnapshotInfo): Promise<Manifest> {
  try {
    return await received.writer.finish({
      prologue: Buffer.concat([received.prologue.bytes, received.ramSetup.bytes]),
      deviceTail: received.deviceTail,
      info,
    });
  } catch (err) {
    if (err instanceof SnapshotFileError && err.code === 'QSNAP_FILE_INCOMPLETE') {
      throw new SnapshotError(
        'QSNAP_SNAPSHOT_INCOMPLETE',
        `the migration stream ended without every RAM page (${err.message})`,
        { hint: 'this is a QEMU or qsnap bug; no snapshot was written', cause: err },
      );
    }
    throw err;
  }
}
