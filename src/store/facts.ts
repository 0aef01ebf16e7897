import { readdir, readFile, readlink, stat } from 'node:fs/promises';
import { processStartTime } from '../vm/process.js';
import type { Identity } from './schema.js';

/**
 * Facts read off the machine, never remembered: who has a file open (every process's
 * /proc/<pid>/fd — QEMU keeps every image of a chain and a mapped RAM file open), a file's
 * identity and its allocated size.
 */

/** A process holding a file open. */
export interface Holder {
  pid: number;
  startTime: string;
  /** /proc/<pid>/comm, e.g. "qemu-system-x86". */
  comm: string;
}

/** Open files of every process this user may look at, keyed by device and inode (fileKey). */
export type HolderMap = Map<string, Holder[]>;

/** A file's device and inode as one key, the same whether read from a path or an open descriptor. */
export async function fileKey(path: string): Promise<string | undefined> {
  try {
    const st = await stat(path, { bigint: true });
    return `${st.dev}:${st.ino}`;
  } catch {
    return undefined;
  }
}

export async function scanHolders(): Promise<HolderMap> {
  const holders: HolderMap = new Map();
  const pids = (await readdir('/proc')).filter((name) => /^\d+$/.test(name)).map(Number);
  await Promise.all(pids.map((pid) => scanProcess(pid, holders)));
  return holders;
}

async function scanProcess(pid: number, holders: HolderMap): Promise<void> {
  if (pid === process.pid) return; // this qsnap's own descriptors never hold a layer
  const dir = `/proc/${pid}/fd`;
  const fds = await readdir(dir).catch(() => [] as string[]);
  if (fds.length === 0) return;
  const startTime = processStartTime(pid);
  if (startTime === undefined) return;
  const comm = (await readFile(`/proc/${pid}/comm`, 'utf8').catch(() => '?')).trim();
  const seen = new Set<string>();
  for (const fd of fds) {
    const target = await readlink(`${dir}/${fd}`).catch(() => '');
    if (!target.startsWith('/') || target.startsWith('/dev/') || target.startsWith('/proc/')) continue;
    const key = await fileKey(`${dir}/${fd}`);
    if (!key || seen.has(key)) continue;
    seen.add(key);
    const list = holders.get(key) ?? [];
    list.push({ pid, startTime, comm });
    holders.set(key, list);
  }
}

/** The identity of a file now (undefined when it is gone). */
export async function identityOf(path: string): Promise<Identity | undefined> {
  try {
    const st = await stat(path, { bigint: true });
    return { dev: String(st.dev), ino: String(st.ino), size: String(st.size), mtimeNs: String(st.mtimeNs) };
  } catch {
    return undefined;
  }
}

export function sameIdentity(a: Identity, b: Identity): boolean {
  return a.dev === b.dev && a.ino === b.ino && a.size === b.size && a.mtimeNs === b.mtimeNs;
}

/** Bytes a file takes on disk (its allocated blocks; 0 when it is gone). */
export async function allocatedBytes(path: string): Promise<number> {
  try {
    return (await stat(path)).blocks * 512;
  } catch {
    return 0;
  }
}
