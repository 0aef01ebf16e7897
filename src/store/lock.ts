import { randomBytes } from 'node:crypto';
import { link, open, readFile, rename, rm, stat } from 'node:fs/promises';
import { setTimeout as sleep } from 'node:timers/promises';
import { isRunning, processIdentity } from '../vm/process.js';
import { StoreError } from './errors.js';

/** Who holds the store's lock, as the lock file says (restic's locks name their holder the same way). */
export interface LockHolder {
  pid: number;
  startTime: string;
  operation: string;
  since: string;
}

/** A lock file being written right now is empty for a moment; one empty this long was cut short by a crash. */
const HALF_WRITTEN_MS = 5000;

/**
 * The store's lock: a file created with O_EXCL that names its holder. It is held only while
 * the catalog is read, changed and rewritten (milliseconds), never across a long operation
 * (those record themselves in the catalog instead). A holder that died (by pid and start time)
 * leaves a stale lock, which the next qsnap breaks.
 */
export class StoreLock {
  private constructor(
    private readonly path: string,
    private readonly text: string,
  ) {}

  static async acquire(path: string, operation: string, timeoutMs = 30_000): Promise<StoreLock> {
    const identity = processIdentity() ?? { pid: process.pid, startTime: '' };
    const text = JSON.stringify({
      ...identity,
      operation,
      since: new Date().toISOString(),
    } satisfies LockHolder);
    const deadline = Date.now() + timeoutMs;
    for (let wait = 2; ; wait = Math.min(wait * 2, 100)) {
      if (await tryCreate(path, text)) return new StoreLock(path, text);
      const held = await readHolder(path);
      if (await isStale(path, held)) await breakStale(path, held.text);
      else if (Date.now() > deadline) throw lockedError(path, held.holder);
      else await sleep(wait);
    }
  }

  /** Remove the lock if it is still this one (a breaker may have replaced a lock it took for stale). */
  async release(): Promise<void> {
    const now = await readFile(this.path, 'utf8').catch(() => undefined);
    if (now === this.text) await rm(this.path, { force: true });
  }
}

async function tryCreate(path: string, text: string): Promise<boolean> {
  let file: Awaited<ReturnType<typeof open>>;
  try {
    file = await open(path, 'wx', 0o600);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'EEXIST') return false;
    throw err;
  }
  try {
    await file.writeFile(text);
    await file.sync();
  } finally {
    await file.close();
  }
  return true;
}

async function readHolder(
  path: string,
): Promise<{ text: string | undefined; holder: LockHolder | undefined }> {
  const text = await readFile(path, 'utf8').catch(() => undefined);
  try {
    return { text, holder: text ? (JSON.parse(text) as LockHolder) : undefined };
  } catch {
    return { text, holder: undefined };
  }
}

async function isStale(
  path: string,
  held: { text: string | undefined; holder: LockHolder | undefined },
): Promise<boolean> {
  if (held.text === undefined) return false; // gone already: try again
  if (held.holder && typeof held.holder.pid === 'number') return !isRunning(held.holder);
  const age = await stat(path).then(
    (s) => Date.now() - s.mtimeMs,
    () => 0,
  );
  return age > HALF_WRITTEN_MS;
}

/**
 * Move the stale lock aside and remove it. If what was moved is not the stale lock (its owner
 * released it and another qsnap took it in between), it is put back.
 */
async function breakStale(path: string, seen: string | undefined): Promise<void> {
  const aside = `${path}.stale-${process.pid}-${randomBytes(4).toString('hex')}`;
  try {
    await rename(path, aside);
  } catch {
    return; // someone else broke it first
  }
  const moved = await readFile(aside, 'utf8').catch(() => undefined);
  if (moved !== seen) await link(aside, path).catch(() => undefined);
  await rm(aside, { force: true });
}

function lockedError(path: string, holder: LockHolder | undefined): StoreError {
  const who = holder
    ? `qsnap pid ${holder.pid} (${holder.operation}, since ${holder.since})`
    : 'another qsnap';
  return new StoreError('QSNAP_STORE_LOCKED', `the store is locked by ${who}`, {
    hint: `wait for it to finish; if no such process runs, remove ${path}`,
    details: { lock: path, ...(holder ? { holder } : {}) },
  });
}
