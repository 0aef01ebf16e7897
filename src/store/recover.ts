import { readlinkSync } from 'node:fs';
import { access, rm } from 'node:fs/promises';
import { basename } from 'node:path';
import { openSnapshot } from '../format/index.js';
import { QmpClient } from '../qmp/index.js';
import { isRunning, pidsMentioning, processIdentity } from '../vm/process.js';
import { RUN_DIR_PREFIX } from '../vm/run-dir.js';
import { collect } from './collect.js';
import { allocatedBytes } from './facts.js';
import { recordSnapshotLayers } from './layers.js';
import type { Catalog, OperationEntry } from './schema.js';
import { endOperation, Store } from './store.js';

/**
 * Finish what a qsnap that died left in the catalog, as the intent records do for a VM: a
 * snapshot whose file was published but not yet catalogued is adopted (its manifest says what
 * it is), one that never finished is forgotten (its VM is put back by the intent record, its
 * partial file is garbage); a restore's overlays are already recorded as restore overlays
 * (removed once nothing holds them); a delete that was cut short is carried to its end.
 * Returns what it did, for the user.
 */
export async function recoverStore(store: Store): Promise<string[]> {
  const catalog = await store.read();
  const stale = Store.staleOperations(catalog);
  const deleting = Object.values(catalog.snapshots).some((s) => s.deleting);
  if (stale.length === 0 && !deleting) return [];
  const actions = stale.length ? await store.transact('recover', (c) => recoverOperations(store, c)) : [];
  if (deleting || actions.some((a) => a.startsWith('finishing'))) {
    const result = await collect(store, { deleting: [] }).result;
    if (result.deleted.length) actions.push(`finished deleting ${result.deleted.join(', ')}`);
  }
  return actions;
}

async function recoverOperations(store: Store, c: Catalog): Promise<string[]> {
  const actions: string[] = [];
  for (const op of Store.staleOperations(c)) {
    endOperation(c, op.id);
    if (op.kind === 'snapshot') actions.push(await adoptOrForget(store, c, op));
    else if (op.kind === 'restore') actions.push(await settleRestore(c, op));
    else actions.push(`finishing the interrupted delete of ${op.names.join(', ')}`);
  }
  return actions;
}

async function adoptOrForget(store: Store, c: Catalog, op: OperationEntry): Promise<string> {
  const file = store.snapshotPath({ file: op.file! });
  const name = op.names[0]!;
  const published = await access(file).then(
    () => true,
    () => false,
  );
  if (!published || !op.vm) return `forgot the unfinished snapshot ${name}`;
  const reader = await openSnapshot(file).catch(() => undefined);
  if (!reader) {
    c.garbage.push({
      path: file,
      reason: `unreadable file of the interrupted snapshot ${name}`,
      since: new Date().toISOString(),
    });
    return `the interrupted snapshot ${name} left an unreadable file: garbage`;
  }
  try {
    const m = reader.manifest;
    c.vms[op.vm.key] ??= op.vm;
    c.snapshots[m.id] = {
      name,
      id: m.id,
      file: op.file!,
      createdAt: m.pointInTime.wallClock,
      vm: op.vm.key,
      ramBytes: m.vm.ramBytes,
      allocatedBytes: await allocatedBytes(file),
      downtimeMs: m.timings.downtimeMs,
      strategy: m.strategy,
      machine: m.qemu.machine,
      qemuVersion: `${m.qemu.version.major}.${m.qemu.version.minor}.${m.qemu.version.micro}`,
      disks: m.disks.map((d) => ({ device: d.device, top: d.frozenFile })),
      ...(op.cmdline ? { cmdline: op.cmdline } : {}),
    };
    await recordSnapshotLayers(c, m.disks, op.vm.key);
    return `adopted snapshot ${name}, finished by a qsnap that died before cataloguing it`;
  } finally {
    await reader.close();
  }
}

/**
 * A restore whose qsnap died: the QEMU it started either got its state (it runs: adopted as a
 * restored VM) or waits for it forever in `inmigrate` (stopped: it is qsnap's and of no use).
 * Its overlays are restore overlays: gc removes them once nothing holds them.
 */
async function settleRestore(c: Catalog, op: OperationEntry): Promise<string> {
  const what = `the interrupted restore of ${op.names.join(', ')}`;
  if (!op.qemu || !op.vm || !isRunning(op.qemu)) {
    await clearAbandoned(c, op);
    return `forgot ${what}; its overlays go once nothing holds them`;
  }
  const status = await runState(op.vm.qmp);
  if (status === 'inmigrate' || status === undefined) {
    process.kill(op.qemu.pid, 'SIGKILL');
    // Gone before the sweep that follows looks at its run directory.
    for (let i = 0; i < 100 && isRunning(op.qemu); i++) await new Promise((r) => setTimeout(r, 20));
    return `stopped the QEMU ${what} had started (pid ${op.qemu.pid}, it never got its state)`;
  }
  const from = Object.values(c.snapshots).find((s) => s.name === op.names[0]);
  c.vms[op.vm.key] = {
    ...op.vm,
    ...(from ? { from: from.id } : {}),
    ...(op.runDir ? { runDir: op.runDir } : {}),
  };
  for (const path of op.overlays ?? []) if (c.layers[path]) c.layers[path].vm = op.vm.key;
  return `adopted the VM ${what} had started (pid ${op.qemu.pid}, ${status})`;
}

/**
 * What a restore left that got no QEMU of its own, or whose QEMU is gone: a QEMU it started in
 * the instant before it could record it (waiting in `-incoming defer` for a state that never
 * comes: killed), the overlays it was about to make or made but did not record as layers, and
 * its run directory.
 */
async function clearAbandoned(c: Catalog, op: OperationEntry): Promise<void> {
  if (op.runDir && !op.qemu) {
    for (const pid of pidsMentioning(`${op.runDir}/`)) {
      const identity = processIdentity(pid);
      if (!identity || !isQemuBinary(pid)) continue;
      process.kill(pid, 'SIGKILL');
      for (let i = 0; i < 100 && isRunning(identity); i++) await new Promise((r) => setTimeout(r, 20));
    }
  }
  for (const path of op.planned ?? []) if (!c.layers[path]) await rm(path, { force: true });
  // Only a directory qsnap named itself (a caller's own --run-dir is theirs to keep).
  if (op.runDir && basename(op.runDir).startsWith(RUN_DIR_PREFIX))
    await rm(op.runDir, { recursive: true, force: true });
}

function isQemuBinary(pid: number): boolean {
  try {
    return basename(readlinkSync(`/proc/${pid}/exe`)).startsWith('qemu-system');
  } catch {
    return false;
  }
}

async function runState(qmp: string): Promise<string | undefined> {
  const client = await QmpClient.connect(qmp, { connectTimeoutMs: 2000 }).catch(() => undefined);
  if (!client) return undefined;
  try {
    return (await client.execute('query-status')).status;
  } finally {
    await client.close();
  }
}
