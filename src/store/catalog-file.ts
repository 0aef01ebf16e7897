import { open, readdir, readFile, rename, rm } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import { z } from 'zod';
import { StoreError } from './errors.js';
import { CATALOG_FORMAT, CATALOG_VERSION, type Catalog, CatalogSchema, emptyCatalog } from './schema.js';

/**
 * The catalog on disk, written as git writes its index: to a temporary file, fsync, rename
 * over the old one, fsync the directory. A crash at any point leaves the old catalog or the
 * new one, never a mix; a reader never needs the lock. A catalog that does not parse is
 * reported and left alone: nothing is deleted on the strength of a damaged catalog.
 */
export async function readCatalog(file: string): Promise<Catalog> {
  let text: string;
  try {
    text = await readFile(file, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return emptyCatalog();
    throw new StoreError(
      'QSNAP_STORE_ACCESS',
      `cannot read the store's catalog ${file}: ${(err as Error).message}`,
      {
        hint: 'check the store directory’s permissions (--store, QSNAP_STORE)',
        cause: err,
      },
    );
  }
  return parseCatalog(file, text);
}

function parseCatalog(file: string, text: string): Catalog {
  let raw: unknown;
  try {
    raw = JSON.parse(text);
  } catch (err) {
    throw damaged(file, `not JSON (${(err as Error).message})`);
  }
  const { format, version } = (raw ?? {}) as { format?: unknown; version?: unknown };
  if (format !== CATALOG_FORMAT) throw damaged(file, `"format" is not "${CATALOG_FORMAT}"`);
  if (typeof version === 'number' && version > CATALOG_VERSION) {
    throw new StoreError(
      'QSNAP_STORE_CATALOG',
      `the store's catalog ${file} was written by a newer qsnap (version ${version})`,
      {
        hint: 'use that qsnap version with this store; nothing was changed',
      },
    );
  }
  const parsed = CatalogSchema.safeParse(raw);
  if (!parsed.success) throw damaged(file, z.prettifyError(parsed.error).split('\n')[0] ?? 'invalid');
  return parsed.data;
}

function damaged(file: string, why: string): StoreError {
  return new StoreError('QSNAP_STORE_CATALOG', `the store's catalog ${file} is damaged: ${why}`, {
    hint: 'nothing was changed or deleted; restore the file from a backup, or move it away to start an empty catalog (the snapshot files stay)',
    details: { file },
  });
}

export async function writeCatalog(file: string, catalog: Catalog): Promise<void> {
  const tmp = join(dirname(file), `.${basename(file)}.${process.pid}.tmp`);
  const handle = await open(tmp, 'w', 0o600);
  try {
    await handle.writeFile(`${JSON.stringify(catalog, null, 1)}\n`);
    await handle.sync();
  } finally {
    await handle.close();
  }
  await rename(tmp, file);
  const dir = await open(dirname(file), 'r');
  try {
    await dir.sync();
  } finally {
    await dir.close();
  }
}

/** Temporary catalogs of writers that died before their rename (called under the lock). */
export async function removeStaleTemporaries(file: string): Promise<void> {
  const prefix = `.${basename(file)}.`;
  for (const name of await readdir(dirname(file)).catch(() => [] as string[])) {
    if (name.startsWith(prefix) && name.endsWith('.tmp'))
      await rm(join(dirname(file), name), { force: true });
  }
}
