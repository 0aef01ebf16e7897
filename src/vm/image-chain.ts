import { open } from 'node:fs/promises';
import { dirname, resolve } from 'node:path';
import {
  decodeBackingName,
  decodeQcow2Header,
  isQcow2,
  QCOW2_HEAD_BYTES,
  Qcow2FormatError,
} from './qcow2.js';

/**
 * QEMU names a node whose options do not fit a filename `json:{…}` (an overlay attached with
 * blockdev-snapshot is one); its image file is `file.filename` inside.
 */
export function plainFilename(name: string): string | undefined {
  if (!name.startsWith('json:')) return name;
  try {
    const parsed = JSON.parse(name.slice(5)) as { file?: { filename?: unknown } };
    return typeof parsed.file?.filename === 'string' ? parsed.file.filename : undefined;
  } catch {
    return undefined;
  }
}

/** One image of a backing chain, as its file says. */
export interface ChainImage {
  path: string;
  format: 'qcow2' | 'raw';
  /** The image below it (absolute), when its header names one. */
  backing: string | undefined;
  /** Why the chain stops here early: the backing file is gone or unreadable. */
  problem?: string;
  /** qcow2 only: it keeps its data in an external data file. */
  externalData?: boolean;
}

/**
 * The header of one image: qcow2 (its backing file, if any) or anything else, taken as raw
 * (QEMU probes formats the same way: no qcow2 magic, no backing). Throws on a damaged qcow2
 * header and passes an OS error (ENOENT…) through.
 */
export async function readImage(path: string): Promise<ChainImage> {
  const file = await open(path, 'r');
  try {
    const head = Buffer.alloc(QCOW2_HEAD_BYTES);
    const { bytesRead } = await file.read(head, 0, head.length, 0);
    const bytes = head.subarray(0, bytesRead);
    if (!isQcow2(bytes)) return { path, format: 'raw', backing: undefined };
    const header = decodeQcow2Header(bytes);
    const name = decodeBackingName(bytes, header);
    // QEMU itself writes a `json:{…}` name when a block job rebases onto a node added by blockdev-add.
    const target = name === undefined ? undefined : (plainFilename(name) ?? name);
    return {
      path,
      format: 'qcow2',
      backing: target === undefined ? undefined : resolve(dirname(path), target),
    };
  } finally {
    await file.close();
  }
}

/**
 * An image and the images below it, top first, from their headers (no qemu-img process). A
 * missing or damaged image ends the chain with `problem` set on the image above it.
 */
export async function readChain(top: string, maxDepth = 256): Promise<ChainImage[]> {
  const chain: ChainImage[] = [];
  let path: string | undefined = resolve(top);
  while (path !== undefined && chain.length < maxDepth) {
    try {
      const image = await readImage(path);
      chain.push(image);
      path = image.backing;
    } catch (err) {
      const why =
        err instanceof Qcow2FormatError ? err.message : ((err as NodeJS.ErrnoException).code ?? String(err));
      if (chain.length === 0) throw err;
      chain[chain.length - 1]!.problem = `${path}: ${why}`;
      return chain;
    }
  }
  return chain;
}
