import { execFile } from 'node:child_process';
import { open, readFile, rm, writeFile } from 'node:fs/promises';
import { basename, dirname } from 'node:path';
import { promisify } from 'node:util';
import { encodeOverlay } from './qcow2.js';

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
 * qemu-img writes the same bytes for the same backing name, format and size (a qcow2 header
 * has no UUID or time), so each distinct overlay is made by qemu-img once per process and
 * copied from then on: repeated restores of one checkpoint (test-harness reverts) skip a
 * process spawn each.
 */
const templates = new Map<string, Buffer>();
const TEMPLATE_MAX_BYTES = 4 * 2 ** 20;

/**
 * Create a qcow2 overlay on a backing image: encoded here (encodeOverlay) in the common case,
 * else with qemu-img. The name is claimed first with O_EXCL, since qemu-img silently replaces
 * an existing file. A backing path relative to the
 * overlay's directory keeps the pair movable together. Throws the OS or qemu-img error
 * (stderr in the message); callers wrap it in their own coded error.
 */
export async function createOverlay(spec: OverlaySpec): Promise<void> {
  const backing = backingReference(spec.overlayFile, spec.backingFile);
  const key = `${backing}\0${spec.backingFormat}\0${spec.virtualSize}`;
  const template =
    templates.get(key) ??
    encodeOverlay({ backing, backingFormat: spec.backingFormat, virtualSize: spec.virtualSize });
  if (template) {
    await writeFile(spec.overlayFile, template, { flag: 'wx' });
    return;
  }
  await (await open(spec.overlayFile, 'wx')).close();
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
    const bytes = await readFile(spec.overlayFile);
    if (bytes.length <= TEMPLATE_MAX_BYTES) templates.set(key, bytes);
  } catch (err) {
    await rm(spec.overlayFile, { force: true });
    const stderr = (err as { stderr?: string }).stderr?.trim();
    throw stderr ? new Error(stderr, { cause: err }) : err;
  }
}

/**
 * How an image's header names its backing file: relative when both sit in one directory (the
 * pair stays movable together), else absolute. Also what a block job is told to write
 * (`backing-file`), so QEMU never writes a `json:{…}` name of its own.
 */
export function backingReference(image: string, backing: string): string {
  return dirname(image) === dirname(backing) ? basename(backing) : backing;
}

/**
 * Whether an overlay holds data of its own (anything the guest wrote to it), from `qemu-img map`:
 * an extent at depth 0 that is present. An overlay without any can go without losing a byte.
 */
export async function hasOwnData(file: string): Promise<boolean> {
  const { stdout } = await run('qemu-img', ['map', '-U', '--output=json', file]);
  const extents = JSON.parse(stdout) as { depth: number; present: boolean }[];
  return extents.some((e) => e.depth === 0 && e.present);
}
