import { mkdir } from 'node:fs/promises';
import { dirname, resolve } from 'node:path';
import type { Manifest } from '../../format/index.js';
import type { ArgvDisk } from '../../vm/cmdline.js';
import { readChain } from '../../vm/image-chain.js';
import { createOverlay } from '../../vm/qemu-img.js';
import { overlayPath } from '../disks/naming.js';
import { RestoreError } from '../errors.js';

/** One snapshotted disk, the command line's disk it restores, and the overlay the restored VM gets. */
export interface PairedDisk {
  argvDisk: ArgvDisk;
  device: string;
  frozenFile: string;
  format: string;
  virtualSize: number;
  overlayFile: string;
}

/**
 * Pair each disk of the snapshot with the disk of the command line it restores: the command
 * line's image is the frozen layer itself, an image below it (the VM's original disk after
 * several snapshots), or an image above it. A writable disk of the command line that is not
 * in the snapshot is refused: its contents would come from another instant.
 */
export async function pairDisks(
  manifest: Manifest,
  disks: ArgvDisk[],
  options: { overlayDir: string | undefined; tag: string; frozenLayers?: Record<string, string> | undefined },
): Promise<PairedDisk[]> {
  const paired: PairedDisk[] = [];
  const used = new Set<ArgvDisk>();
  for (const disk of manifest.disks) {
    const candidates = disks.filter((d) => !used.has(d) && !d.readOnly);
    const moved = options.frozenLayers?.[disk.device];
    const frozenFile = moved ?? disk.frozenFile;
    const match = moved
      ? byDevice(candidates, disk.device, manifest.disks.length, frozenFile)
      : await findMatch(candidates, disk.device, frozenFile, await chainPaths(frozenFile));
    used.add(match);
    paired.push({
      argvDisk: match,
      device: disk.device,
      frozenFile,
      format: moved ? 'qcow2' : disk.format,
      virtualSize: disk.virtualSize,
      overlayFile: overlayPath(frozenFile, 'restore', options.tag, options.overlayDir),
    });
  }
  const stray = disks.filter((d) => !used.has(d) && !d.readOnly);
  if (stray.length) {
    throw new RestoreError(
      'QSNAP_RESTORE_DISKS',
      `writable disk ${stray[0]!.file} in the command line is not part of the snapshot`,
      {
        hint: 'its contents would come from another instant than the snapshot; remove it or make it read-only',
        details: { files: stray.map((d) => d.file) },
      },
    );
  }
  return paired;
}

/**
 * A snapshot whose frozen layers were moved (imported from another machine: flattened into the
 * store) has no path in common with a command line: its disk pairs with the command line's disk
 * of the same device id, or with the only writable disk when there is one of each.
 */
function byDevice(
  candidates: ArgvDisk[],
  device: string,
  snapshotDisks: number,
  frozenFile: string,
): ArgvDisk {
  const match =
    candidates.find((d) => d.deviceId === device) ??
    (candidates.length === 1 && snapshotDisks === 1 ? candidates[0] : undefined);
  if (match) return match;
  throw new RestoreError(
    'QSNAP_RESTORE_DISKS',
    `no disk in the command line is device ${device} (${frozenFile})`,
    {
      hint: 'give the disk the same device id as in the snapshot (-device …,id=' + device + ')',
      details: { device, frozenFile },
    },
  );
}

async function findMatch(
  candidates: ArgvDisk[],
  device: string,
  frozenFile: string,
  frozenChain: string[],
): Promise<ArgvDisk> {
  let matches = candidates.filter((d) => frozenChain.includes(resolve(d.file)));
  if (matches.length === 0) {
    // The command line may name an image above the frozen layer (a later overlay).
    const above: ArgvDisk[] = [];
    for (const d of candidates) if ((await chainPaths(d.file)).includes(resolve(frozenFile))) above.push(d);
    matches = above;
  }
  const match = matches.find((d) => d.deviceId === device) ?? matches[0];
  if (match) return match;
  throw new RestoreError(
    'QSNAP_RESTORE_DISKS',
    `no disk in the command line matches the snapshot's disk ${device} (${frozenFile})`,
    {
      hint: 'pass the command line the VM was started with, naming its original disk image',
      details: { device, frozenFile },
    },
  );
}

/** The restored VM's overlay on the frozen layer. */
export async function createRestoreOverlay(disk: PairedDisk): Promise<void> {
  try {
    await mkdir(dirname(disk.overlayFile), { recursive: true });
    await createOverlay({
      overlayFile: disk.overlayFile,
      backingFile: disk.frozenFile,
      backingFormat: disk.format,
      virtualSize: disk.virtualSize,
    });
  } catch (err) {
    throw new RestoreError(
      'QSNAP_RESTORE_DISKS',
      `cannot create the restore overlay ${disk.overlayFile}: ${(err as Error).message}`,
      { hint: 'check that the directory is writable (or choose --overlay-dir)', cause: err },
    );
  }
}

/** An image and the images below it, from their headers; just the image when it cannot be read. */
async function chainPaths(file: string): Promise<string[]> {
  try {
    return (await readChain(file)).map((image) => image.path);
  } catch {
    return [resolve(file)];
  }
}
