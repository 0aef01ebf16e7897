import { open, readFile } from 'node:fs/promises';
import type { QmpClient } from '../../qmp/index.js';
import { ramFiles } from '../ram-protection.js';

/**
 * Guest RAM mapped from a file — a lazily restored VM maps it privately from the snapshot file —
 * has no page-table entries for the pages the guest has not touched since. A background
 * snapshot reads one byte of every guest page while the guest is stopped (QEMU's
 * ram_write_tracking_prepare), so there every untouched page is a page fault inside the pause:
 * 80–160 ms at 256 MiB on this project's host, against 3–10 ms for a booted guest. Reading the
 * mapping through /proc/<pid>/mem while the guest still runs takes the same faults outside the
 * pause (the kernel maps the file's pages in as it would for QEMU); QEMU's read then finds them
 * mapped. Nothing is written, and where the kernel refuses the read (another user's QEMU,
 * ptrace restrictions) or QEMU is not local, nothing is done: the pause is as long as before.
 */

/**
 * Read in pieces of this size into one buffer. Every page is read: a fault maps the file's
 * cached pages around it, but each hole of a sparse file (a snapshot's zero pages) is a fault
 * of its own, which a read of every 64 KiB would leave for QEMU's read in the pause.
 */
const CHUNK = 2 ** 20;

export interface Prefaulted {
  bytes: number;
  ms: number;
}

/** Pre-fault the file-backed guest RAM of local QEMU `qemuPid`; undefined when there is none. */
export async function prefaultFileRam(
  qmp: QmpClient,
  qemuPid: number | undefined,
): Promise<Prefaulted | undefined> {
  if (qemuPid === undefined) return undefined;
  const files = await ramFiles(qmp);
  if (files.length === 0) return undefined;
  return prefaultMappings(qemuPid, files).catch(() => undefined);
}

/** Read all of `pid`'s mappings of `files` (and throw it away). */
export async function prefaultMappings(
  pid: number,
  files: readonly string[],
): Promise<Prefaulted | undefined> {
  const ranges = mappingsOf(await readFile(`/proc/${pid}/maps`, 'utf8'), files);
  if (ranges.length === 0) return undefined;
  const started = performance.now();
  const mem = await open(`/proc/${pid}/mem`, 'r');
  const chunk = Buffer.allocUnsafe(CHUNK);
  let bytes = 0;
  try {
    for (const { start, end } of ranges) {
      for (let at = start; at < end; at += CHUNK) await mem.read(chunk, 0, Math.min(CHUNK, end - at), at);
      bytes += end - start;
    }
  } finally {
    await mem.close();
  }
  return { bytes, ms: performance.now() - started };
}

/** The address ranges of /proc/<pid>/maps lines that map one of `files`. */
export function mappingsOf(maps: string, files: readonly string[]): { start: number; end: number }[] {
  const wanted = new Set(files);
  const ranges: { start: number; end: number }[] = [];
  for (const line of maps.split('\n')) {
    // start-end perms offset dev inode pathname (the pathname may hold spaces)
    const m = /^([0-9a-f]+)-([0-9a-f]+) \S+ \S+ \S+ \d+\s+(.+)$/.exec(line);
    if (!m || !wanted.has(m[3]!)) continue;
    ranges.push({ start: Number.parseInt(m[1]!, 16), end: Number.parseInt(m[2]!, 16) });
  }
  return ranges;
}
