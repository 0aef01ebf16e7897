import { randomBytes } from 'node:crypto';
import { lstat, mkdir, readFile, realpath, rename, writeFile } from 'node:fs/promises';
import { dirname, isAbsolute, join } from 'node:path';
import PQueue from 'p-queue';
import { z } from 'zod';
import { connectVm } from '../engine/connect.js';
import { probeVm, type VmInfo } from '../engine/probe.js';
import { QmpClient } from '../qmp/index.js';
import { findQmpPeer } from '../vm/peer.js';
import { isRunning, type ProcessIdentity } from '../vm/process.js';
import { DaemonError } from './errors.js';

/** A VM the daemon holds: its QMP socket, its QEMU by identity, and its queue of operations. */
export interface AttachedVm {
  id: string;
  qmp: string;
  name: string | undefined;
  /** The QEMU serving the socket (pid and start time), when it is local. */
  qemu: ProcessIdentity | undefined;
  /** Its run state as last seen (query-status), or `gone` when its QEMU exited. */
  state: string;
  /** What the VM is (QEMU, machine, RAM, disks) as probed when it was attached. */
  info: VmInfo;
  /** Concurrency 1: a VM never has two operations at once. */
  queue: PQueue;
  /** A status query in flight: others share it (QEMU serves one QMP client at a time). */
  probe: Promise<string> | undefined;
  /** When the run state was last read from QEMU (performance.now()). */
  stateAt: number;
  attachedAt: string;
}

export function newId(prefix: 'vm' | 'o'): string {
  return `${prefix}-${randomBytes(6).toString('base64url').replace(/[-_]/g, 'x')}`;
}

/**
 * A QMP socket from a request: an absolute path (or relative to nothing: refused) to an existing
 * unix socket. The daemon only ever connects to it; it never reads or writes the path as a file.
 */
export async function checkQmpPath(path: string): Promise<string> {
  if (!isAbsolute(path) || path.includes('\0'))
    throw new DaemonError('QSNAP_DAEMON_PATH', `the QMP socket must be an absolute path: ${path}`, {
      hint: 'give the full path of the unix socket QEMU listens on (-qmp unix:PATH,server=on,wait=off)',
      details: { path },
    });
  const info = await lstat(path).catch(() => undefined);
  if (!info?.isSocket())
    throw new DaemonError('QSNAP_DAEMON_PATH', `${path} is not a unix socket`, {
      hint: 'give the QMP socket of a running QEMU (-qmp unix:PATH,server=on,wait=off)',
      details: { path },
    });
  return realpath(path);
}

/**
 * Connect once as every qsnap command does (finishing whatever an interrupted qsnap left on the
 * VM), read its run state, and hang up: QEMU serves one QMP client at a time and the engine
 * connects for each operation.
 */
export async function attachVm(
  qmpPath: string,
  stateDir: string,
  id: string,
  name: string | undefined,
): Promise<{ vm: AttachedVm; recovered: string[] }> {
  const peer = await findQmpPeer(qmpPath);
  const { qmp, recovery } = await connectVm(qmpPath, { stateDir });
  try {
    const info = await probeVm(qmp);
    const vm: AttachedVm = {
      id,
      qmp: qmpPath,
      name,
      qemu: peer.found ? { pid: peer.pid, startTime: peer.startTime } : undefined,
      state: info.runState,
      info,
      queue: new PQueue({ concurrency: 1 }),
      probe: undefined,
      stateAt: performance.now(),
      attachedAt: new Date().toISOString(),
    };
    return { vm, recovered: recovery.recovered ? recovery.actions : [] };
  } finally {
    await qmp.close();
  }
}

/** Whether the VM's QEMU still runs (a VM not known by pid is checked by connecting). */
export function qemuAlive(vm: AttachedVm): boolean {
  return vm.qemu ? isRunning(vm.qemu) : true;
}

/** The run state now, by a short QMP connection; concurrent callers share one. */
export function queryState(vm: AttachedVm): Promise<string> {
  vm.probe ??= (async () => {
    const qmp = await QmpClient.connect(vm.qmp, { connectTimeoutMs: 2000 });
    try {
      return (await qmp.execute('query-status', undefined, { timeoutMs: 2000 })).status;
    } finally {
      await qmp.close();
    }
  })().finally(() => {
    vm.probe = undefined;
    vm.stateAt = performance.now();
  });
  return vm.probe;
}

export function vmGone(vm: AttachedVm): DaemonError {
  return new DaemonError('QSNAP_DAEMON_VM_GONE', `the QEMU of VM ${vm.id} (${vm.qmp}) has exited`, {
    hint: 'detach it (qsnap keeps its snapshots), or restore one of them',
    details: { vm: vm.id },
  });
}

/** What the daemon remembers across restarts: the VMs it had attached. */
const StateFile = z.object({
  version: z.literal(1),
  vms: z.array(
    z.object({
      id: z.string(),
      qmp: z.string(),
      name: z.string().optional(),
      qemu: z.object({ pid: z.number(), startTime: z.string() }).optional(),
    }),
  ),
});
export type DaemonState = z.infer<typeof StateFile>;

export function statePath(stateDir: string): string {
  return join(stateDir, 'daemon-vms.json');
}

export async function readDaemonState(stateDir: string): Promise<DaemonState> {
  const text = await readFile(statePath(stateDir), 'utf8').catch(() => undefined);
  if (text === undefined) return { version: 1, vms: [] };
  const parsed = StateFile.safeParse(JSON.parse(text));
  return parsed.success ? parsed.data : { version: 1, vms: [] };
}

/** Written to a temporary file and renamed over the old one: a kill never leaves half a file. */
export async function writeDaemonState(stateDir: string, vms: Iterable<AttachedVm>): Promise<void> {
  const state: DaemonState = {
    version: 1,
    vms: [...vms].map((v) => ({
      id: v.id,
      qmp: v.qmp,
      ...(v.name ? { name: v.name } : {}),
      ...(v.qemu ? { qemu: v.qemu } : {}),
    })),
  };
  const path = statePath(stateDir);
  await mkdir(dirname(path), { recursive: true, mode: 0o700 });
  const tmp = `${path}.tmp-${process.pid}`;
  await writeFile(tmp, `${JSON.stringify(state, null, 2)}\n`, { mode: 0o600 });
  await rename(tmp, path);
}
