import { readChain } from '../vm/image-chain.js';

/** One checkpoint of a Machine: a snapshot file plus the disk layers it needs. */
export interface Checkpoint {
  /** Unique within its machine; [A-Za-z0-9._-]{1,64} (store names). */
  name: string;
  file: string;
  id: string;
  createdAt: string;
  /** How long the guest was paused for it. */
  downtimeMs: number;
  /** Disk layers this checkpoint needs; never deleted while the checkpoint exists. */
  frozenFiles: string[];
  /** The QEMU command line (without the binary) it was taken from: what a revert or a clone starts. */
  argv: string[];
  binary: string;
  ramBytes: number;
  machineType: string;
}

/**
 * A machine's checkpoints by name, and the garbage rule for the disk overlays qsnap made for
 * it: an overlay is needed while it is in the backing chain of a checkpoint's frozen layer or
 * of an image the current QEMU writes to; every other overlay qsnap created can go.
 */
export class CheckpointCatalog {
  private readonly byName = new Map<string, Checkpoint>();
  private readonly deletedIds = new Set<string>();

  list(): Checkpoint[] {
    return [...this.byName.values()];
  }

  get(name: string): Checkpoint | undefined {
    return this.byName.get(name);
  }

  /** The catalogued checkpoint with this id (undefined: not this machine's, or deleted). */
  byId(id: string): Checkpoint | undefined {
    return this.list().find((c) => c.id === id);
  }

  wasDeleted(id: string): boolean {
    return this.deletedIds.has(id);
  }

  /** Add (or replace the one of the same name); returns the replaced one. */
  put(checkpoint: Checkpoint): Checkpoint | undefined {
    const replaced = this.byName.get(checkpoint.name);
    if (replaced) this.deletedIds.add(replaced.id);
    this.byName.set(checkpoint.name, checkpoint);
    return replaced;
  }

  remove(checkpoint: Checkpoint): void {
    this.byName.delete(checkpoint.name);
    this.deletedIds.add(checkpoint.id);
  }

  /** Of `created`, the files no checkpoint and no image in `inUse` needs (through backing chains). */
  async garbage(created: Iterable<string>, inUse: Iterable<string>): Promise<string[]> {
    const needed = new Set<string>();
    const tops = [...inUse, ...this.list().flatMap((c) => c.frozenFiles)];
    for (const top of tops) {
      needed.add(top);
      try {
        for (const image of await readChain(top)) needed.add(image.path);
      } catch {
        // an unreadable top keeps only itself
      }
    }
    return [...created].filter((f) => !needed.has(f));
  }
}
