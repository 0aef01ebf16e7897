import { access, constants } from 'node:fs/promises';
import { openSnapshot, SnapshotFileError, type VerifyResult } from '../format/index.js';
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
      const diskLayers: string[] = [];
      for (const disk of reader.manifest.disks) {
        const recorded = (disk as { backingChain?: unknown }).backingChain;
        const chain = Array.isArray(recorded) ? recorded.map(String) : [disk.frozenFile];
        for (const layer of chain) {
          try {
            await access(layer, constants.R_OK);
          } catch (err) {
            throw new SnapshotFileError(
              'QSNAP_FILE_DISK_MISSING',
              `disk ${disk.device}: layer ${layer} is missing or unreadable`,
              {
                hint: 'the snapshot needs its frozen disk images; restore them from a backup or take a new snapshot',
                cause: err,
                details: { device: disk.device, layer },
              },
            );
          }
          diskLayers.push(layer);
        }
      }
      return { file: reader.path, ...result, diskLayers };
    } finally {
      await reader.close();
    }
  });
}
