import { realpath } from 'node:fs/promises';
import { basename, resolve } from 'node:path';
import { findQmpPeer, qemuCommandLine } from '../vm/peer.js';
import { getOpt, parseQemuOpts } from '../vm/qemu-opts.js';
import type { Catalog, SnapshotEntry, VmEntry } from './schema.js';

/** A QEMU as the catalog knows it: by pid and start time when local, else by its QMP endpoint. */
export function vmKey(vm: Pick<VmEntry, 'pid' | 'startTime' | 'qmp'>): string {
  return vm.pid !== undefined && vm.startTime !== undefined ? `${vm.pid}-${vm.startTime}` : `qmp:${vm.qmp}`;
}

export interface IdentifiedVm {
  vm: VmEntry;
  /** The command line to record with a snapshot of it, and where it came from. */
  cmdline: SnapshotEntry['cmdline'];
  /** Why no command line could be read (for the user, when none was given). */
  noCmdline?: string;
}

/**
 * Who is on the other end of a QMP socket: the one local QEMU serving it (never guessed — the
 * listening socket's owner in /proc), the VM the catalog already knows by that identity (a VM
 * qsnap restored keeps the command line it was restored from), and its command line: given
 * by the user, else the catalog's, else /proc/<pid>/cmdline.
 */
export async function identifyVm(catalog: Catalog, qmp: string, given?: string[]): Promise<IdentifiedVm> {
  const path = await realpath(qmp).catch(() => resolve(qmp));
  const found = await findQmpPeer(qmp);
  // Only a QEMU is a VM: a socket served by something else (a proxy) names no VM and no command line.
  const peer: typeof found =
    found.found && !basename(found.exe).startsWith('qemu')
      ? { found: false, reason: 'no-process', detail: `${qmp} is served by ${found.exe}, not by QEMU` }
      : found;
  const seenAt = new Date().toISOString();
  const base: VmEntry = peer.found
    ? { key: '', qmp: path, pid: peer.pid, startTime: peer.startTime, launchedBy: 'user', seenAt }
    : { key: '', qmp: path, launchedBy: 'user', seenAt };
  base.key = vmKey(base);
  const known = catalog.vms[base.key];
  const vm: VmEntry = known ? { ...known, qmp: path, seenAt } : base;
  const name = peer.found ? guestName(peer.argv) : undefined;
  if (name) vm.name = name;
  if (given) return { vm, cmdline: { argv: given, source: 'given' } };
  const recorded = lastCommandLine(catalog, vm.key);
  if (recorded) return { vm, cmdline: recorded };
  if (peer.found) return { vm, cmdline: { argv: qemuCommandLine(peer.argv), source: 'recorded' } };
  return { vm, cmdline: undefined, noCmdline: `${peer.reason}: ${peer.detail}` };
}

/**
 * A VM qsnap restored runs a rewritten command line (overlays, -incoming, maybe RAM mapped from
 * a snapshot file); the command line to record for it is the one it was restored from.
 */
function lastCommandLine(catalog: Catalog, key: string): SnapshotEntry['cmdline'] {
  const vm = catalog.vms[key];
  if (vm?.launchedBy !== 'restore' || vm.from === undefined) return undefined;
  const from = catalog.snapshots[vm.from];
  return from?.cmdline && from.cmdline.source !== 'imported'
    ? { argv: from.cmdline.argv, source: 'recorded' }
    : undefined;
}

/** `-name NAME` or `-name guest=NAME,…`, as QEMU reads it (softmmu/vl.c, qemu_name). */
function guestName(argv: readonly string[]): string | undefined {
  const i = argv.lastIndexOf('-name');
  const value = i >= 0 ? argv[i + 1] : undefined;
  if (!value) return undefined;
  const o = parseQemuOpts(value, 'guest');
  return o.implied ?? getOpt(o, 'guest');
}
