import { createHash } from 'node:crypto';
import { mkdir, readdir, readFile, realpath, rename, rm, writeFile } from 'node:fs/promises';
import { basename, join, resolve } from 'node:path';
import { z } from 'zod';
import { isRunning, processIdentity } from '../vm/process.js';
import { SnapshotError } from './errors.js';

/**
 * Intent records: before qsnap changes a VM (pauses it, adds block nodes, changes migration
 * settings) it writes down what it is about to do, keyed by the VM's QMP socket. The record
 * doubles as a per-VM lock. If qsnap dies (even by SIGKILL) mid-operation, the next qsnap
 * command against that VM finds the record, sees its owner is gone, and puts the VM back
 * (snapshot/recovery.ts).
 */

const OverlaySchema = z.object({
  device: z.string(),
  node: z.string(),
  overlayFile: z.string(),
  overlayNode: z.string(),
  /** The transaction ran: the guest writes to the overlay now and it must stay. */
  inUse: z.boolean(),
});

export const IntentSchema = z.object({
  version: z.literal(1),
  qmp: z.string(),
  owner: z.object({ pid: z.number().int(), startTime: z.string() }),
  operation: z.enum(['snapshot', 'restore', 'merge']),
  vmWasRunning: z.boolean(),
  /** `precopy`: a live-precopy migration iterates while the guest runs (it pauses at `paused`). */
  stage: z.enum(['prepared', 'precopy', 'paused', 'streaming', 'finishing']),
  tempFiles: z.array(z.string()),
  overlays: z.array(OverlaySchema),
  /** The user's migration settings to put back (migration.ts MigrationSettings.saved). */
  migration: z
    .object({
      capabilities: z.array(z.object({ capability: z.string(), state: z.boolean() })),
      parameters: z.object({ 'max-bandwidth': z.number(), 'downtime-limit': z.number() }).partial(),
    })
    .optional(),
  createdAt: z.string(),
});
export type Intent = z.infer<typeof IntentSchema>;
export type IntentInit = Omit<Intent, 'version' | 'owner' | 'qmp' | 'createdAt'>;

/** A record whose owner is gone: `intent` is undefined when the file is unreadable. */
export interface StaleIntent {
  intent: Intent | undefined;
  remove(): Promise<void>;
}

export class IntentHandle {
  /** Updates are written one after another (tmp + rename), never interleaved. */
  private writes: Promise<void> = Promise.resolve();

  constructor(
    readonly path: string,
    private intent: Intent,
  ) {}

  get current(): Intent {
    return this.intent;
  }

  update(change: Partial<IntentInit>): Promise<void> {
    this.intent = { ...this.intent, ...change };
    const text = JSON.stringify(this.intent, null, 2);
    const write = async () => {
      const tmp = `${this.path}.${process.pid}.tmp`;
      await writeFile(tmp, text);
      await rename(tmp, this.path);
    };
    this.writes = this.writes.then(write, write);
    return this.writes;
  }

  async release(): Promise<void> {
    await this.writes.catch(() => undefined);
    await rm(this.path, { force: true });
  }
}

/** The intent records of one state directory (`<stateDir>/intents/<hash of the QMP socket>.json`). */
export class IntentStore {
  readonly dir: string;

  constructor(stateDir: string) {
    this.dir = join(resolve(stateDir), 'intents');
  }

  /**
   * Fails with QSNAP_SNAPSHOT_BUSY when a live qsnap holds this VM's lock. Checked before
   * connecting: QEMU serves one client per QMP socket, so a second connect would not fail but
   * wait, unanswered, until the first qsnap lets go.
   */
  async assertNotBusy(qmpPath: string): Promise<void> {
    const held = (await this.read(await this.pathFor(qmpPath)).catch(() => undefined))?.intent;
    if (held && isRunning(held.owner)) throw busy(held);
  }

  /**
   * Take the per-VM lock. Fails with QSNAP_SNAPSHOT_BUSY when a live qsnap holds it; a stale
   * record must have been recovered first (recoverStaleIntent).
   */
  async acquire(qmpPath: string, init: IntentInit): Promise<IntentHandle> {
    const path = await this.pathFor(qmpPath);
    await mkdir(this.dir, { recursive: true });
    const owner = processIdentity();
    const intent: Intent = {
      version: 1,
      qmp: resolve(qmpPath),
      owner: owner ?? { pid: process.pid, startTime: '' },
      createdAt: new Date().toISOString(),
      ...init,
    };
    try {
      await writeFile(path, JSON.stringify(intent, null, 2), { flag: 'wx' });
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
      const held = (await this.read(path))?.intent;
      if (held && isRunning(held.owner)) throw busy(held);
      throw new SnapshotError(
        'QSNAP_SNAPSHOT_BUSY',
        'an interrupted qsnap operation on this VM has not been recovered',
        { hint: 'run `qsnap status --qmp <socket>` to recover it' },
      );
    }
    return new IntentHandle(path, intent);
  }

  /** The record of a qsnap that died working on this VM, if there is one. */
  async findStale(qmpPath: string): Promise<StaleIntent | undefined> {
    const path = await this.pathFor(qmpPath);
    const found = await this.read(path);
    if (!found || (found.intent && isRunning(found.intent.owner))) return undefined;
    return { intent: found.intent, remove: () => this.removeRecord(path) };
  }

  /** The record and any update a qsnap killed mid-write left beside it (`<record>.<pid>.tmp`). */
  private async removeRecord(path: string): Promise<void> {
    const prefix = `${basename(path)}.`;
    const partial = (await readdir(this.dir).catch(() => [])).filter(
      (f) => f.startsWith(prefix) && f.endsWith('.tmp'),
    );
    for (const file of partial) await rm(join(this.dir, file), { force: true });
    await rm(path, { force: true });
  }

  private async pathFor(qmpPath: string): Promise<string> {
    let key = resolve(qmpPath);
    try {
      key = await realpath(qmpPath);
    } catch {
      // a socket that does not exist yet keys by its absolute path
    }
    const hash = createHash('sha256').update(key).digest('hex').slice(0, 24);
    return join(this.dir, `${hash}.json`);
  }

  /** The record at `path`: undefined when there is none, `intent` undefined when it is unreadable. */
  private async read(path: string): Promise<{ intent: Intent | undefined } | undefined> {
    let text: string;
    try {
      text = await readFile(path, 'utf8');
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
      throw err;
    }
    let raw: unknown;
    try {
      raw = JSON.parse(text);
    } catch {
      raw = undefined;
    }
    const parsed = IntentSchema.safeParse(raw);
    // An unreadable record cannot be acted on; it is stale and will be replaced.
    return { intent: parsed.success ? parsed.data : undefined };
  }
}

function busy(held: Intent): SnapshotError {
  return new SnapshotError(
    'QSNAP_SNAPSHOT_BUSY',
    `another qsnap (pid ${held.owner.pid}) is already working on this VM (${held.operation})`,
    {
      hint: 'wait for it to finish, then run the command again',
      details: { pid: held.owner.pid, operation: held.operation, since: held.createdAt },
    },
  );
}
