import { execFile } from 'node:child_process';
import { open, rm } from 'node:fs/promises';
import { basename, dirname } from 'node:path';
import { promisify } from 'node:util';

const run = promisify(execFile);

export interface OverlaySpec {
  /** The new qcow2 file. */
  overlayFile: string;
  /** Its backing image (never opened: QEMU may hold its lock). */
  backingFile: string;
  backingFormat: string;
  virtualSize: number;
}

/**
 * Create a qcow2 overlay on a backing image with qemu-img. The name is claimed first with
 * O_EXCL, since qemu-img silently replaces an existing file. A backing path relative to the
 * overlay's directory keeps the pair movable together. Throws the OS or qemu-img error
 * (stderr in the message); callers wrap it in their own coded error.
 */
export async function createOverlay(spec: OverlaySpec): Promise<void> {
  await (await open(spec.overlayFile, 'wx')).close();
  const backing =
    dirname(spec.overlayFile) === dirname(spec.backingFile) ? basename(spec.backingFile) : spec.backingFile;
  try {
    await run('qemu-img', [
      'create',
      '-q',
      '-f',
      'qcow2',
      '-u',
      '-b',
      backing,
      '-F',
      spec.backingFormat,
      spec.overlayFile,
      String(spec.virtualSize),
    ]);
  } catch (err) {
    await rm(spec.overlayFile, { force: true });
    const stderr = (err as { stderr?: string }).stderr?.trim();
    throw stderr ? new Error(stderr, { cause: err }) : err;
  }
}
