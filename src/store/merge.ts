import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { formatNodesByFile, releaseUnusedNodes } from '../engine/disks/nodes.js';
import type { QmpClient } from '../qmp/index.js';
import { readImage } from '../vm/image-chain.js';
import { backingReference } from '../vm/qemu-img.js';
import { StoreError } from './errors.js';
import type { Merge } from './plan.js';

const run = promisify(execFile);

/**
 * Carrying out one planned merge: the data of the layers right below `into` is copied into it
 * and `into` then backs onto what was below them. The guest-visible contents of `into` (and of
 * everything above it) do not change, so every snapshot and VM reads what it read before.
 */

/**
 * By the QEMU that holds `into`: a block-stream job with `into` as its top and the lowest merged
 * layer as its bottom (QEMU ≥ 6.0; an intermediate node may be the top since 2.8). The guest
 * keeps running: a stream job copies in the background and never pauses it.
 */
export async function mergeLive(
  qmp: QmpClient,
  merge: Merge,
  options: { onProgress: (done: number, total: number) => void; bytesPerSecond?: number | undefined },
): Promise<void> {
  const nodes = await formatNodesByFile(qmp);
  const device = nodes.get(merge.into);
  // The new backing node when there is one (QEMU takes a backing-file name only with a base),
  // else the lowest merged layer: the whole chain is merged.
  const base = merge.newBacking === undefined ? undefined : nodes.get(merge.newBacking);
  const bottom = nodes.get(merge.layers.at(-1)!);
  if (!device || !bottom || (merge.newBacking !== undefined && !base))
    throw mergeError(merge, 'the running QEMU does not have these layers open any more');
  const jobId = `qsnap-merge-${device}`;
  const below =
    base === undefined
      ? { bottom }
      : { 'base-node': base, 'backing-file': backingReference(merge.into, merge.newBacking!) };
  const speed = options.bytesPerSecond ? { speed: options.bytesPerSecond } : {};
  await qmp.execute('block-stream', { 'job-id': jobId, device, 'auto-dismiss': false, ...below, ...speed });
  await waitJob(qmp, jobId, merge, options.onProgress);
  // The merged layers were qsnap's overlays once: QEMU keeps such nodes open until they are deleted.
  await releaseUnusedNodes(qmp);
}

async function waitJob(
  qmp: QmpClient,
  jobId: string,
  merge: Merge,
  onProgress: (done: number, total: number) => void,
): Promise<void> {
  for (;;) {
    const job = (await qmp.execute('query-jobs')).find((j) => j.id === jobId);
    if (!job) throw mergeError(merge, `QEMU's job ${jobId} vanished`);
    onProgress(job['current-progress'], job['total-progress']);
    if (job.status === 'concluded') {
      await qmp.execute('job-dismiss', { id: jobId });
      if (job.error) throw mergeError(merge, job.error);
      return;
    }
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** With nothing holding `into`: `qemu-img rebase` in safe mode copies what differs, then rewrites the header. */
export async function mergeOffline(merge: Merge): Promise<void> {
  const backing = merge.newBacking;
  const format = backing === undefined ? undefined : (await readImage(backing)).format;
  const args = [
    'rebase',
    '-q',
    '-f',
    'qcow2',
    '-b',
    backing ?? '',
    ...(format ? ['-F', format] : []),
    merge.into,
  ];
  try {
    await run('qemu-img', args);
  } catch (err) {
    throw mergeError(merge, ((err as { stderr?: string }).stderr ?? String(err)).trim());
  }
}

/** Whether `into` already backs onto the new backing file (a merge that a killed qsnap left to QEMU, done since). */
export async function isMerged(merge: Merge): Promise<boolean> {
  return (await readImage(merge.into)).backing === merge.newBacking;
}

/** After a merge, `into`'s header must name the new backing file; otherwise nothing may be removed. */
export async function checkMerged(merge: Merge): Promise<void> {
  const now = (await readImage(merge.into)).backing;
  if (now !== merge.newBacking)
    throw mergeError(
      merge,
      `${merge.into} still backs onto ${now ?? 'nothing'}, not ${merge.newBacking ?? 'nothing'}`,
    );
}

function mergeError(merge: Merge, why: string): StoreError {
  return new StoreError(
    'QSNAP_STORE_MERGE',
    `merging ${merge.layers.join(', ')} into ${merge.into} failed: ${why}`,
    {
      hint: 'nothing was removed; the snapshots and the VM are as before — run qsnap gc later, or see the QEMU log',
      details: { into: merge.into, layers: merge.layers },
    },
  );
}
