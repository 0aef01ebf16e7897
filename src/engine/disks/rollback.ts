import { rm } from 'node:fs/promises';
import type { QmpClient } from '../../qmp/index.js';
import type { PlannedOverlay } from './freeze.js';

export interface RollbackOutcome {
  device: string;
  overlayFile: string;
  /** True when the disk writes to its original image again and the overlay is gone. */
  rolledBack: boolean;
  error?: string;
}

/**
 * Undo a disk freeze after a failed snapshot: commit what the guest wrote to each overlay
 * back into the image below it and switch the device back to that image (an active
 * block-commit, completed by job-complete), then delete the overlay. The VM ends up with the
 * disk layout it had before, its data intact. A disk whose commit fails keeps its overlay.
 */
export async function rollbackOverlays(
  qmp: QmpClient,
  overlays: PlannedOverlay[],
  timeoutMs = 120_000,
): Promise<RollbackOutcome[]> {
  const outcomes: RollbackOutcome[] = [];
  for (const overlay of overlays) {
    const jobId = `${overlay.overlayNode}-rollback`;
    try {
      await qmp.execute('block-commit', {
        'job-id': jobId,
        device: overlay.overlayNode,
        'base-node': overlay.node,
      });
      await waitJob(qmp, jobId, 'ready', timeoutMs);
      await qmp.execute('job-complete', { id: jobId });
      await waitJob(qmp, jobId, 'gone', timeoutMs);
      // blockdev-add made the node monitor-owned: it lives (holding its backing) until deleted.
      await qmp.execute('blockdev-del', { 'node-name': overlay.overlayNode });
      await rm(overlay.overlayFile, { force: true });
      outcomes.push({ device: overlay.device, overlayFile: overlay.overlayFile, rolledBack: true });
    } catch (err) {
      outcomes.push({
        device: overlay.device,
        overlayFile: overlay.overlayFile,
        rolledBack: false,
        error: (err as Error).message,
      });
    }
  }
  return outcomes;
}

async function waitJob(qmp: QmpClient, id: string, want: 'ready' | 'gone', timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const job = (await qmp.execute('query-jobs')).find((j) => j.id === id);
    if (want === 'gone' && (!job || job.status === 'null')) return;
    if (job?.status === 'concluded' && job.error) throw new Error(`commit job failed: ${job.error}`);
    if (want === 'ready' && job?.status === 'ready') return;
    if (!job && want === 'ready') throw new Error('commit job vanished before it was ready');
    if (Date.now() > deadline) throw new Error(`commit job not ${want} after ${timeoutMs} ms`);
    await new Promise((r) => setTimeout(r, 10));
  }
}
