import { rm } from 'node:fs/promises';
import { connectVm } from '../engine/connect.js';
import { releaseUnusedNodes } from '../engine/disks/nodes.js';
import { type Faults, hangForever, NO_FAULTS } from '../engine/faults.js';
import { IntentStore } from '../engine/intent.js';
import { Operation, type OperationContext } from '../engine/operation.js';
import { QmpClient } from '../qmp/index.js';
import { readImage } from '../vm/image-chain.js';
import { isRunning } from '../vm/process.js';
import { sweepStaleRunDirs } from '../vm/run-dir.js';
import { allocatedBytes, fileKey, identityOf, scanHolders } from './facts.js';
import { sweepStaleIntents } from './intents-sweep.js';
import { checkMerged, isMerged, mergeLive, mergeOffline } from './merge.js';
import { type Merge, type Plan, type PlannedFile, planCollection } from './plan.js';
import type { Catalog } from './schema.js';
import type { Store } from './store.js';
import type { QemuView } from './view.js';

export interface CollectOptions {
  /** Ids of snapshots to delete; none for a garbage collection. */
  deleting: readonly string[];
  /** Only say what would be done. */
  dryRun?: boolean;
  /** Also remove the run directories of detached QEMUs that have exited (gc). */
  sweepRunDirs?: boolean;
  /** Test-only fault points (engine/faults.ts). */
  faults?: Faults;
}

export interface MergeDone {
  into: string;
  layers: string[];
  via: 'live' | 'offline';
  /** Bytes the layer above grew by, and how long it took. */
  bytes: number;
  ms: number;
  /** Times the guest was paused while QEMU merged (live merges; it must be 0). */
  pauses: number;
  error?: string;
}

export interface CollectResult {
  plan: Plan;
  dryRun: boolean;
  merged: MergeDone[];
  removed: PlannedFile[];
  waiting: Plan['wait'];
  kept: PlannedFile[];
  /** Names of the snapshots that are gone. */
  deleted: string[];
  /** Layers that would go after a merge that did not happen: kept, for a later delete or gc. */
  unmerged?: PlannedFile[];
  /** Run directories of QEMUs that exited, removed (or, dry, to be removed). */
  sweptRunDirs?: string[];
  /** What interrupted qsnaps left on VMs: recovered, or removed when the VM is gone. */
  sweptIntents?: string[];
}

/**
 * Delete snapshots and collect what nothing needs any more, as a plan first (plan.ts), then
 * carried out: the deletion is recorded first (a qsnap killed half way has it finished by the
 * next command), then the merges, then — on a fresh look at the files and /proc — the
 * removals. Every step can be repeated: a crash and a rerun end in the same state.
 */
export function collect(store: Store, options: CollectOptions): Operation<CollectResult> {
  return new Operation((op) => runCollect(store, options, op));
}

async function runCollect(
  store: Store,
  options: CollectOptions,
  op: OperationContext,
): Promise<CollectResult> {
  const deleting = new Set(options.deleting);
  op.phase('plan');
  if (!options.dryRun) await releaseOrphanNodes(store);
  const plan = await planNow(store, deleting);
  const result: CollectResult = {
    plan,
    dryRun: options.dryRun ?? false,
    merged: [],
    removed: [],
    waiting: [],
    kept: plan.keep,
    deleted: [],
  };
  if (options.sweepRunDirs) {
    result.sweptRunDirs = await sweepStaleRunDirs(undefined, { dryRun: result.dryRun });
    result.sweptIntents = await sweepStaleIntents(store.stateDir, { dryRun: result.dryRun });
  }
  if (options.dryRun) return result;
  if (deleting.size) await store.transact('delete', (c) => markDeleting(c, deleting));
  const faults = options.faults ?? NO_FAULTS;
  for (const merge of plan.merges) result.merged.push(await runMerge(store, merge, faults, op));
  op.phase('remove');
  const after = await planNow(store, deleting);
  // What the second look still wants merged did not merge (a merge failed, QEMU died): its
  // layers are still in a chain, and they stay until a later delete or gc merges them.
  result.unmerged = after.remove.filter((f) => f.afterMerge);
  for (const file of after.remove.filter((f) => !f.afterMerge)) {
    op.phase('removing', file.path);
    if (!(await removeUnheld(file.path))) continue;
    result.removed.push(file);
    if (faults.has('hang-after-removal')) hangForever();
  }
  result.waiting = after.wait.filter((f) => !f.afterMerge);
  result.kept = after.keep;
  op.phase('index');
  result.deleted = await store.transact('collected', (c) => settle(c, after, result));
  return result;
}

/** The plan on the store as it is now, with the QMP sockets of the QEMUs a live merge needs tried first. */
async function planNow(store: Store, deleting: Set<string>): Promise<Plan> {
  const view = await store.view();
  const draft = planCollection(view, { deleting, liveMergeBlocked: () => undefined });
  const blocked = new Map<QemuView, string | undefined>();
  for (const m of draft.merges)
    if (m.via.kind === 'live') blocked.set(m.via.qemu, await liveMergeBlocked(m.via.qemu));
  return planCollection(view, { deleting, liveMergeBlocked: (q) => blocked.get(q) });
}

/**
 * Whether this QEMU can stream into its layers now: its QMP socket answers (QEMU serves one
 * client, so another may hold it) and its disks are active — QEMU 7.2 inactivates them after an
 * outgoing migration (a snapshot of a paused guest leaves it `postmigrate`) until it runs again.
 */
async function liveMergeBlocked(qemu: QemuView): Promise<string | undefined> {
  if (!qemu.vm) return 'qsnap does not know its QMP socket';
  let qmp: QmpClient;
  try {
    qmp = await QmpClient.connect(qemu.vm.qmp, { connectTimeoutMs: 2000 });
  } catch {
    return 'its QMP socket is not reachable';
  }
  try {
    const { status } = await qmp.execute('query-status');
    return INACTIVE_DISKS.has(status)
      ? `its disks are inactive while it is ${status}: resume it, then run qsnap gc`
      : undefined;
  } finally {
    await qmp.close();
  }
}

/** Run states in which QEMU has its block devices inactive (migration handed them over). */
const INACTIVE_DISKS = new Set(['postmigrate', 'inmigrate', 'finish-migrate']);

/**
 * Layers a finished stream took out of a running VM's chain stay open in QEMU as qsnap's
 * nodes until deleted: let go of them first, so that what nothing needs can be removed.
 */
async function releaseOrphanNodes(store: Store): Promise<void> {
  const catalog = await store.read();
  for (const vm of Object.values(catalog.vms)) {
    if (vm.pid === undefined || !isRunning({ pid: vm.pid, startTime: vm.startTime ?? '' })) continue;
    const qmp = await QmpClient.connect(vm.qmp, { connectTimeoutMs: 2000 }).catch(() => undefined);
    if (!qmp) continue;
    try {
      await releaseUnusedNodes(qmp);
    } finally {
      await qmp.close();
    }
  }
}

function markDeleting(c: Catalog, deleting: Set<string>): void {
  for (const id of deleting) {
    const entry = c.snapshots[id];
    if (entry) entry.deleting = true;
  }
}

async function runMerge(
  store: Store,
  merge: Merge,
  faults: Faults,
  op: OperationContext,
): Promise<MergeDone> {
  const started = performance.now();
  const before = await allocatedBytes(merge.into);
  const done: MergeDone = {
    into: merge.into,
    layers: merge.layers,
    via: merge.via.kind,
    bytes: 0,
    ms: 0,
    pauses: 0,
  };
  op.phase('merge', `${merge.layers.join(', ')} into ${merge.into} (${merge.via.kind})`);
  try {
    if (await isMerged(merge)) {
      // A killed qsnap's merge that QEMU carried to its end meanwhile.
    } else if (merge.via.kind === 'live')
      done.pauses = await liveMerge(store, merge, merge.via.qemu, faults, op);
    else await mergeOffline(merge);
    await checkMerged(merge);
    await store.transact('merged', (c) => refreshIdentity(c, merge.into));
  } catch (err) {
    done.error = (err as Error).message;
    op.warn('QSNAP_STORE_DEFERRED', done.error);
  }
  done.bytes = (await allocatedBytes(merge.into)) - before;
  done.ms = performance.now() - started;
  return done;
}

/** A live merge holds the VM's intent lock: no snapshot of that VM starts while QEMU merges. */
async function liveMerge(
  store: Store,
  merge: Merge,
  qemu: QemuView,
  faults: Faults,
  op: OperationContext,
): Promise<number> {
  const qmpPath = qemu.vm!.qmp;
  const intents = new IntentStore(store.stateDir);
  await intents.assertNotBusy(qmpPath);
  // Connecting recovers a merge a killed qsnap left running: QEMU may have finished it by now.
  const { qmp } = await connectVm(qmpPath, { stateDir: store.stateDir });
  if (await isMerged(merge)) {
    await releaseUnusedNodes(qmp).finally(() => qmp.close());
    return 0;
  }
  let pauses = 0;
  const off = qmp.on('STOP', () => {
    pauses++;
  });
  try {
    const intent = await intents.acquire(qmpPath, {
      operation: 'merge',
      vmWasRunning: true,
      stage: 'prepared',
      tempFiles: [],
      overlays: [],
    });
    try {
      await mergeLive(qmp, merge, {
        onProgress: (done, total) => op.progress(done, total, 'merge'),
        bytesPerSecond: faults.has('slow-merge') ? 4 * 2 ** 20 : undefined,
      });
    } finally {
      await intent.release();
    }
  } finally {
    off();
    await qmp.close();
  }
  return pauses;
}

async function refreshIdentity(c: Catalog, path: string): Promise<void> {
  const layer = c.layers[path];
  if (!layer?.identity) return;
  const identity = await identityOf(path);
  if (identity) layer.identity = identity;
  const backing = (await readImage(path).catch(() => undefined))?.backing;
  if (backing) layer.backing = backing;
  else delete layer.backing;
}

/** Remove a file unless a process opened it since the plan was made. */
async function removeUnheld(path: string): Promise<boolean> {
  const key = await fileKey(path);
  if (key === undefined) return true;
  if ((await scanHolders()).has(key)) return false;
  await rm(path, { force: true });
  return true;
}

/** The catalog after the removals: entries of deleted snapshots, removed layers, waiting garbage, gone VMs. */
function settle(c: Catalog, plan: Plan, result: CollectResult): string[] {
  const deleted: string[] = [];
  for (const id of plan.snapshots) {
    const entry = c.snapshots[id];
    if (!entry) continue;
    deleted.push(entry.name);
    delete c.snapshots[id];
  }
  const removed = new Set(result.removed.map((f) => f.path));
  for (const path of [...removed, ...plan.forget]) delete c.layers[path];
  const now = new Date().toISOString();
  c.garbage = [
    ...c.garbage.filter((g) => !removed.has(g.path) && !result.waiting.some((w) => w.path === g.path)),
    ...result.waiting.map((w) => ({ path: w.path, reason: w.reason, since: now })),
  ];
  for (const [key, vm] of Object.entries(c.vms)) {
    const used =
      Object.values(c.snapshots).some((s) => s.vm === key) ||
      Object.values(c.layers).some((l) => l.vm === key);
    const alive =
      vm.pid !== undefined &&
      vm.startTime !== undefined &&
      isRunning({ pid: vm.pid, startTime: vm.startTime });
    if (!used && !alive) delete c.vms[key];
  }
  return deleted;
}
