import { access, constants } from 'node:fs/promises';
import { type DiskEntry, openSnapshot, type VerifyResult } from '../format/index.js';
import { type ChainImage, readChain } from '../vm/image-chain.js';
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

/**
 * The layers a snapshot's disk reads now, from the images' own headers (a store merge may
 * have shortened the chain since the manifest recorded it), each present and readable.
 */
async function checkLayers(disk: DiskEntry): Promise<string[]> {
  const missing = (layer: string, cause: unknown) =>
    new VerifyError(
      'QSNAP_VERIFY_DISK_MISSING',
      `disk ${disk.device}: layer ${layer} is missing or unreadable`,
      {
        hint: 'the snapshot needs its frozen disk images; restore them from a backup or take a new snapshot',
        cause,
        details: { device: disk.device, layer },
      },
    );
  let chain: ChainImage[];
  try {
    chain = await readChain(disk.frozenFile);
  } catch (err) {
    throw missing(disk.frozenFile, err);
  }
  const broken = chain.find((image) => image.problem);
  if (broken?.backing) throw missing(broken.backing, broken.problem);
  for (const { path } of chain)
    await access(path, constants.R_OK).catch((err) => Promise.reject(missing(path, err)));
  return chain.map((image) => image.path);
}
