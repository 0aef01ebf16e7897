import type { QmpClient } from '../../qmp/index.js';
import { plainFilename } from '../../vm/image-chain.js';

/** The format node (not the protocol node) QEMU has open on an image file, by its node name. */
export async function formatNodesByFile(qmp: QmpClient): Promise<Map<string, string>> {
  const nodes = await qmp.execute('query-named-block-nodes', { flat: true });
  const byFile = new Map<string, string>();
  for (const n of nodes) {
    if (n.drv === 'file' || !n['node-name']) continue;
    const file = plainFilename(n.file) ?? n.file;
    if (!byFile.has(file)) byFile.set(file, n['node-name']);
  }
  return byFile;
}

/**
 * Nodes qsnap added (`blockdev-add` makes them monitor-owned: they stay open, holding their
 * files, until deleted) that nothing uses any more — a layer a stream job merged away, or one
 * that dropped out of the chain. QEMU refuses to delete a node in use, so trying each is safe.
 */
export async function releaseUnusedNodes(qmp: QmpClient): Promise<string[]> {
  const released: string[] = [];
  // Not while a block job changes the graph (QEMU 7.2 segfaulted once in a run that deleted
  // nodes around a stream job's end); the next call after the job releases them.
  if ((await qmp.execute('query-jobs')).some((j) => j.status !== 'concluded' && j.status !== 'null'))
    return released;
  for (const n of await qmp.execute('query-named-block-nodes', { flat: true })) {
    const name = n['node-name'];
    if (!name?.startsWith('qsnap-')) continue;
    try {
      await qmp.execute('blockdev-del', { 'node-name': name });
      released.push(name);
    } catch {
      // in use: a device writes to it or it backs another node
    }
  }
  return released;
}
