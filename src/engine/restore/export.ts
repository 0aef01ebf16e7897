import { randomBytes } from 'node:crypto';
import { open, rename, rm, stat } from 'node:fs/promises';
import { basename, dirname, join, resolve } from 'node:path';
import { openSnapshot } from '../../format/index.js';
import { ExportError } from '../errors.js';
import { Operation } from '../operation.js';
import { snapshotStream } from './file-stream.js';

export interface ExportOptions {
  file: string;
  out: string;
  overwrite?: boolean;
}

export interface ExportResult {
  out: string;
  bytes: number;
  ms: number;
}

/** Write a snapshot as a plain QEMU migration stream (`qemu -incoming "exec:cat FILE"` loads it). */
export function exportStream(options: ExportOptions): Operation<ExportResult> {
  return new Operation(async (op) => {
    const started = performance.now();
    const out = resolve(options.out);
    const reader = await openSnapshot(options.file);
    try {
      if (!options.overwrite && (await exists(out))) {
        throw new ExportError('QSNAP_EXPORT_EXISTS', `${out} already exists`, {
          hint: 'choose another path or pass --overwrite',
        });
      }
      const bytes = await writeAtomically(out, async (write) => {
        const total = reader.manifest.vm.ramBytes;
        let written = 0;
        for await (const chunk of snapshotStream(reader, { skipMainBlock: false, verify: 'data' })) {
          await write(chunk);
          written += chunk.length;
          op.progress(Math.min(written, total), total, 'export');
        }
        return written;
      });
      return { out, bytes, ms: performance.now() - started };
    } finally {
      await reader.close();
    }
  });
}

/**
 * Write a file beside `out`, fsync it and rename it into place: a file at `out` is complete.
 * The partial file is removed when `produce` fails.
 */
async function writeAtomically<T>(
  out: string,
  produce: (write: (chunk: Buffer) => Promise<unknown>) => Promise<T>,
): Promise<T> {
  const tmp = join(dirname(out), `.${basename(out)}.partial-${randomBytes(4).toString('hex')}`);
  const handle = await open(tmp, 'wx', 0o600);
  try {
    const result = await produce((chunk) => handle.write(chunk));
    await handle.sync();
    await handle.close();
    await rename(tmp, out);
    return result;
  } catch (err) {
    await handle.close().catch(() => undefined);
    await rm(tmp, { force: true });
    throw err;
  }
}

async function exists(path: string): Promise<boolean> {
  return stat(path).then(
    () => true,
    () => false,
  );
}
