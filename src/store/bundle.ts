import { execFile } from 'node:child_process';
import { createHash, randomBytes, randomUUID } from 'node:crypto';
import { type FileHandle, mkdir, open, rename, rm, stat, statfs } from 'node:fs/promises';
import { basename, dirname, join, resolve } from 'node:path';
import { promisify } from 'node:util';
import { Operation, type OperationContext } from '../engine/operation.js';
import { openSnapshot } from '../format/index.js';
import { readImage } from '../vm/image-chain.js';
import {
  type BundleEntry,
  BundleFormatError,
  type BundleIndex,
  checkHeader,
  decodeIndex,
  decodeTrailer,
  encodeHeader,
  encodeTrailer,
  HEADER_BYTES,
  TRAILER_BYTES,
} from './bundle-format.js';
import { StoreError } from './errors.js';
import { identityOf } from './facts.js';
import { checkName } from './names.js';
import { checkLayers, findSnapshot } from './restore.js';
import type { Store } from './store.js';

const run = promisify(execFile);
const COPY_CHUNK = 4 * 2 ** 20;

export interface BundleResult {
  file: string;
  name: string;
  bytes: number;
  ms: number;
  disks: { device: string; bytes: number }[];
}

/**
 * Export a snapshot of the store as one bundle (bundle-format.ts): the snapshot file and each
 * disk flattened with `qemu-img convert` (the whole chain into one standalone qcow2), written
 * beside the target and renamed into place once complete and synced.
 */
export function exportBundle(
  store: Store,
  options: { name: string; out: string; overwrite?: boolean },
): Operation<BundleResult> {
  return new Operation(async (op) => {
    const started = performance.now();
    const catalog = await store.read();
    const entry = findSnapshot(catalog, options.name);
    await checkLayers(catalog, entry);
    const out = resolve(options.out);
    if (!options.overwrite && (await exists(out)))
      throw new StoreError('QSNAP_STORE_EXISTS', `${out} already exists`, {
        hint: 'choose another path or pass --overwrite',
      });
    const tmp = join(dirname(out), `.${basename(out)}.partial-${randomBytes(4).toString('hex')}`);
    const file = await open(tmp, 'wx', 0o600);
    try {
      const writer = new EntryWriter(file);
      await writer.raw(encodeHeader());
      op.phase('snapshot', entry.name);
      const snapshot = await writer.copyFile(store.snapshotPath(entry), op);
      const disks: BundleIndex['disks'] = [];
      for (const disk of entry.disks) {
        op.phase('disk', `${disk.device}: flattening ${disk.top}`);
        const image = await flatten(disk.top, dirname(out));
        try {
          disks.push({
            device: disk.device,
            ...(await writer.copyFile(image, op)),
            virtualSize: await virtualSize(image),
          });
        } finally {
          await rm(image, { force: true });
        }
      }
      const index: BundleIndex = {
        format: 'qsnap-bundle',
        version: 1,
        name: entry.name,
        snapshotId: entry.id,
        createdAt: entry.createdAt,
        ...(entry.cmdline ? { cmdline: entry.cmdline.argv } : {}),
        snapshot,
        disks,
      };
      const json = Buffer.from(JSON.stringify(index));
      const indexOffset = writer.offset;
      await writer.raw(json);
      await writer.raw(encodeTrailer(indexOffset, json.length));
      await file.sync();
      await file.close();
      await rename(tmp, out);
      const bytes = writer.offset;
      return {
        file: out,
        name: entry.name,
        bytes,
        ms: performance.now() - started,
        disks: disks.map((d) => ({ device: d.device, bytes: d.length })),
      };
    } catch (err) {
      await file.close().catch(() => undefined);
      await rm(tmp, { force: true });
      throw err;
    }
  });
}

/** Sequential writes that know their offset and hash what they copy. */
class EntryWriter {
  offset = 0;

  constructor(private readonly file: FileHandle) {}

  async raw(bytes: Buffer): Promise<void> {
    await this.file.write(bytes, 0, bytes.length, this.offset);
    this.offset += bytes.length;
  }

  async copyFile(path: string, op: OperationContext): Promise<BundleEntry> {
    const source = await open(path, 'r');
    const hash = createHash('sha256');
    const offset = this.offset;
    const total = (await source.stat()).size;
    try {
      const buffer = Buffer.alloc(COPY_CHUNK);
      for (let done = 0; done < total; ) {
        const { bytesRead } = await source.read(buffer, 0, buffer.length, done);
        if (bytesRead === 0) break;
        const chunk = buffer.subarray(0, bytesRead);
        hash.update(chunk);
        await this.raw(chunk);
        done += bytesRead;
        op.progress(done, total, basename(path));
      }
    } finally {
      await source.close();
    }
    return { offset, length: this.offset - offset, sha256: hash.digest('hex') };
  }
}

/** The disk as the snapshot reads it, in one standalone qcow2 (-U: QEMU may hold the chain open). */
async function flatten(top: string, dir: string): Promise<string> {
  const image = join(dir, `.qsnap-flat-${randomBytes(4).toString('hex')}.qcow2`);
  try {
    await run('qemu-img', ['convert', '-U', '-O', 'qcow2', top, image]);
  } catch (err) {
    await rm(image, { force: true });
    throw new StoreError(
      'QSNAP_STORE_BUNDLE',
      `cannot flatten ${top}: ${((err as { stderr?: string }).stderr ?? String(err)).trim()}`,
      {
        hint: 'check that qemu-img is installed and there is room beside the bundle',
        cause: err,
      },
    );
  }
  return image;
}

async function virtualSize(image: string): Promise<number> {
  const { stdout } = await run('qemu-img', ['info', '-U', '--output=json', image]);
  return (JSON.parse(stdout) as { 'virtual-size': number })['virtual-size'];
}

async function exists(path: string): Promise<boolean> {
  return stat(path).then(
    () => true,
    () => false,
  );
}

export interface ImportResult {
  name: string;
  id: string;
  file: string;
  disks: { device: string; file: string }[];
  /** The command line that came with it: shown to the user, run only with --trust-cmdline. */
  cmdline: string[] | undefined;
  ms: number;
}

/**
 * Import a bundle into the store. Nothing lands before everything is checked: the bundle's
 * structure (bounded), every entry's checksum, the snapshot file's own checksums, and each
 * disk being a standalone qcow2 of the size it claims. Only then are the files moved into the
 * store (snapshots/<id>.qsnap, disks/<id>/disk<N>.qcow2 — no name from the bundle becomes a
 * path) and catalogued; its command line is marked imported.
 */
export function importBundle(
  store: Store,
  options: { file: string; name?: string },
): Operation<ImportResult> {
  return new Operation(async (op) => {
    const started = performance.now();
    const source = await open(resolve(options.file), 'r');
    const staged: string[] = [];
    try {
      const index = await readIndex(source, options.file);
      const name = checkName(options.name ?? index.name);
      await refuseDuplicate(store, name, index.snapshotId);
      await checkRoom(store.dir, [index.snapshot, ...index.disks]);
      op.phase('verify', options.file);
      const file = `${randomUUID()}.qsnap`;
      const snapshotPath = store.snapshotPath({ file });
      await extract(source, index.snapshot, snapshotPath, staged, op);
      await verifySnapshotFile(snapshotPath, index);
      const diskDir = join(store.dir, 'disks', index.snapshotId);
      await mkdir(diskDir, { recursive: true, mode: 0o700 });
      const disks: ImportResult['disks'] = [];
      for (const [i, disk] of index.disks.entries()) {
        const path = join(diskDir, `disk${i}.qcow2`);
        await extract(source, disk, path, staged, op);
        await checkStandalone(path, disk.virtualSize);
        disks.push({ device: disk.device, file: path });
      }
      await catalogue(store, { name, file, index, disks, snapshotPath });
      staged.length = 0;
      return {
        name,
        id: index.snapshotId,
        file: snapshotPath,
        disks,
        cmdline: index.cmdline,
        ms: performance.now() - started,
      };
    } finally {
      await source.close();
      for (const path of staged) await rm(path, { force: true });
    }
  });
}

async function readIndex(source: FileHandle, file: string): Promise<BundleIndex> {
  try {
    const size = (await source.stat()).size;
    if (size < HEADER_BYTES + TRAILER_BYTES)
      throw new BundleFormatError(`${size} bytes is too short for a bundle`);
    checkHeader(await readAt(source, 0, HEADER_BYTES));
    const where = decodeTrailer(await readAt(source, size - TRAILER_BYTES, TRAILER_BYTES), size);
    return decodeIndex(await readAt(source, where.offset, where.length), where.offset);
  } catch (err) {
    if (err instanceof BundleFormatError) throw bundleError(file, err.message);
    throw err;
  }
}

async function readAt(source: FileHandle, position: number, length: number): Promise<Buffer> {
  const buffer = Buffer.alloc(length);
  const { bytesRead } = await source.read(buffer, 0, length, position);
  if (bytesRead !== length) throw new BundleFormatError(`cut short at byte ${position + bytesRead}`);
  return buffer;
}

/**
 * Copy one entry out to `path` (created exclusively, 0600; added to `staged`, which the caller
 * removes unless the import completes) and check its sha256 on the way.
 */
async function extract(
  source: FileHandle,
  entry: BundleEntry,
  path: string,
  staged: string[],
  op: OperationContext,
): Promise<void> {
  const target = await open(path, 'wx', 0o600);
  staged.push(path);
  const hash = createHash('sha256');
  try {
    const buffer = Buffer.alloc(COPY_CHUNK);
    for (let done = 0; done < entry.length; ) {
      const want = Math.min(buffer.length, entry.length - done);
      const { bytesRead } = await source.read(buffer, 0, want, entry.offset + done);
      if (bytesRead !== want)
        throw bundleError(path, `an entry is cut short at byte ${entry.offset + done + bytesRead}`);
      hash.update(buffer.subarray(0, bytesRead));
      await target
        .write(buffer, 0, bytesRead, done)
        .catch((err: unknown) => Promise.reject(writeError(path, err)));
      done += bytesRead;
      op.progress(done, entry.length, basename(path));
    }
    await target.sync().catch((err: unknown) => Promise.reject(writeError(path, err)));
  } finally {
    await target.close();
  }
  if (hash.digest('hex') !== entry.sha256)
    throw bundleError(path, 'an entry does not match its checksum (damaged in transit?)');
}

async function verifySnapshotFile(path: string, index: BundleIndex): Promise<void> {
  const reader = await openSnapshot(path);
  try {
    await reader.verify();
    if (reader.manifest.id !== index.snapshotId)
      throw bundleError(path, 'the snapshot inside is not the one the index names');
    if (reader.manifest.disks.length !== index.disks.length)
      throw bundleError(path, 'the snapshot has other disks than the bundle');
  } finally {
    await reader.close();
  }
}

/** A disk from elsewhere must be a standalone qcow2: a backing or data file could read any file of this host. */
async function checkStandalone(path: string, claimedSize: number): Promise<void> {
  const image = await readImage(path).catch((err: Error) =>
    Promise.reject(bundleError(path, `not a qcow2 image (${err.message})`)),
  );
  if (image.format !== 'qcow2') throw bundleError(path, 'a disk is not a qcow2 image');
  if (image.backing || image.externalData)
    throw bundleError(path, 'a disk refers to another file (backing or data file)');
  if ((await virtualSize(path)) !== claimedSize)
    throw bundleError(path, 'a disk is not the size the index says');
}

async function refuseDuplicate(store: Store, name: string, id: string): Promise<void> {
  const catalog = await store.read();
  if (catalog.snapshots[id])
    throw new StoreError(
      'QSNAP_STORE_EXISTS',
      `this snapshot is in the store already, as ${catalog.snapshots[id]!.name}`,
      {
        hint: 'nothing was imported',
      },
    );
  if (Object.values(catalog.snapshots).some((s) => s.name === name && !s.deleting))
    throw new StoreError('QSNAP_STORE_EXISTS', `the store has a snapshot named ${name} already`, {
      hint: 'import it under another name with --name',
    });
}

async function catalogue(
  store: Store,
  imported: {
    name: string;
    file: string;
    index: BundleIndex;
    disks: ImportResult['disks'];
    snapshotPath: string;
  },
): Promise<void> {
  const reader = await openSnapshot(imported.snapshotPath);
  const m = reader.manifest;
  await reader.close();
  const now = new Date().toISOString();
  await store.transact('import', async (c) => {
    if (c.snapshots[m.id])
      throw new StoreError('QSNAP_STORE_EXISTS', 'the snapshot was imported meanwhile', {
        hint: 'nothing changed',
      });
    c.snapshots[m.id] = {
      name: imported.name,
      id: m.id,
      file: imported.file,
      createdAt: m.pointInTime.wallClock,
      vm: `imported:${m.id}`,
      ramBytes: m.vm.ramBytes,
      allocatedBytes: (await stat(imported.snapshotPath)).blocks * 512,
      downtimeMs: m.timings.downtimeMs,
      strategy: m.strategy,
      machine: m.qemu.machine,
      qemuVersion: `${m.qemu.version.major}.${m.qemu.version.minor}.${m.qemu.version.micro}`,
      disks: imported.disks.map((d) => ({ device: d.device, top: d.file })),
      ...(imported.index.cmdline
        ? { cmdline: { argv: imported.index.cmdline, source: 'imported' as const } }
        : {}),
    };
    for (const d of imported.disks) {
      const identity = await identityOf(d.file);
      c.layers[d.file] = {
        path: d.file,
        origin: 'import',
        createdAt: now,
        ...(identity ? { identity } : {}),
      };
    }
  });
}

/**
 * The entries are written out whole (a sparse entry becomes dense): refused up front when the
 * store's file system has not that much room, so a bundle cannot fill the disk half way.
 */
async function checkRoom(dir: string, entries: readonly BundleEntry[]): Promise<void> {
  const needed = entries.reduce((n, e) => n + e.length, 0);
  const fs = await statfs(dir).catch(() => undefined);
  if (!fs) return; // cannot tell: the writes say it if there is no room
  const free = fs.bavail * fs.bsize;
  if (needed > free)
    throw new StoreError(
      'QSNAP_STORE_ACCESS',
      `the bundle needs ${needed} bytes in ${dir}, which has ${free} free`,
      { hint: 'free space in the store or import into another store (--store)', details: { needed, free } },
    );
}

function writeError(path: string, err: unknown): StoreError {
  const code = (err as NodeJS.ErrnoException).code ?? 'EIO';
  return new StoreError('QSNAP_STORE_ACCESS', `cannot write ${path} (${code}); nothing was imported`, {
    hint:
      code === 'ENOSPC'
        ? 'free space in the store or import into another store (--store)'
        : 'check the store directory',
    cause: err,
    details: { file: path, errno: code },
  });
}

function bundleError(file: string, why: string): StoreError {
  return new StoreError('QSNAP_STORE_BUNDLE', `${file}: ${why}`, {
    hint: 'the bundle is damaged or not a qsnap bundle; nothing was imported',
    details: { file },
  });
}
