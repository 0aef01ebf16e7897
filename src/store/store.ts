import { randomUUID } from 'node:crypto';
import { mkdir } from 'node:fs/promises';
import { homedir } from 'node:os';
import { join, resolve } from 'node:path';
import { defaultStateDir } from '../engine/state-dir.js';
import { isRunning, processIdentity } from '../vm/process.js';
import { readCatalog, removeStaleTemporaries, writeCatalog } from './catalog-file.js';
import { StoreError } from './errors.js';
import { StoreLock } from './lock.js';
import type { Catalog, OperationEntry, SnapshotEntry } from './schema.js';
import { type StoreView, viewStore } from './view.js';

/**
 * Where a user's snapshots live: `$QSNAP_STORE`, else `$XDG_DATA_HOME/qsnap`, else
 * `~/.local/share/qsnap`. Read once where a front end starts.
 */
export function defaultStoreDir(env: NodeJS.ProcessEnv = process.env): string {
  if (env['QSNAP_STORE']) return resolve(env['QSNAP_STORE']);
  return join(env['XDG_DATA_HOME'] || join(homedir(), '.local', 'share'), 'qsnap');
}

export interface StoreOptions {
  /** The store directory (default: defaultStoreDir()). */
  dir?: string;
  /** Where per-VM intent records live (default: defaultStateDir()). */
  stateDir?: string;
}

/**
 * A snapshot store: `<dir>/catalog.json` (schema.ts), `<dir>/snapshots/<id>.qsnap` (files by
 * id, so a name never becomes a path), `<dir>/lock`. Disk layers stay beside the images.
 * Every change of the catalog is one transaction under the lock; operations that take long
 * (a snapshot, a merge) record themselves in the catalog and run outside the lock.
 */
export class Store {
  readonly catalogPath: string;
  readonly snapshotsDir: string;
  readonly lockPath: string;

  private constructor(
    readonly dir: string,
    readonly stateDir: string,
  ) {
    this.catalogPath = join(dir, 'catalog.json');
    this.snapshotsDir = join(dir, 'snapshots');
    this.lockPath = join(dir, 'lock');
  }

  /** Open a store, creating its directories (mode 0700: snapshots hold guest RAM) when missing. */
  static async open(options: StoreOptions = {}): Promise<Store> {
    const store = new Store(resolve(options.dir ?? defaultStoreDir()), options.stateDir ?? defaultStateDir());
    try {
      await mkdir(store.snapshotsDir, { recursive: true, mode: 0o700 });
    } catch (err) {
      // A read-only store can still be listed; writing to it fails with the same error later.
      if (!['EROFS', 'EACCES', 'EEXIST'].includes((err as NodeJS.ErrnoException).code ?? ''))
        throw accessError(store.dir, err);
    }
    return store;
  }

  snapshotPath(entry: Pick<SnapshotEntry, 'file'>): string {
    return join(this.snapshotsDir, entry.file);
  }

  read(): Promise<Catalog> {
    return readCatalog(this.catalogPath);
  }

  /** The catalog joined with what the files and /proc say now. */
  async view(catalog?: Catalog): Promise<StoreView> {
    return viewStore(catalog ?? (await this.read()), (e) => this.snapshotPath(e));
  }

  /**
   * Read the catalog, let `change` edit it, write it back: one atomic step under the lock. A
   * `change` that throws leaves the catalog as it was.
   */
  async transact<T>(what: string, change: (catalog: Catalog) => T | Promise<T>): Promise<T> {
    let lock: StoreLock;
    try {
      lock = await StoreLock.acquire(this.lockPath, what);
    } catch (err) {
      if (err instanceof StoreError) throw err;
      throw accessError(this.dir, err);
    }
    try {
      await removeStaleTemporaries(this.catalogPath);
      const catalog = await this.read();
      const result = await change(catalog);
      await writeCatalog(this.catalogPath, catalog).catch((err) =>
        Promise.reject(accessError(this.dir, err)),
      );
      return result;
    } finally {
      await lock.release();
    }
  }

  /**
   * Operations whose qsnap died before it ended them — or that this process began and no longer
   * runs (it could not write the catalog when the operation ended, e.g. its file system was full).
   */
  static staleOperations(catalog: Catalog): OperationEntry[] {
    const self = processIdentity();
    return catalog.operations.filter((op) =>
      self && op.owner.pid === self.pid && op.owner.startTime === self.startTime
        ? !running.has(op.id)
        : !isRunning(op.owner),
    );
  }
}

/** Operations this process runs now (their catalog records are not stale, whatever else happens). */
const running = new Set<string>();

/**
 * An operation that will run outside the lock, owned by this process (recorded by the caller's
 * transaction); `finishedHere` marks it ended in this process even if the catalog could not say so.
 */
export function newOperation(init: Omit<OperationEntry, 'id' | 'owner' | 'since'>): OperationEntry {
  const owner = processIdentity() ?? { pid: process.pid, startTime: '' };
  const op: OperationEntry = { id: randomUUID(), owner, since: new Date().toISOString(), ...init };
  running.add(op.id);
  return op;
}

export function finishedHere(id: string): void {
  running.delete(id);
}

export function endOperation(c: Catalog, id: string): void {
  c.operations = c.operations.filter((o) => o.id !== id);
  running.delete(id);
}

export function accessError(dir: string, err: unknown): StoreError {
  const code = (err as NodeJS.ErrnoException).code;
  const why =
    code === 'EROFS'
      ? 'is on a read-only file system'
      : code === 'EACCES'
        ? 'is not writable for this user'
        : `cannot be used (${(err as Error).message})`;
  return new StoreError('QSNAP_STORE_ACCESS', `the snapshot store ${dir} ${why}`, {
    hint: 'choose a writable store with --store DIR or QSNAP_STORE; nothing was changed',
    cause: err,
    details: { dir, errno: code },
  });
}
