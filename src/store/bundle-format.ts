import { z } from 'zod';

/**
 * A bundle: one portable file with everything a snapshot needs on another machine — the
 * snapshot file verbatim and each disk flattened into a standalone qcow2 — each entry
 * checksummed (pure: bytes ⇄ header, trailer and index; bundle.ts moves the bytes).
 *
 *   0    'QSNAPBDL' (8 bytes), version (u32 BE), 0 (u32)
 *   16   the entries, back to back, where the index says
 *   …    the index: UTF-8 JSON (BundleIndexSchema)
 *   end  index offset (u64 BE), index length (u64 BE), 'QSNAPEND'
 *
 * A bundle may come from anyone: every offset, length and count is bounded here before any
 * of it is read, and a disk entry is a standalone qcow2 (no backing or data file) or refused.
 */
export const BUNDLE_MAGIC = Buffer.from('QSNAPBDL', 'latin1');
export const BUNDLE_END = Buffer.from('QSNAPEND', 'latin1');
export const BUNDLE_VERSION = 1;
export const HEADER_BYTES = 16;
export const TRAILER_BYTES = 24;
const MAX_INDEX_BYTES = 1024 * 1024;
const MAX_DISKS = 64;

const Sha256 = z.string().regex(/^[0-9a-f]{64}$/);
const UInt = z.int().nonnegative();
/**
 * Text qsnap prints for the user to judge (the command line above all): no control characters
 * (C0, DEL, C1: terminal escapes could rewrite what is shown) and no bidirectional overrides
 * (which reorder what is read), so what the user reads is what would run.
 */
const Shown = z
  .string()
  .regex(/^[^\p{Cc}\u202a-\u202e\u2066-\u2069]*$/u, 'control or bidirectional characters');

export const BundleIndexSchema = z.object({
  format: z.literal('qsnap-bundle'),
  version: z.literal(BUNDLE_VERSION),
  name: z.string().max(64),
  snapshotId: z.uuid(),
  createdAt: z.string(),
  /** The command line recorded where the bundle was made: shown, never run without --trust-cmdline. */
  cmdline: z.array(Shown.max(65536)).max(4096).optional(),
  snapshot: z.object({ offset: UInt, length: UInt, sha256: Sha256 }),
  disks: z
    .array(
      z.object({
        device: Shown.min(1).max(128),
        offset: UInt,
        length: UInt,
        sha256: Sha256,
        virtualSize: UInt,
      }),
    )
    .max(MAX_DISKS),
});
export type BundleIndex = z.infer<typeof BundleIndexSchema>;
export type BundleEntry = BundleIndex['snapshot'];

export function encodeHeader(): Buffer {
  const header = Buffer.alloc(HEADER_BYTES);
  BUNDLE_MAGIC.copy(header, 0);
  header.writeUInt32BE(BUNDLE_VERSION, 8);
  return header;
}

export function encodeTrailer(indexOffset: number, indexLength: number): Buffer {
  const trailer = Buffer.alloc(TRAILER_BYTES);
  trailer.writeBigUInt64BE(BigInt(indexOffset), 0);
  trailer.writeBigUInt64BE(BigInt(indexLength), 8);
  BUNDLE_END.copy(trailer, 16);
  return trailer;
}

/** Why bytes are not a sound bundle; the caller turns it into QSNAP_STORE_BUNDLE. */
export class BundleFormatError extends Error {}

export function checkHeader(header: Buffer): void {
  if (header.length < HEADER_BYTES || !header.subarray(0, 8).equals(BUNDLE_MAGIC))
    throw new BundleFormatError('not a qsnap bundle (no QSNAPBDL magic)');
  const version = header.readUInt32BE(8);
  if (version !== BUNDLE_VERSION)
    throw new BundleFormatError(`bundle version ${version} (this qsnap reads ${BUNDLE_VERSION})`);
}

/** Where the index is, checked against the file's size. */
export function decodeTrailer(trailer: Buffer, fileSize: number): { offset: number; length: number } {
  if (trailer.length !== TRAILER_BYTES || !trailer.subarray(16).equals(BUNDLE_END))
    throw new BundleFormatError('the bundle does not end with QSNAPEND (cut short?)');
  const offset = Number(trailer.readBigUInt64BE(0));
  const length = Number(trailer.readBigUInt64BE(8));
  if (length > MAX_INDEX_BYTES) throw new BundleFormatError(`an index of ${length} bytes`);
  if (offset < HEADER_BYTES || offset + length + TRAILER_BYTES !== fileSize)
    throw new BundleFormatError(`the index at ${offset} (+${length}) does not end where the trailer begins`);
  return { offset, length };
}

/** The index, with every entry inside the entry area and no two entries overlapping. */
export function decodeIndex(bytes: Buffer, entriesEnd: number): BundleIndex {
  let raw: unknown;
  try {
    raw = JSON.parse(new TextDecoder('utf-8', { fatal: true }).decode(bytes));
  } catch (err) {
    throw new BundleFormatError(`the index is not JSON (${(err as Error).message})`);
  }
  const parsed = BundleIndexSchema.safeParse(raw);
  if (!parsed.success)
    throw new BundleFormatError(`the index is not valid: ${z.prettifyError(parsed.error).split('\n')[0]}`);
  const entries = [parsed.data.snapshot, ...parsed.data.disks].sort((a, b) => a.offset - b.offset);
  let at = HEADER_BYTES;
  for (const e of entries) {
    if (e.offset < at || e.offset + e.length > entriesEnd)
      throw new BundleFormatError(
        `an entry at ${e.offset} (+${e.length}) overlaps another or lies outside the entries`,
      );
    at = e.offset + e.length;
  }
  return parsed.data;
}
