import { readFileSync, rmSync, writeFileSync } from 'node:fs';
import { lstat, mkdtemp, readdir, readFile, rename, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { basename, join } from 'node:path';
import { overlayKind } from '../engine/disks/naming.js';
import { isRunning, type ProcessIdentity, pidsMentioning, processIdentity } from '../vm/process.js';

/**
 * What a Machine leaves on the host, and how it is always removed. Each machine has a
 * directory `$TMPDIR/qsnap-machine-XXXXXX` (QEMU's run directory, sockets, log) and a
 * checkpoint directory of the same name on /dev/shm; `ledger.json` in the first says which
 * process owns them, which QEMUs run for it and which files qsnap created (disk overlays
 * beside the user's images). close() removes it all; SIGINT, SIGTERM and process exit do it
 * synchronously; after a SIGKILL the next Machine (or `qsnap gc`) finds a ledger whose owner
 * is gone and sweeps it.
 */
export const MACHINE_DIR_PREFIX = 'qsnap-machine-';
const LEDGER = 'ledger.json';

export interface Ledger {
  owner: ProcessIdentity;
  checkpointDir: string;
  qemus: ProcessIdentity[];
  /** Files qsnap created outside the two directories (overlays beside the user's disks). */
  files: string[];
}

export async function makeMachineDir(): Promise<string> {
  return mkdtemp(join(tmpdir(), MACHINE_DIR_PREFIX));
}

/** Written to a temp file and renamed: a reader sees the old ledger or the new one. */
export async function writeLedger(machineDir: string, ledger: Ledger): Promise<void> {
  const temp = join(machineDir, `${LEDGER}.tmp`);
  await writeFile(temp, `${JSON.stringify(ledger)}\n`);
  await rename(temp, join(machineDir, LEDGER));
}

async function readLedger(machineDir: string): Promise<Ledger | undefined> {
  try {
    const ledger = JSON.parse(await readFile(join(machineDir, LEDGER), 'utf8')) as Partial<Ledger>;
    const identity = (p: unknown): p is ProcessIdentity =>
      typeof (p as ProcessIdentity)?.pid === 'number' &&
      typeof (p as ProcessIdentity)?.startTime === 'string';
    if (!identity(ledger.owner) || typeof ledger.checkpointDir !== 'string') return undefined;
    return {
      owner: ledger.owner,
      checkpointDir: ledger.checkpointDir,
      qemus: (ledger.qemus ?? []).filter(identity),
      files: (ledger.files ?? []).filter((f): f is string => typeof f === 'string'),
    };
  } catch {
    return undefined;
  }
}

/** Only where a Machine puts checkpoints (layout.ts): a ledger cannot point rm elsewhere. */
function ownCheckpointDir(ledger: Ledger, machineDir: string): string | undefined {
  const allowed = [join('/dev/shm', basename(machineDir)), join(machineDir, 'checkpoints')];
  return allowed.includes(ledger.checkpointDir) ? ledger.checkpointDir : undefined;
}

/** A machine directory of this user: /tmp is shared, and another user's ledger is not evidence. */
async function ownedByMe(dir: string): Promise<boolean> {
  try {
    const info = await lstat(dir);
    return info.isDirectory() && info.uid === process.getuid?.();
  } catch {
    return false;
  }
}

/** Files a ledger names that qsnap made: overlays (qsnap's naming rule) only, never a user's image. */
function ownFile(path: string): boolean {
  return overlayKind(path) !== undefined;
}

/**
 * Remove what machines of processes that are gone left behind (their QEMUs are killed first).
 * Only this user's directories are looked at, and one without a readable ledger is left alone
 * (a Machine writes its ledger right after making the directory).
 */
export async function sweepMachines(
  base = tmpdir(),
  options: { dryRun?: boolean } = {},
): Promise<{ dirs: string[]; qemus: number[]; files: string[] }> {
  const swept = { dirs: [] as string[], qemus: [] as number[], files: [] as string[] };
  for (const name of await readdir(base).catch(() => [] as string[])) {
    if (!name.startsWith(MACHINE_DIR_PREFIX)) continue;
    const dir = join(base, name);
    if (!(await ownedByMe(dir))) continue;
    const ledger = await readLedger(dir);
    if (!ledger || isRunning(ledger.owner)) continue;
    const running = ledger.qemus.filter(isRunning);
    const unrecorded = qemusIn(dir).filter((q) => !running.some((r) => r.pid === q.pid));
    swept.dirs.push(dir);
    swept.qemus.push(...[...running, ...unrecorded].map((q) => q.pid));
    swept.files.push(...ledger.files.filter(ownFile));
    if (options.dryRun) continue;
    for (const qemu of [...running, ...unrecorded]) killIdentity(qemu);
    for (const file of ledger.files.filter(ownFile)) await rm(file, { force: true });
    const checkpointDir = ownCheckpointDir(ledger, dir);
    if (checkpointDir) await rm(checkpointDir, { recursive: true, force: true });
    await rm(dir, { recursive: true, force: true });
  }
  return swept;
}

/**
 * QEMUs whose command line names the machine's directory (its QMP and ops sockets live there)
 * though no ledger lists them: started by a harness killed before QEMU answered and was
 * recorded. Only QEMU processes (by their name): nothing else that mentions the path is touched.
 */
function qemusIn(machineDir: string): ProcessIdentity[] {
  return pidsMentioning(`${machineDir}/`)
    .filter((pid) => {
      try {
        return readFileSync(`/proc/${pid}/comm`, 'utf8').startsWith('qemu-');
      } catch {
        return false;
      }
    })
    .map(processIdentity)
    .filter((q): q is ProcessIdentity => q !== undefined);
}

function killIdentity(identity: ProcessIdentity): void {
  if (!isRunning(identity)) return;
  try {
    process.kill(identity.pid, 'SIGKILL');
  } catch {
    // gone meanwhile
  }
}

/** What a live machine removes synchronously when the process is ending (signal or exit). */
export interface Teardown {
  /** Kill its QEMUs and remove its files, without awaiting anything. */
  teardownSync(): void;
}

const live = new Set<Teardown>();
let hooked = false;

function onSignal(signal: NodeJS.Signals): void {
  teardownAll();
  unhook();
  // Deliver the signal again with our handlers gone: the process ends as it would have
  // (or the harness's own handlers run).
  process.kill(process.pid, signal);
}

const onSigint = () => onSignal('SIGINT');
const onSigterm = () => onSignal('SIGTERM');

function teardownAll(): void {
  for (const machine of live) {
    try {
      machine.teardownSync();
    } catch {
      // the others still go
    }
  }
  live.clear();
}

function unhook(): void {
  if (!hooked) return;
  hooked = false;
  process.off('SIGINT', onSigint);
  process.off('SIGTERM', onSigterm);
  process.off('exit', teardownAll);
}

/** While a machine lives, SIGINT, SIGTERM and exit tear it down. */
export function register(machine: Teardown): void {
  live.add(machine);
  if (hooked) return;
  hooked = true;
  process.on('SIGINT', onSigint);
  process.on('SIGTERM', onSigterm);
  process.on('exit', teardownAll);
}

/** The last machine gone: the process's signals behave as before. */
export function unregister(machine: Teardown): void {
  live.delete(machine);
  if (live.size === 0) unhook();
}

/** For teardownSync: the ledger's removal steps without awaiting. */
export function removeSync(paths: string[]): void {
  for (const path of paths) rmSync(path, { recursive: true, force: true });
}

export function killSync(pids: number[]): void {
  for (const pid of pids) {
    try {
      process.kill(pid, 'SIGKILL');
    } catch {
      // already gone
    }
  }
}

export function ownerIdentity(): ProcessIdentity {
  return processIdentity() ?? { pid: process.pid, startTime: '' };
}

export function writeLedgerSync(machineDir: string, ledger: Ledger): void {
  writeFileSync(join(machineDir, LEDGER), `${JSON.stringify(ledger)}\n`);
}

export function readLedgerSync(machineDir: string): string {
  return readFileSync(join(machineDir, LEDGER), 'utf8');
}
