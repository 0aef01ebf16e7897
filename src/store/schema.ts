import path from 'node:path';
import { z } from 'zod';

/**
 * The store's catalog (`<store>/catalog.json`): what cannot be read off the files themselves.
 * Backing chains are read from the images' headers and who holds a file from /proc, every
 * time; the catalog keeps the snapshots by name, which files qsnap created (only those may
 * ever be merged into or removed), what each immutable layer looked like when it froze (to
 * notice a change behind qsnap's back), the QEMUs qsnap snapshotted or started, files waiting
 * to be removed once nothing holds them, and operations in flight (for crash recovery).
 */
export const CATALOG_FORMAT = 'qsnap-store';
export const CATALOG_VERSION = 1;

const AbsolutePath = z.string().refine((p) => path.isAbsolute(p), 'expected an absolute path');
const IsoTime = z.iso.datetime({ offset: true });
const UInt = z.int().nonnegative();
const Name = z.string().regex(/^[A-Za-z0-9._-]{1,64}$/);
const Owner = z.object({ pid: z.int().positive(), startTime: z.string() });

/** A file's identity when it became immutable: a change of any field means it changed or moved. */
export const IdentitySchema = z.object({
  dev: z.string(),
  ino: z.string(),
  size: z.string(),
  mtimeNs: z.string(),
});
export type Identity = z.infer<typeof IdentitySchema>;

export const SnapshotEntrySchema = z.object({
  name: Name,
  /** The snapshot's id (its manifest's). */
  id: z.uuid(),
  /** File name in `<store>/snapshots/`. */
  file: z.string().regex(/^[0-9a-f-]{36}\.qsnap$/),
  createdAt: IsoTime,
  /** Key of the VM it was taken of (vms). */
  vm: z.string(),
  ramBytes: UInt,
  allocatedBytes: UInt,
  downtimeMs: z.number().nonnegative(),
  strategy: z.string(),
  machine: z.string(),
  qemuVersion: z.string(),
  disks: z.array(z.object({ device: z.string(), top: AbsolutePath })),
  cmdline: z
    .object({ argv: z.array(z.string()).min(1), source: z.enum(['recorded', 'given', 'imported']) })
    .optional(),
  /** A delete of this snapshot began (and is finished by the next command if it was cut short). */
  deleting: z.boolean().optional(),
});
export type SnapshotEntry = z.infer<typeof SnapshotEntrySchema>;

export const VmEntrySchema = z.object({
  key: z.string(),
  qmp: z.string(),
  pid: z.int().positive().optional(),
  startTime: z.string().optional(),
  name: z.string().optional(),
  /** Started by qsnap (restore): its run directory, the snapshot it came from. */
  launchedBy: z.enum(['user', 'restore']),
  from: z.string().optional(),
  runDir: AbsolutePath.optional(),
  /** A stream job qsnap started to shorten its chain (chain-depth.ts): the next snapshot waits for it. */
  chainJob: z.string().optional(),
  seenAt: IsoTime,
});
export type VmEntry = z.infer<typeof VmEntrySchema>;

export const LayerEntrySchema = z.object({
  path: AbsolutePath,
  /** Who made the file: only qsnap's own layers are ever merged into or removed. */
  origin: z.enum(['snapshot', 'restore', 'import', 'user']),
  /** The VM that writes (or wrote) to it, while it was a live or restore overlay. */
  vm: z.string().optional(),
  /** Recorded when it froze; absent while it is a live or restore overlay. */
  identity: IdentitySchema.optional(),
  /** Its backing file when it froze: the chain can still be followed if it goes missing. */
  backing: AbsolutePath.optional(),
  createdAt: IsoTime,
});
export type LayerEntry = z.infer<typeof LayerEntrySchema>;

export const GarbageSchema = z.object({ path: AbsolutePath, reason: z.string(), since: IsoTime });
export type Garbage = z.infer<typeof GarbageSchema>;

export const OperationSchema = z.object({
  id: z.string(),
  kind: z.enum(['snapshot', 'restore', 'delete']),
  owner: Owner,
  since: IsoTime,
  /** snapshot: the name reserved and its file; delete: the names being deleted. */
  names: z.array(Name),
  file: z.string().optional(),
  /** restore: what it made so far, for a recovery to remove or adopt. */
  overlays: z.array(AbsolutePath).optional(),
  /** restore: the overlays it was about to make (recorded before they exist; not layers yet). */
  planned: z.array(AbsolutePath).optional(),
  runDir: AbsolutePath.optional(),
  qemu: Owner.optional(),
  vm: VmEntrySchema.optional(),
  cmdline: SnapshotEntrySchema.shape.cmdline,
});
export type OperationEntry = z.infer<typeof OperationSchema>;

export const CatalogSchema = z.object({
  format: z.literal(CATALOG_FORMAT),
  version: z.literal(CATALOG_VERSION),
  /** By snapshot id; a name belongs to at most one entry that is not being deleted. */
  snapshots: z.record(z.uuid(), SnapshotEntrySchema),
  vms: z.record(z.string(), VmEntrySchema),
  layers: z.record(z.string(), LayerEntrySchema),
  garbage: z.array(GarbageSchema),
  operations: z.array(OperationSchema),
});
export type Catalog = z.infer<typeof CatalogSchema>;

export function emptyCatalog(): Catalog {
  return {
    format: CATALOG_FORMAT,
    version: CATALOG_VERSION,
    snapshots: {},
    vms: {},
    layers: {},
    garbage: [],
    operations: [],
  };
}
