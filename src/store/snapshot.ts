import { randomUUID } from 'node:crypto';
import { IntentStore } from '../engine/intent.js';
import { Operation, type OperationContext } from '../engine/operation.js';
import { snapshot } from '../engine/snapshot/snapshot.js';
import type { SnapshotOptions, SnapshotResult } from '../engine/snapshot/types.js';
import { boundChain, waitForChainJob } from './chain-depth.js';
import { collect } from './collect.js';
import { StoreError } from './errors.js';
import { recordSnapshotLayers } from './layers.js';
import { checkName } from './names.js';
import type { Catalog, OperationEntry, SnapshotEntry } from './schema.js';
import { endOperation, finishedHere, newOperation, type Store } from './store.js';
import { identifyVm } from './vms.js';

export interface StoreSnapshotOptions
  extends Omit<SnapshotOptions, 'out' | 'overwrite' | 'stateDir' | 'commandLine'> {
  name: string;
  /** Replace a snapshot of that name (the old one is deleted chain-safely once the new one exists). */
  overwrite?: boolean;
  /** The VM's command line, when it cannot be read from its QEMU process (e.g. QMP over TCP from another host). */
  cmdline?: string[];
  /** The running VM's backing chain stays at most this long (default 8): older layers are streamed into its live overlay. */
  maxChain?: number;
}

export interface StoreSnapshotResult extends SnapshotResult {
  name: string;
  vm: string;
  cmdline: 'recorded' | 'given' | 'none';
  /** The live chain was longer than maxChain: QEMU streams older layers into the live overlay in the background. */
  shortening: { from: number; job: string } | undefined;
}

export const DEFAULT_MAX_CHAIN = 8;

/** Take a snapshot into the store under `name`. */
export function storeSnapshot(store: Store, options: StoreSnapshotOptions): Operation<StoreSnapshotResult> {
  return new Operation((op) => runStoreSnapshot(store, options, op));
}

async function runStoreSnapshot(
  store: Store,
  options: StoreSnapshotOptions,
  op: OperationContext,
): Promise<StoreSnapshotResult> {
  const name = checkName(options.name);
  const file = `${randomUUID()}.qsnap`;
  // A second snapshot of a VM that one runs now is refused at once (before anything connects).
  await new IntentStore(store.stateDir).assertNotBusy(options.qmp);
  const catalog = await store.read();
  const { vm, cmdline, noCmdline } = await identifyVm(catalog, options.qmp, options.cmdline);
  if (!cmdline)
    op.warn(
      'QSNAP_CMDLINE_UNKNOWN',
      `no command line recorded (${noCmdline}); restore it with -- <command line>`,
    );
  const pending = await store.transact('snapshot', (c) => {
    refuseTaken(c, name, options.overwrite ?? false);
    return reserve(c, { kind: 'snapshot', names: [name], file, vm, cmdline });
  });
  let result: SnapshotResult;
  try {
    if (catalog.vms[vm.key]?.chainJob) await waitForChainJob(options.qmp, store.stateDir, op);
    const { name: _n, overwrite: _o, cmdline: _c, maxChain: _m, ...engine } = options;
    result = await forward(
      snapshot({
        ...engine,
        out: store.snapshotPath({ file }),
        stateDir: store.stateDir,
        ...(cmdline ? { commandLine: cmdline.argv } : {}),
      }),
      op,
    );
  } catch (err) {
    // Best effort: a catalog that cannot be written now (a full disk) keeps the record, which
    // the next command finds stale and drops; the snapshot's own error is what the user needs.
    finishedHere(pending.id);
    await store.transact('snapshot failed', (c) => endOperation(c, pending.id)).catch(() => undefined);
    throw err;
  }
  op.phase('index');
  const replaced = await store
    .transact('snapshot done', async (c) => {
      endOperation(c, pending.id);
      return await record(c, pending, result);
    })
    .catch((err: unknown) => {
      // The file is published: the next command adopts it (recover.ts) from its manifest.
      finishedHere(pending.id);
      throw err;
    });
  if (replaced)
    await forward(collect(store, { deleting: [replaced] }), op).catch((err) =>
      op.warn('QSNAP_STORE_DEFERRED', (err as Error).message),
    );
  const shortening = await boundChain(store, options.qmp, result, options.maxChain ?? DEFAULT_MAX_CHAIN, op);
  if (shortening || catalog.vms[vm.key]?.chainJob)
    await store.transact('chain job', (c) => {
      const entry = c.vms[vm.key];
      if (!entry) return;
      if (shortening) entry.chainJob = shortening.job;
      else delete entry.chainJob;
    });
  return {
    ...result,
    name,
    vm: vm.key,
    cmdline: cmdline?.source === 'given' ? 'given' : cmdline ? 'recorded' : 'none',
    shortening,
  };
}

function refuseTaken(c: Catalog, name: string, overwrite: boolean): void {
  const taken = Object.values(c.snapshots).some((s) => s.name === name && !s.deleting);
  const inFlight = c.operations.some((o) => o.kind === 'snapshot' && o.names.includes(name));
  if (inFlight)
    throw new StoreError('QSNAP_STORE_EXISTS', `a snapshot named ${name} is being taken right now`, {
      hint: 'wait for it, or choose another name',
    });
  if (taken && !overwrite)
    throw new StoreError('QSNAP_STORE_EXISTS', `the store has a snapshot named ${name} already`, {
      hint: 'choose another name, delete that one (qsnap delete), or pass --overwrite',
    });
}

function reserve(c: Catalog, init: Omit<OperationEntry, 'id' | 'owner' | 'since'>): OperationEntry {
  const op = newOperation(init);
  c.operations.push(op);
  return op;
}

/**
 * The finished snapshot in the catalog: its entry, the VM, and its layers — the frozen tops
 * now immutable (identity and backing recorded), the new live overlays qsnap made. Returns the
 * id of the entry it replaces (overwrite), marked for deletion.
 */
async function record(
  c: Catalog,
  pending: OperationEntry,
  result: SnapshotResult,
): Promise<string | undefined> {
  const vm = pending.vm!;
  c.vms[vm.key] = { ...vm, seenAt: new Date().toISOString() };
  const old = Object.values(c.snapshots).find((s) => s.name === pending.names[0] && !s.deleting);
  if (old) old.deleting = true;
  c.snapshots[result.id] = entryOf(pending, result);
  await recordSnapshotLayers(c, result.disks, vm.key);
  return old?.id;
}

function entryOf(pending: OperationEntry, result: SnapshotResult): SnapshotEntry {
  return {
    name: pending.names[0]!,
    id: result.id,
    file: pending.file!,
    createdAt: result.pointInTime,
    vm: pending.vm!.key,
    ramBytes: result.ramBytes,
    allocatedBytes: result.allocatedBytes,
    downtimeMs: result.downtimeMs,
    strategy: result.strategy,
    machine: result.machine,
    qemuVersion: result.qemuVersion,
    disks: result.disks.map((d) => ({ device: d.device, top: d.frozenFile })),
    ...(pending.cmdline ? { cmdline: pending.cmdline } : {}),
  };
}

/** Run an engine operation inside this one, passing its events on. */
export async function forward<T>(inner: Operation<T>, op: OperationContext): Promise<T> {
  inner.on((event) => op.emit(event));
  const cancel = () => inner.cancel(op.signal.reason);
  op.signal.addEventListener('abort', cancel, { once: true });
  try {
    return await inner.result;
  } finally {
    op.signal.removeEventListener('abort', cancel);
  }
}
