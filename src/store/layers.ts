import { readImage } from '../vm/image-chain.js';
import { identityOf } from './facts.js';
import type { Catalog } from './schema.js';

/**
 * A finished snapshot's layers in the catalog: each frozen top is immutable from now on (its
 * identity and backing file are recorded, so a change or a move is noticed and its chain can
 * be followed even if it goes missing); each new live overlay is qsnap's, written by `vm`.
 * A frozen top qsnap did not make (the user's own image) is recorded as the user's.
 */
export async function recordSnapshotLayers(
  c: Catalog,
  disks: readonly { frozenFile: string; overlayFile: string }[],
  vm: string,
): Promise<void> {
  const now = new Date().toISOString();
  for (const disk of disks) {
    const identity = await identityOf(disk.frozenFile);
    const backing = (await readImage(disk.frozenFile).catch(() => undefined))?.backing;
    c.layers[disk.frozenFile] = {
      ...(c.layers[disk.frozenFile] ?? { path: disk.frozenFile, origin: 'user', createdAt: now }),
      ...(identity ? { identity } : {}),
      ...(backing ? { backing } : {}),
    };
    c.layers[disk.overlayFile] ??= { path: disk.overlayFile, origin: 'snapshot', vm, createdAt: now };
  }
}
