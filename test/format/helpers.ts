import { createHash } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { crc32 } from 'node:zlib';
import { expect } from 'vitest';
import { encodeTrailer, TRAILER_SIZE } from '../../src/format/codec.js';
import { SnapshotFileError } from '../../src/format/errors.js';
import type { BlockSpec } from '../../src/format/layout.js';
import { openSnapshot } from '../../src/format/reader.js';
import { SnapshotWriter, type SnapshotWriterOptions } from '../../src/format/writer.js';
import { BLOCKS, PAGE, pageData, rng } from './fixtures.js';

export * from './fixtures.js';

export function tempDir(prefix = 'qsnap-format-'): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), prefix));
}

export function flipByte(file: string, offset: number): void {
  const fd = fs.openSync(file, 'r+');
  try {
    const b = Buffer.alloc(1);
    fs.readSync(fd, b, 0, 1, offset);
    b[0] = b[0]! ^ 0xff;
    fs.writeSync(fd, b, 0, 1, offset);
  } finally {
    fs.closeSync(fd);
  }
}

export async function expectFileError(
  p: Promise<unknown> | (() => unknown),
  code: string,
  details: Record<string, unknown> = {},
): Promise<SnapshotFileError> {
  let err: unknown;
  try {
    await (typeof p === 'function' ? p() : p);
  } catch (e) {
    err = e;
  }
  expect(err, `expected ${code}`).toBeInstanceOf(SnapshotFileError);
  const e = err as SnapshotFileError;
  expect(e.code).toBe(code);
  expect(e.details).toMatchObject(details);
  return e;
}

export type PageState = { kind: 'data'; data: Buffer } | { kind: 'zero' };

/** Expected final content per block, page by page, after the records were delivered. */
export type Expected = PageState[][];

export interface Written {
  file: string;
  expected: Expected;
  writer: SnapshotWriter;
}

/**
 * Writes a snapshot of `blocks` with pages in a background-snapshot-like order (a random subset
 * first, then the rest linearly, shuffled slightly), ~30 % zero pages, plus duplicates:
 * data→zero, data→data, zero→data.
 */
export async function writeSample(
  file: string,
  opts: Partial<SnapshotWriterOptions> & { seed?: number; blocks?: BlockSpec[] } = {},
): Promise<Written> {
  const blocks = opts.blocks ?? BLOCKS;
  const random = rng(opts.seed ?? 1);
  const writer = await SnapshotWriter.create(file, { ...opts, blocks });
  const expected: Expected = blocks.map((b) =>
    Array.from({ length: Math.ceil(b.usedLength / PAGE) }, () => ({ kind: 'zero' })),
  );
  const records: [number, number][] = [];
  for (const [bi, b] of blocks.entries())
    for (let p = 0; p < Math.ceil(b.usedLength / PAGE); p++) records.push([bi, p]);
  const early = records.filter(() => random() < 0.1);
  const earlySet = new Set(early.map(([b, p]) => `${b}:${p}`));
  const order = [
    ...early.sort(() => random() - 0.5),
    ...records.filter(([b, p]) => !earlySet.has(`${b}:${p}`)),
  ];
  const deliver = async (bi: number, p: number, state: PageState): Promise<void> => {
    if (state.kind === 'data') writer.writePage(bi, p * PAGE, state.data);
    else writer.writeZeroPage(bi, p * PAGE);
    expected[bi]![p] = state;
    if (writer.needsDrain) await writer.onceDrained();
  };
  for (const [bi, p] of order) {
    const zero = random() < 0.3;
    await deliver(bi, p, zero ? { kind: 'zero' } : { kind: 'data', data: pageData(bi, p) });
  }
  // Duplicates (precopy-style resends): later records win.
  await deliver(0, 10, { kind: 'data', data: pageData(0, 10, 1) });
  await deliver(0, 10, { kind: 'zero' });
  await deliver(0, 11, { kind: 'data', data: pageData(0, 11, 1) });
  await deliver(0, 11, { kind: 'data', data: pageData(0, 11, 2) });
  await deliver(1, 3, { kind: 'zero' });
  await deliver(1, 3, { kind: 'data', data: pageData(1, 3, 3) });
  return { file, expected, writer };
}

/**
 * Rewrites a snapshot's manifest (as parsed JSON) and re-seals it with a valid trailer, as a
 * writer would have: for tests that need a well-formed file with a chosen manifest.
 */
export function rewriteManifest(
  file: string,
  mutate: (m: import('./fixtures.js').Json) => void,
  trailerPatch?: (t: Buffer) => void,
): void {
  const size = fs.statSync(file).size;
  const fd = fs.openSync(file, 'r+');
  try {
    const tail = Buffer.alloc(TRAILER_SIZE);
    fs.readSync(fd, tail, 0, TRAILER_SIZE, size - TRAILER_SIZE);
    const manifestOffset = Number(tail.readBigUInt64LE(0));
    const manifestLength = Number(tail.readBigUInt64LE(8));
    const old = Buffer.alloc(manifestLength);
    fs.readSync(fd, old, 0, manifestLength, manifestOffset);
    const m = JSON.parse(old.toString('utf8'));
    mutate(m);
    const bytes = Buffer.from(`${JSON.stringify(m, null, 2)}\n`, 'utf8');
    const trailer = encodeTrailer({
      manifestOffset,
      manifestLength: bytes.length,
      manifestSha256: createHash('sha256').update(bytes).digest('hex'),
      fileLength: manifestOffset + bytes.length + TRAILER_SIZE,
    });
    if (trailerPatch) {
      trailerPatch(trailer);
      trailer.writeUInt32LE(crc32(trailer.subarray(0, 68)), 68);
    }
    fs.ftruncateSync(fd, manifestOffset);
    fs.writeSync(fd, Buffer.concat([bytes, trailer]), 0, bytes.length + TRAILER_SIZE, manifestOffset);
  } finally {
    fs.closeSync(fd);
  }
}

/** Opens, fully verifies and closes a snapshot. */
export async function verifyFile(file: string): Promise<void> {
  const r = await openSnapshot(file);
  try {
    await r.verify();
  } finally {
    await r.close();
  }
}
