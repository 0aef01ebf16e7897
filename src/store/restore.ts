import { Operation, type OperationContext } from '../engine/operation.js';
import { restore } from '../engine/restore/restore.js';
import type { RestoreOptions, RestoreResult } from '../engine/restore/types.js';
import { parseCommandLine } from '../vm/cmdline.js';
import { relocateSockets } from '../vm/cmdline-rewrite.js';
import { readChain } from '../vm/image-chain.js';
import { listeningSockets } from '../vm/peer.js';
import { isRunning, processIdentity } from '../vm/process.js';
import { StoreError } from './errors.js';
import { identityOf, sameIdentity } from './facts.js';
import type { Catalog, SnapshotEntry } from './schema.js';
import { forward } from './snapshot.js';
import { endOperation, finishedHere, newOperation, type Store } from './store.js';
import { vmKey } from './vms.js';

export interface StoreRestoreOptions
  extends Omit<RestoreOptions, 'file' | 'argv' | 'relocateSockets' | 'onPrepared' | 'onLaunched'> {
  name: string;
  /** A command line that wins over the recorded one. */
  argv?: string[];
  /** Run a command line that came inside an imported bundle (shown in the error otherwise). */
  trustCmdline?: boolean;
  /**
   * Asked, without `trustCmdline`, whether to run an imported snapshot's command line (the CLI
   * shows it and asks on a terminal); refused when it answers false or is not given.
   */
  confirmCmdline?: (argv: readonly string[], name: string) => Promise<boolean>;
}

export interface StoreRestoreResult extends RestoreResult {
  name: string;
  /** The restored VM's key in the catalog. */
  vmKey: string;
  cmdline: 'recorded' | 'given' | 'imported';
}

/** Restore a snapshot of the store by name, from the command line recorded with it. */
export function storeRestore(store: Store, options: StoreRestoreOptions): Operation<StoreRestoreResult> {
  return new Operation((op) => runStoreRestore(store, options, op));
}

export function findSnapshot(catalog: Catalog, name: string): SnapshotEntry {
  const entry = Object.values(catalog.snapshots).find((s) => s.name === name && !s.deleting);
  if (entry) return entry;
  throw new StoreError('QSNAP_STORE_NOT_FOUND', `the store has no snapshot named ${name}`, {
    hint: 'see qsnap list for the names',
    details: { name },
  });
}

async function runStoreRestore(
  store: Store,
  options: StoreRestoreOptions,
  op: OperationContext,
): Promise<StoreRestoreResult> {
  const catalog = await store.read();
  const entry = findSnapshot(catalog, options.name);
  await checkLayers(catalog, entry);
  const { argv, source } = await commandLine(entry, options);
  const relocate = await mustRelocate(catalog, entry, argv);
  const pending = await store.transact('restore', (c) => {
    const o = newOperation({ kind: 'restore', names: [entry.name] });
    c.operations.push(o);
    return o;
  });
  const { name: _n, argv: _a, trustCmdline: _t, confirmCmdline: _c, ...engine } = options;
  let result: RestoreResult;
  try {
    result = await forward(
      restore({
        ...engine,
        file: store.snapshotPath(entry),
        argv,
        relocateSockets: relocate,
        ...importedLayers(catalog, entry),
        onPlanned: (planned) =>
          store.transact('restore planned', (c) => recordPlanned(c, pending.id, planned)),
        onPrepared: (made) => store.transact('restore prepared', (c) => recordOverlays(c, pending.id, made)),
        onLaunched: (qemu) => store.transact('restore launched', (c) => recordLaunched(c, pending.id, qemu)),
      }),
      op,
    );
  } catch (err) {
    finishedHere(pending.id);
    await store.transact('restore failed', (c) => endOperation(c, pending.id)).catch(() => undefined);
    throw err;
  }
  op.phase('index');
  let key: string;
  try {
    key = await store.transact('restored', (c) => recordVm(c, pending.id, entry, result));
  } catch (err) {
    // The VM runs but the catalog could not say so (a full disk): the next store call adopts it.
    finishedHere(pending.id);
    throw err;
  }
  return { ...result, name: entry.name, vmKey: key, cmdline: source };
}

/**
 * The restored VM gets its own sockets (in its run directory) when the snapshotted VM still
 * runs, when the command line came from another machine, or when any socket it would listen on
 * is taken right now: QEMU unlinks a socket path before binding it, and would cut the other
 * process off.
 */
async function mustRelocate(catalog: Catalog, entry: SnapshotEntry, argv: string[]): Promise<boolean> {
  const original = catalog.vms[entry.vm];
  if (original?.pid !== undefined && isRunning({ pid: original.pid, startTime: original.startTime ?? '' }))
    return true;
  if (entry.cmdline?.source === 'imported') return true;
  const sockets = [...relocateSockets(parseCommandLine(argv), '/').moved.keys()];
  return (await listeningSockets(sockets)).length > 0;
}

/** An imported snapshot's disks were flattened into the store: restore pairs them by device. */
function importedLayers(catalog: Catalog, entry: SnapshotEntry): { frozenLayers?: Record<string, string> } {
  if (!entry.disks.some((d) => catalog.layers[d.top]?.origin === 'import')) return {};
  return { frozenLayers: Object.fromEntries(entry.disks.map((d) => [d.device, d.top])) };
}

async function commandLine(
  entry: SnapshotEntry,
  options: StoreRestoreOptions,
): Promise<{ argv: string[]; source: StoreRestoreResult['cmdline'] }> {
  if (options.argv?.length) return { argv: options.argv, source: 'given' };
  const recorded = entry.cmdline;
  if (!recorded)
    throw new StoreError(
      'QSNAP_STORE_NO_CMDLINE',
      `no QEMU command line is recorded with snapshot ${entry.name}`,
      {
        hint: `give it: qsnap restore ${entry.name} -- qemu-system-x86_64 …`,
      },
    );
  if (
    recorded.source === 'imported' &&
    !options.trustCmdline &&
    !(await options.confirmCmdline?.(recorded.argv, entry.name))
  )
    throw new StoreError(
      'QSNAP_STORE_UNTRUSTED',
      `snapshot ${entry.name} was imported; its command line was not recorded on this machine: ${recorded.argv.join(' ')}`,
      {
        hint: 'read it; if it is what you want to run, pass --trust-cmdline (or give your own after --)',
        details: { argv: recorded.argv },
      },
    );
  return { argv: recorded.argv, source: recorded.source === 'imported' ? 'imported' : 'recorded' };
}

/** Every layer the snapshot reads is there and is the file that froze: refused before anything starts. */
export async function checkLayers(catalog: Catalog, entry: SnapshotEntry): Promise<void> {
  for (const disk of entry.disks) {
    const chain = await readChain(disk.top).catch(() => [
      { path: disk.top, problem: `${disk.top}: missing` },
    ]);
    const broken = chain.find((i) => i.problem);
    if (broken) throw layerError(entry, disk.device, broken.problem!);
    for (const { path } of chain) {
      const recorded = catalog.layers[path]?.identity;
      const now = recorded && (await identityOf(path));
      if (recorded && now && !sameIdentity(recorded, now))
        throw layerError(entry, disk.device, `${path} was changed after it froze`);
    }
  }
}

function layerError(entry: SnapshotEntry, device: string, why: string): StoreError {
  return new StoreError('QSNAP_STORE_LAYER', `snapshot ${entry.name}, disk ${device}: ${why}`, {
    hint: 'put the disk layer back where it was (qsnap list shows each snapshot’s state); nothing was started',
    details: { name: entry.name, device },
  });
}

function recordPlanned(c: Catalog, opId: string, planned: { overlays: string[]; runDir: string }): void {
  const op = c.operations.find((o) => o.id === opId);
  if (op) Object.assign(op, { planned: planned.overlays, runDir: planned.runDir });
}

function recordOverlays(c: Catalog, opId: string, made: { overlays: string[]; runDir: string }): void {
  const op = c.operations.find((o) => o.id === opId);
  if (op) Object.assign(op, { overlays: made.overlays, runDir: made.runDir });
  const now = new Date().toISOString();
  for (const path of made.overlays) c.layers[path] = { path, origin: 'restore', createdAt: now };
}

/** The QEMU a restore started, in its record: a recovery stops it if it never got its state. */
function recordLaunched(c: Catalog, opId: string, qemu: { pid: number; qmp: string }): void {
  const op = c.operations.find((o) => o.id === opId);
  const identity = processIdentity(qemu.pid);
  if (!op || !identity) return;
  op.qemu = identity;
  op.vm = {
    key: vmKey({ ...identity, qmp: qemu.qmp }),
    qmp: qemu.qmp,
    ...identity,
    launchedBy: 'restore',
    seenAt: new Date().toISOString(),
  };
}

function recordVm(c: Catalog, opId: string, entry: SnapshotEntry, result: RestoreResult): string {
  endOperation(c, opId);
  const identity = processIdentity(result.pid);
  const vm = {
    key: '',
    qmp: result.qmp,
    ...(identity ? { pid: identity.pid, startTime: identity.startTime } : {}),
    launchedBy: 'restore' as const,
    from: entry.id,
    runDir: result.runDir,
    seenAt: new Date().toISOString(),
  };
  vm.key = vmKey(vm);
  c.vms[vm.key] = vm;
  for (const d of result.disks) {
    const layer = c.layers[d.overlayFile];
    if (layer) layer.vm = vm.key;
  }
  return vm.key;
}
