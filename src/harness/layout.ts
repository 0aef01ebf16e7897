import { mkdir, rm, statfs } from 'node:fs/promises';
import { basename, join } from 'node:path';
import { TMPFS_MAGIC } from '../engine/ram-protection.js';
import type { ParsedCommandLine } from '../vm/cmdline.js';
import { getOpt, parseQemuOpts } from '../vm/qemu-opts.js';
import { makeMachineDir, ownerIdentity, writeLedger } from './leftovers.js';

/**
 * Where a Machine keeps its things (see leftovers.ts for how they always go), and qsnap's
 * own QMP monitor that it adds to the command line.
 */

/** RAM files of a lazily reverted VM must be on tmpfs: only there can QEMU write-protect that RAM. */
async function checkpointBase(): Promise<string | undefined> {
  try {
    const fs = await statfs('/dev/shm');
    if (fs.type === TMPFS_MAGIC && fs.bavail * fs.bsize >= 2 * 2 ** 30) return '/dev/shm';
  } catch {
    // no /dev/shm
  }
  return undefined;
}

/** qsnap's own QMP monitor for checkpoints, so the user's -qmp socket stays free for the harness. */
const OPS_CHARDEV_ID = 'qsnap-ops';

export function opsMonitorArgs(path: string): string[] {
  return [
    '-chardev',
    `socket,id=${OPS_CHARDEV_ID},path=${path.replaceAll(',', ',,')},server=on,wait=off`,
    '-mon',
    `chardev=${OPS_CHARDEV_ID},mode=control`,
  ];
}

/** The ops monitor's socket in a (possibly relocated) command line. */
export function opsPath(parsed: ParsedCommandLine): string {
  for (const entry of parsed.entries) {
    if (entry.option !== '-chardev' || entry.value === undefined) continue;
    const o = parseQemuOpts(entry.value, 'backend');
    if (getOpt(o, 'id') === OPS_CHARDEV_ID) return getOpt(o, 'path')!;
  }
  throw new Error('the command line has no qsnap ops monitor');
}

export interface Layout {
  machineDir: string;
  runDir: string;
  checkpointDir: string;
  stateDir: string;
}

export async function makeLayout(): Promise<Layout> {
  const machineDir = await makeMachineDir();
  const shm = await checkpointBase();
  const checkpointDir = shm ? join(shm, basename(machineDir)) : join(machineDir, 'checkpoints');
  const layout = {
    machineDir,
    runDir: join(machineDir, 'run'),
    checkpointDir,
    stateDir: join(machineDir, 'state'),
  };
  await writeLedger(machineDir, { owner: ownerIdentity(), checkpointDir, qemus: [], files: [] });
  await Promise.all([mkdir(layout.runDir), mkdir(checkpointDir), mkdir(layout.stateDir)]);
  return layout;
}

export async function removeLayout(layout: Layout): Promise<void> {
  await rm(layout.checkpointDir, { recursive: true, force: true });
  await rm(layout.machineDir, { recursive: true, force: true });
}
