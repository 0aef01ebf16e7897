import { constants } from 'node:fs';
import { access, open, rm, stat } from 'node:fs/promises';
import { dirname, resolve } from 'node:path';
import type { QmpClient, TransactionAction } from '../../qmp/index.js';
import { createOverlay } from '../../vm/qemu-img.js';
import { SnapshotError } from '../errors.js';
import type { DiskInfo } from '../probe.js';
import { overlayPath } from './naming.js';

/**
 * Freezing a running VM's disks: each writable disk's current top image becomes the snapshot's
 * frozen layer, and the VM goes on writing to a new qcow2 overlay on top of it. The overlays
 * are made and opened while the guest runs; only the switch (one transaction) is in the pause.
 */

/** One writable disk to freeze. */
export interface PlannedOverlay {
  device: string;
  /** The node the device writes to now; the transaction puts the overlay on top of it. */
  node: string;
  format: string;
  virtualSize: number;
  frozenFile: string;
  /** The new active image, beside the frozen one (never in a temp directory). */
  overlayFile: string;
  overlayNode: string;
  /** The frozen image and its backing files, top first: what a restore opens read-only. */
  chain: string[];
}

export interface DiskPlan {
  overlays: PlannedOverlay[];
  skipped: { device: string; reason: string }[];
}

/**
 * Decide what happens to every disk: writable, inserted, non-removable disks are frozen;
 * read-only and removable media are recorded as skipped. A writable disk qsnap cannot freeze
 * is an error: skipping it would make the snapshot inconsistent.
 */
export async function planOverlays(
  disks: DiskInfo[],
  snapshotId: string,
  overlayDir?: string,
): Promise<DiskPlan> {
  const plan: DiskPlan = { overlays: [], skipped: [] };
  for (const [index, disk] of disks.entries()) {
    const label = disk.device || `disk${index}`;
    const skip = skipReason(disk);
    if (skip) plan.skipped.push({ device: label, reason: skip });
    else plan.overlays.push(await planOverlay(disk, label, index, snapshotId, overlayDir));
  }
  await checkWritable(new Set(plan.overlays.map((o) => dirname(o.overlayFile))));
  return plan;
}

function skipReason(disk: DiskInfo): string | undefined {
  if (!disk.inserted) return 'no medium';
  if (disk.readOnly) return 'read-only';
  if (disk.removable) return 'removable medium';
  return undefined;
}

async function planOverlay(
  disk: DiskInfo,
  label: string,
  index: number,
  snapshotId: string,
  overlayDir: string | undefined,
): Promise<PlannedOverlay> {
  const filename = disk.file?.startsWith('json:') ? undefined : disk.file;
  if (!filename || !disk.nodeName || !disk.format || disk.virtualSize === undefined) {
    throw new SnapshotError(
      'QSNAP_SNAPSHOT_DISK',
      `disk ${label} is not backed by a plain image file (${disk.file ?? 'unknown'})`,
      {
        hint: 'qsnap freezes disks with qcow2 overlays on image files; attach this disk from a file',
        details: { device: label },
      },
    );
  }
  const frozenFile = resolve(filename);
  await stat(frozenFile).catch(() => {
    throw new SnapshotError(
      'QSNAP_SNAPSHOT_DISK',
      `disk ${label}: image ${filename} is not reachable from here`,
      {
        hint: 'start QEMU with absolute image paths, or run qsnap on the same host and working directory as QEMU',
        details: { device: label, file: filename },
      },
    );
  });
  const tag = snapshotId.slice(0, 8);
  return {
    device: label,
    node: disk.nodeName,
    format: disk.format,
    virtualSize: disk.virtualSize,
    frozenFile,
    chain: disk.chain.length ? disk.chain.map((f) => resolve(f)) : [frozenFile],
    overlayFile: overlayPath(frozenFile, 'qsnap', tag, overlayDir),
    overlayNode: `qsnap-${tag}-${index}`,
  };
}

async function checkWritable(dirs: Set<string>): Promise<void> {
  for (const dir of dirs) {
    try {
      await access(dir, constants.W_OK);
    } catch {
      throw new SnapshotError('QSNAP_SNAPSHOT_DISK', `cannot create disk overlays in ${dir}`, {
        hint: 'make the directory writable or choose another with --overlay-dir',
        details: { dir },
      });
    }
  }
}

/** A qcow2 overlay file whose backing file is the frozen image (not opened: QEMU holds its lock). */
async function createOverlayFile(overlay: PlannedOverlay): Promise<void> {
  try {
    await createOverlay({
      overlayFile: overlay.overlayFile,
      backingFile: overlay.frozenFile,
      backingFormat: overlay.format,
      virtualSize: overlay.virtualSize,
    });
  } catch (err) {
    throw new SnapshotError(
      'QSNAP_SNAPSHOT_DISK',
      `cannot create overlay ${overlay.overlayFile}: ${(err as Error).message}`,
      {
        hint: 'check that qemu-img is installed and the directory is writable',
        cause: err,
        details: { device: overlay.device },
      },
    );
  }
}

/** Create the overlays and open them in QEMU (guest still running): only the switch stays for the pause. */
export async function prepareOverlays(qmp: QmpClient, overlays: PlannedOverlay[]): Promise<void> {
  const done: PlannedOverlay[] = [];
  try {
    for (const overlay of overlays) {
      await createOverlayFile(overlay);
      done.push(overlay);
      await qmp.execute('blockdev-add', {
        driver: 'qcow2',
        'node-name': overlay.overlayNode,
        file: { driver: 'file', filename: overlay.overlayFile },
        // blockdev-snapshot attaches the frozen node as backing itself.
        backing: null,
      });
    }
  } catch (err) {
    await discardOverlays(qmp, done);
    if (err instanceof SnapshotError) throw err;
    throw new SnapshotError(
      'QSNAP_SNAPSHOT_DISK',
      `cannot open the disk overlay in QEMU: ${(err as Error).message}`,
      { hint: 'check the QEMU log; the guest was not paused', cause: err },
    );
  }
}

/** fdatasync each image about to be frozen (a read-only descriptor flushes the file's dirty pages too). */
export async function flushImages(overlays: PlannedOverlay[]): Promise<void> {
  await Promise.all(
    overlays.map(async (o) => {
      const handle = await open(o.frozenFile, 'r');
      try {
        await handle.datasync();
      } finally {
        await handle.close();
      }
    }),
  );
}

export function freezeActions(overlays: PlannedOverlay[]): TransactionAction[] {
  return overlays.map((o) => ({ type: 'blockdev-snapshot', data: { node: o.node, overlay: o.overlayNode } }));
}

/**
 * Remove overlays the guest never wrote to (before the transaction). A node QEMU refuses to
 * delete is in use: its file is kept, never removed under a running guest. A node QEMU does
 * not have (never added, or already gone) only loses its file.
 */
export async function discardOverlays<T extends Pick<PlannedOverlay, 'overlayNode' | 'overlayFile'>>(
  qmp: QmpClient,
  overlays: T[],
): Promise<T[]> {
  if (overlays.length === 0) return [];
  const nodes = new Set(
    (await qmp.execute('query-named-block-nodes', { flat: true })).map((n) => n['node-name']),
  );
  const kept: T[] = [];
  for (const overlay of overlays) {
    if (nodes.has(overlay.overlayNode)) {
      try {
        await qmp.execute('blockdev-del', { 'node-name': overlay.overlayNode });
      } catch {
        kept.push(overlay);
        continue;
      }
    }
    await rm(overlay.overlayFile, { force: true });
  }
  return kept;
}
