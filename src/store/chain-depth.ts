import { connectVm } from '../engine/connect.js';
import { formatNodesByFile, releaseUnusedNodes } from '../engine/disks/nodes.js';
import type { OperationContext } from '../engine/operation.js';
import type { SnapshotResult } from '../engine/snapshot/types.js';
import type { QmpClient } from '../qmp/index.js';
import { readChain } from '../vm/image-chain.js';
import { backingReference } from '../vm/qemu-img.js';
import type { Store } from './store.js';

/**
 * The running VM's backing chain stays bounded however many snapshots are kept: every
 * snapshot adds a layer below the live overlay, and beyond `maxChain` layers QEMU streams the
 * data of everything above the bottom image into the live overlay (block-stream with that
 * base), in the background, without pausing the guest. The snapshots keep their own chains;
 * the layers drop out of the VM's chain only, and what nothing needs any more is removed by
 * the next delete or gc.
 */
const JOB_PREFIX = 'qsnap-chain-';

export async function boundChain(
  store: Store,
  qmpPath: string,
  result: SnapshotResult,
  maxChain: number,
  op: OperationContext,
): Promise<{ from: number; job: string } | undefined> {
  let longest: { from: number; job: string } | undefined;
  for (const disk of result.disks) {
    const chain = await readChain(disk.overlayFile);
    if (chain.length <= maxChain) continue;
    const { qmp } = await connectVm(qmpPath, { stateDir: store.stateDir });
    try {
      const job = await startStream(qmp, disk.overlayFile, chain.at(-1)!.path);
      op.phase(
        'shorten',
        `${disk.device}: ${chain.length} layers > ${maxChain}, streaming into ${disk.overlayFile}`,
      );
      if (!longest || chain.length > longest.from) longest = { from: chain.length, job };
    } finally {
      await qmp.close();
    }
  }
  return longest;
}

async function startStream(qmp: QmpClient, top: string, base: string): Promise<string> {
  const nodes = await formatNodesByFile(qmp);
  const device = nodes.get(top);
  const baseNode = nodes.get(base);
  if (!device || !baseNode) throw new Error(`QEMU has no node for ${device ? base : top}`);
  const job = `${JOB_PREFIX}${device}`;
  await qmp.execute('block-stream', {
    'job-id': job,
    device,
    'base-node': baseNode,
    'backing-file': backingReference(top, base),
  });
  return job;
}

/**
 * A snapshot cannot freeze a disk while a stream job runs on it: wait for qsnap's own chain
 * jobs to end (they copy in the background; the guest runs meanwhile).
 */
export async function waitForChainJob(
  qmpPath: string,
  stateDir: string,
  op: OperationContext,
): Promise<void> {
  const { qmp } = await connectVm(qmpPath, { stateDir });
  try {
    for (let said = false; ; said = true) {
      const running = (await qmp.execute('query-jobs')).filter(
        (j) => j.id.startsWith(JOB_PREFIX) && j.status !== 'concluded' && j.status !== 'null',
      );
      if (running.length === 0) {
        // Layers a finished stream took out of the chain are still open as qsnap's nodes.
        await releaseUnusedNodes(qmp);
        return;
      }
      if (!said) op.phase('wait', `shortening the disk chain (${running.map((j) => j.id).join(', ')})`);
      const done = running.reduce((sum, j) => sum + j['current-progress'], 0);
      op.progress(
        done,
        running.reduce((sum, j) => sum + j['total-progress'], 0),
        'shorten',
      );
      await new Promise((r) => setTimeout(r, 50));
    }
  } finally {
    await qmp.close();
  }
}
