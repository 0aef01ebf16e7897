/**
 * Bytes ⇄ values for the snapshot file: constants, the trailer, the page-checksum table.
 * No I/O here; docs/format.md is the specification this file implements.
 */
import { createHash } from 'node:crypto';
import { crc32 } from 'node:zlib';

/** Guest page size the file is laid out in (x86 TARGET_PAGE_SIZE; QEMU migration/ram.c sends pages of it). */
export const PAGE_SIZE = 4096;

/** Major format version: a reader refuses a higher one. Minor: compatible additions (manifest fields). */
export const FORMAT_VERSION_MAJOR = 2;
export const FORMAT_VERSION_MINOR = 0;

/** The last 8 bytes of every snapshot file. */
export const TRAILER_MAGIC = Buffer.from('QSNAPEND', 'latin1');

/** Size of the v1 trailer. Later versions may grow it (it records its own length), up to TRAILER_MAX. */
export const TRAILER_SIZE = 80;
export const TRAILER_MAX = 4096;

/**
 * Trailer fields, as offsets from the END of the trailer (negative) for the fields every version keeps
 * in place, and from its start for the v1 payload. See docs/format.md "Trailer".
 */
const END_MAGIC = -8;
const END_CRC = -12;
const END_TRAILER_LENGTH = -16;
const END_VERSION_MINOR = -18;
const END_VERSION_MAJOR = -20;
const V1_MANIFEST_OFFSET = 0;
const V1_MANIFEST_LENGTH = 8;
const V1_MANIFEST_SHA256 = 16;
const V1_FILE_LENGTH = 48;
const V1_FLAGS = 56;

/** CRC-32 (zlib's, ISO-HDLC) of a page of 4096 zero bytes: what the page table holds for a hole. */
export const ZERO_PAGE_CRC = 0xc71c0011;
export const ZERO_PAGE: Buffer = Buffer.alloc(PAGE_SIZE);

export function pageCrc(page: Uint8Array): number {
  return crc32(page);
}

/**
 * CRC-32 of `count` consecutive pages from their own CRCs (`crcs[first]`…): what `pageCrc` of the
 * pages laid end to end gives, so a run of pages read in one piece is checked with one CRC over
 * it (zlib's crc32 is ~1.6× faster on large buffers than page by page here). zlib's
 * crc32_combine (crc32.c): crc(A‖B) = (crc(A) · x^(8·len(B)) mod P) ⊕ crc(B); with len(B) fixed
 * at a page, the multiplication is a linear map of the 32 bits, tabulated per byte.
 */
export function combinedPageCrc(crcs: Uint32Array, first: number, count: number): number {
  let crc = crcs[first]!;
  for (let i = first + 1; i < first + count; i++) crc = (shiftByPage(crc) ^ crcs[i]!) >>> 0;
  return crc;
}

/** The reflected polynomial of CRC-32/ISO-HDLC. */
const CRC_POLY = 0xedb88320;

/** a · b modulo the CRC polynomial, bit-reflected (zlib crc32.c, multmodp). */
function multModP(a: number, b: number): number {
  let m = 0x80000000;
  let p = 0;
  for (;;) {
    if (a & m) {
      p ^= b;
      if ((a & (m - 1)) === 0) break;
    }
    m >>>= 1;
    b = b & 1 ? (b >>> 1) ^ CRC_POLY : b >>> 1;
  }
  return p >>> 0;
}

/** x^(8·bytes) modulo the CRC polynomial (zlib crc32.c, x2nmodp with k = 3). */
function xPowBytes(bytes: number): number {
  let square = 0x40000000; // x^1, then x^2, x^4, … by squaring
  for (let k = 0; k < 3; k++) square = multModP(square, square);
  let p = 0x80000000; // x^0
  for (let n = bytes; n > 0; n = Math.floor(n / 2)) {
    if (n & 1) p = multModP(square, p);
    square = multModP(square, square);
  }
  return p;
}

/** Four byte tables of c ↦ c · x^(8·PAGE_SIZE) mod P. */
const PAGE_SHIFT = ((): Uint32Array => {
  const op = xPowBytes(PAGE_SIZE);
  const t = new Uint32Array(4 * 256);
  // The map is linear: each entry is the XOR of the entries of its bits.
  for (let k = 0; k < 4; k++) {
    for (let bit = 1; bit < 256; bit <<= 1) t[k * 256 + bit] = multModP(op, (bit << (8 * k)) >>> 0);
    for (let b = 1; b < 256; b++) {
      const low = b & -b;
      if (b !== low) t[k * 256 + b] = (t[k * 256 + low]! ^ t[k * 256 + (b ^ low)]!) >>> 0;
    }
  }
  return t;
})();

function shiftByPage(c: number): number {
  return (
    PAGE_SHIFT[c & 0xff]! ^
    PAGE_SHIFT[256 + ((c >>> 8) & 0xff)]! ^
    PAGE_SHIFT[512 + ((c >>> 16) & 0xff)]! ^
    PAGE_SHIFT[768 + (c >>> 24)]!
  );
}

export function isZeroPage(page: Uint8Array): boolean {
  return ZERO_PAGE.equals(page);
}

export function sha256Hex(...parts: Uint8Array[]): string {
  const h = createHash('sha256');
  for (const p of parts) h.update(p);
  return h.digest('hex');
}

export interface Trailer {
  versionMajor: number;
  versionMinor: number;
  /** Length of the trailer itself (80 in v1). */
  trailerLength: number;
  manifestOffset: number;
  manifestLength: number;
  /** Lower-case hex. */
  manifestSha256: string;
  /** Total file length including the trailer: detects bytes cut from (or added to) the middle. */
  fileLength: number;
  /** Reserved, 0 in v1; readers ignore unknown bits. */
  flags: number;
}

export function encodeTrailer(
  t: Omit<Trailer, 'versionMajor' | 'versionMinor' | 'trailerLength' | 'flags'> & { versionMajor?: number },
): Buffer {
  const b = Buffer.alloc(TRAILER_SIZE);
  const end = TRAILER_SIZE;
  b.writeBigUInt64LE(BigInt(t.manifestOffset), V1_MANIFEST_OFFSET);
  b.writeBigUInt64LE(BigInt(t.manifestLength), V1_MANIFEST_LENGTH);
  const sha = Buffer.from(t.manifestSha256, 'hex');
  if (sha.length !== 32) throw new RangeError('manifestSha256 must be 64 hex digits');
  sha.copy(b, V1_MANIFEST_SHA256);
  b.writeBigUInt64LE(BigInt(t.fileLength), V1_FILE_LENGTH);
  b.writeUInt32LE(0, V1_FLAGS);
  b.writeUInt16LE(t.versionMajor ?? FORMAT_VERSION_MAJOR, end + END_VERSION_MAJOR);
  b.writeUInt16LE(FORMAT_VERSION_MINOR, end + END_VERSION_MINOR);
  b.writeUInt32LE(TRAILER_SIZE, end + END_TRAILER_LENGTH);
  b.writeUInt32LE(crc32(b.subarray(0, end + END_CRC)), end + END_CRC);
  TRAILER_MAGIC.copy(b, end + END_MAGIC);
  return b;
}

export type TrailerDecode =
  | { ok: true; trailer: Trailer }
  /** The bytes do not end with the magic: not a snapshot, or cut short. */
  | { ok: false; problem: 'no-magic' }
  /** Magic present but the recorded trailer length is impossible, or longer than the bytes given. */
  | { ok: false; problem: 'bad-length'; trailerLength: number }
  | { ok: false; problem: 'bad-crc'; stored: number; computed: number }
  /** Intact trailer of a newer major version: its layout is unknown to this reader. */
  | { ok: false; problem: 'newer-version'; versionMajor: number; versionMinor: number }
  /** Intact trailer claiming a major version that never existed (0). Versions 1 and 2 are read. */
  | { ok: false; problem: 'bad-version'; versionMajor: number; versionMinor: number };

/**
 * Decodes the trailer from the last bytes of a file (`tail` = the final min(fileSize, TRAILER_MAX)
 * bytes). Order matters: magic, length, CRC, then version, so a flipped version byte reads as a bad
 * CRC and only an intact newer trailer reads as a newer version.
 */
export function decodeTrailer(tail: Uint8Array): TrailerDecode {
  const b = Buffer.from(tail.buffer, tail.byteOffset, tail.byteLength);
  const end = b.length;
  if (end < -END_VERSION_MAJOR || !TRAILER_MAGIC.equals(b.subarray(end + END_MAGIC))) {
    return { ok: false, problem: 'no-magic' };
  }
  const trailerLength = b.readUInt32LE(end + END_TRAILER_LENGTH);
  if (trailerLength < -END_VERSION_MAJOR || trailerLength > TRAILER_MAX || trailerLength > end) {
    return { ok: false, problem: 'bad-length', trailerLength };
  }
  const t = b.subarray(end - trailerLength);
  const tEnd = t.length;
  const stored = t.readUInt32LE(tEnd + END_CRC);
  const computed = crc32(t.subarray(0, tEnd + END_CRC));
  if (stored !== computed) return { ok: false, problem: 'bad-crc', stored, computed };
  const versionMajor = t.readUInt16LE(tEnd + END_VERSION_MAJOR);
  const versionMinor = t.readUInt16LE(tEnd + END_VERSION_MINOR);
  if (versionMajor > FORMAT_VERSION_MAJOR)
    return { ok: false, problem: 'newer-version', versionMajor, versionMinor };
  if (versionMajor < 1) return { ok: false, problem: 'bad-version', versionMajor, versionMinor };
  if (trailerLength < TRAILER_SIZE) return { ok: false, problem: 'bad-length', trailerLength };
  return {
    ok: true,
    trailer: {
      versionMajor,
      versionMinor,
      trailerLength,
      manifestOffset: readU64(t, V1_MANIFEST_OFFSET),
      manifestLength: readU64(t, V1_MANIFEST_LENGTH),
      manifestSha256: t.subarray(V1_MANIFEST_SHA256, V1_MANIFEST_SHA256 + 32).toString('hex'),
      fileLength: readU64(t, V1_FILE_LENGTH),
      flags: t.readUInt32LE(V1_FLAGS),
    },
  };
}

/** A u64 that must fit a JS number; larger values (never written by qsnap) read as +Infinity. */
function readU64(b: Buffer, at: number): number {
  const v = b.readBigUInt64LE(at);
  return v > BigInt(Number.MAX_SAFE_INTEGER) ? Number.POSITIVE_INFINITY : Number(v);
}

const LITTLE_ENDIAN_HOST = new Uint8Array(new Uint32Array([1]).buffer)[0] === 1;

/** The page table region: one u32 LE CRC-32 per page, in file page order. No copy on little-endian hosts. */
export function encodePageTable(crcs: Uint32Array): Buffer {
  if (LITTLE_ENDIAN_HOST) return Buffer.from(crcs.buffer, crcs.byteOffset, crcs.byteLength);
  const b = Buffer.alloc(crcs.length * 4);
  for (let i = 0; i < crcs.length; i++) b.writeUInt32LE(crcs[i]!, i * 4);
  return b;
}

export function decodePageTable(bytes: Uint8Array): Uint32Array {
  if (bytes.byteLength % 4 !== 0) throw new RangeError('page table length is not a multiple of 4');
  const out = new Uint32Array(bytes.byteLength / 4);
  if (LITTLE_ENDIAN_HOST) {
    new Uint8Array(out.buffer).set(bytes);
  } else {
    const b = Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    for (let i = 0; i < out.length; i++) out[i] = b.readUInt32LE(i * 4);
  }
  return out;
}
