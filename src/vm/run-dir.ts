import { randomBytes } from 'node:crypto';
import { mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { isRunning, type ProcessIdentity, processIdentity } from './process.js';

/**
 * Run directories: where a QEMU that qsnap starts keeps its log, its private control socket
 * and (unless the command line says otherwise) its QMP socket — `$TMPDIR/qsnap-vm-XXXXXX`.
 * A QEMU that outlives qsnap (a detached restore) leaves its directory behind when it exits;
 * `qemu.json` in it names that QEMU (pid and start time), so a later sweep knows when it is gone.
 */
export const RUN_DIR_PREFIX = 'qsnap-vm-';
const IDENTITY_FILE = 'qemu.json';

/** QEMU binds a UNIX socket only if its path and a NUL fit in sun_path (108 bytes). */
export const MAX_SOCKET_PATH = 107;
/** The longest name qsnap gives a directory it keeps sockets in, with its longest socket's name. */
const LONGEST_SOCKET_ENTRY = 'qsnap-stream-xxxxxxxxxxxx/migration.sock'.length;

/**
 * Where qsnap makes the directories it keeps sockets in: TMPDIR, or /tmp when TMPDIR is so deep
 * that a socket in it could not be bound (QEMU would refuse the path as too long).
 */
export function socketHome(): string {
  const base = tmpdir();
  return Buffer.byteLength(base) + 1 + LONGEST_SOCKET_ENTRY <= MAX_SOCKET_PATH ? base : '/tmp';
}

export function makeRunDir(base = socketHome()): Promise<string> {
  return mkdtemp(join(base, RUN_DIR_PREFIX));
}

/**
 * A run directory's path, not yet made: a restore names it first (so its record can say where
 * it will be before anything exists) and makes it (mkdir, mode 0700) when it starts QEMU.
 */
export function runDirPath(base = socketHome()): string {
  return join(base, `${RUN_DIR_PREFIX}${randomBytes(6).toString('hex')}`);
}

/** Record which QEMU lives in `runDir`. */
export async function recordQemu(runDir: string, pid: number): Promise<void> {
  const identity = processIdentity(pid);
  if (identity) await writeFile(join(runDir, IDENTITY_FILE), `${JSON.stringify(identity)}\n`);
}

async function recordedQemu(runDir: string): Promise<ProcessIdentity | undefined> {
  try {
    const parsed = JSON.parse(
      await readFile(join(runDir, IDENTITY_FILE), 'utf8'),
    ) as Partial<ProcessIdentity>;
    return typeof parsed.pid === 'number' && typeof parsed.startTime === 'string'
      ? { pid: parsed.pid, startTime: parsed.startTime }
      : undefined;
  } catch {
    return undefined;
  }
}

/**
 * Remove the run directories under `base` whose recorded QEMU has exited; directories that
 * name no QEMU are left alone (they are not a detached restore's). Returns what was removed.
 */
export async function sweepStaleRunDirs(
  base = tmpdir(),
  options: { dryRun?: boolean } = {},
): Promise<string[]> {
  const removed: string[] = [];
  for (const name of await readdir(base).catch(() => [] as string[])) {
    if (!name.startsWith(RUN_DIR_PREFIX)) continue;
    const dir = join(base, name);
    const qemu = await recordedQemu(dir);
    if (!qemu || isRunning(qemu)) continue;
    if (!options.dryRun) await rm(dir, { recursive: true, force: true });
    removed.push(dir);
  }
  return removed;
}
