/**
 * Helpers for tests that start real QEMU processes: whether QEMU is installed, whether a pid
 * is really gone, who still mentions a path on its command line, and a private TMPDIR so a
 * test can prove that a failed launch left no temp directory behind.
 */
import { readdirSync, readFileSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';

/**
 * True when no process has this pid any more. A zombie counts as gone: a QEMU whose parent
 * exited is reparented to pid 1, which reaps it when it gets to it.
 */
export function isGone(pid: number): boolean {
  try {
    process.kill(pid, 0);
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'ESRCH';
  }
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2).startsWith('Z');
  } catch {
    return true;
  }
}

/** Polls `isGone` until it holds or `timeoutMs` passes. */
export async function waitGone(pid: number, timeoutMs = 5000): Promise<boolean> {
  const deadline = Date.now() + timeoutMs;
  while (!isGone(pid)) {
    if (Date.now() > deadline) return false;
    await sleep(20);
  }
  return true;
}

/** SIGKILL by pid, ignoring a process that is already gone; waits until it is. */
export async function killPid(pid: number | undefined): Promise<void> {
  if (pid === undefined || isGone(pid)) return;
  try {
    process.kill(pid, 'SIGKILL');
  } catch {
    // gone in between
  }
  await waitGone(pid);
}

/** Pids of live processes whose command line contains `text` (a unique temp path). */
export function processesMentioning(text: string): number[] {
  const pids: number[] = [];
  for (const entry of readdirSync('/proc')) {
    if (!/^\d+$/.test(entry) || Number(entry) === process.pid) continue;
    try {
      const cmdline = readFileSync(`/proc/${entry}/cmdline`, 'utf8');
      if (cmdline.includes(text) && !isGone(Number(entry))) pids.push(Number(entry));
    } catch {
      // exited while we looked
    }
  }
  return pids;
}

/**
 * Runs `fn` with TMPDIR pointing at a fresh empty directory (os.tmpdir() reads it on every
 * call), and returns what `fn` returned or threw plus the directory's entries afterwards.
 */
export async function withPrivateTmpdir<T>(
  fn: () => Promise<T>,
): Promise<{ result: T | undefined; error: unknown; leftovers: string[] }> {
  const dir = await mkdtemp(join(tmpdir(), 'qsnap-test-tmp-'));
  const saved = process.env['TMPDIR'];
  process.env['TMPDIR'] = dir;
  try {
    let result: T | undefined;
    let error: unknown;
    try {
      result = await fn();
    } catch (err) {
      error = err;
    }
    return { result, error, leftovers: readdirSync(dir) };
  } finally {
    if (saved === undefined) delete process.env['TMPDIR'];
    else process.env['TMPDIR'] = saved;
    await rm(dir, { recursive: true, force: true });
  }
}

/** The error a promise rejects with; fails the test if it resolves. */
export async function rejection(promise: Promise<unknown>): Promise<Error & Record<string, unknown>> {
  try {
    await promise;
  } catch (err) {
    return err as Error & Record<string, unknown>;
  }
  throw new Error('expected a rejection');
}
