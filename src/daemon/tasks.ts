import type { Operation } from '../engine/operation.js';
import { verifySnapshot } from '../engine/verify.js';
import { findSnapshot, storeRestore } from '../store/restore.js';
import { storeSnapshot } from '../store/snapshot.js';
import { Store } from '../store/store.js';
import type { WorkerTask } from './worker-host.js';

/** The engine operation a stream task runs (in a worker thread, or inline for comparison). */
export async function startTask(task: WorkerTask): Promise<Operation<object>> {
  const store = await Store.open({ dir: task.storeDir, stateDir: task.stateDir });
  switch (task.kind) {
    case 'snapshot':
      return storeSnapshot(store, { ...task.options, faults: task.faults });
    case 'restore':
      return storeRestore(store, task.options);
    case 'verify':
      return verifySnapshot(store.snapshotPath(findSnapshot(await store.read(), task.name)));
  }
}
