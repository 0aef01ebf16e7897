import { access, constants } from 'node:fs/promises';
import { type DiskEntry, diskLayers, openSnapshot, type VerifyResult } from '../format/index.js';
import { VerifyError } from './errors.js';
import { Operation } from './operation.js';

export interface SnapshotVerifyResult extends VerifyResult {
  file: string;
  /** Every disk layer the snapshot needs (frozen images and their backing files), all present. */
  diskLayers: string[];
}

/**
 * Check a snapshot completely: every checksum in the file (RAM pages, page table, device
 * state, manifest, trailer) and that the disk layers it names are still there and readable.
 */
export function verifySnapshot(file: string): Operation<SnapshotVerifyResult> {
  return new Operation(async (op) => {
    const reader = await openSnapshot(file);
    try {
      op.phase('verify', reader.path);
      const result = await reader.verify({
        signal: op.signal,
        onProgress: (p) => op.progress(p.bytesDone, p.bytesTotal, p.region),
      });
      const layers: string[] = [];
      for (const disk of reader.manifest.disks) layers.push(...(await checkLayers(disk)));
      return { file: reader.path, ...result, diskLayers: layers };
    } finally {
      await reader.close();
    }
  });
}

async function checkLayers(disk: DiskEntry): Promise<string[]> {
  const layers = diskLayers(disk);
  for (const layer of layers) {
    try {
      await access(layer, constants.R_OK);
    } catch (err) {
      throw new VerifyError(
        'QSNAP_VERIFY_DISK_MISSING',
        `disk ${disk.device}: layer ${layer} is missing or unreadable`,
        {
          hint: 'the snapshot needs its frozen disk images; restore them from a backup or take a new snapshot',
          cause: err,
          details: { device: disk.device, layer },
        },
      );
    }
  }
  return layers;
}
