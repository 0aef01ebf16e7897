/**
 * The parts of a qcow2 header qsnap reads (pure: bytes in, fields out), to walk a backing
 * chain without starting qemu-img: the magic, the version, the virtual size and the backing
 * file's name and format. (QEMU: docs/interop/qcow2.txt, block/qcow2.c qcow2_do_open.)
 *
 *   0   magic 'QFI\xfb'              4   version (2 or 3)
 *   8   backing_file_offset (u64)    16  backing_file_size (u32, ≤ 1023)
 *   20  cluster_bits (u32)           24  size: virtual size in bytes (u64)
 *   v3: 72 incompatible_features (u64) … 100 header_length (u32)
 * Header extensions follow the header (v2: at 72): type u32, length u32, data padded to 8;
 * type 0 ends them, 0xe2792aca is the backing file format name. All fields are big-endian.
 */
export const QCOW2_MAGIC = 0x514649fb;
const EXT_END = 0;
const EXT_BACKING_FORMAT = 0xe2792aca;
/** QEMU refuses longer backing names (block/qcow2.c: "Backing file name too long"). */
const MAX_BACKING_NAME = 1023;
/** Bytes of the header a reader needs for decodeQcow2Header (the extensions fit in the first cluster). */
export const QCOW2_HEAD_BYTES = 64 * 1024;

export interface Qcow2Header {
  version: number;
  virtualSize: number;
  clusterBits: number;
  /** Where the backing file's name is, and how long it is (0: no backing file). */
  backingOffset: number;
  backingLength: number;
  backingFormat: string | undefined;
  /** v3 incompatible feature bits (dirty 0, corrupt 1, external data file 2, …); 0 for v2. */
  incompatibleFeatures: bigint;
}

/** The image keeps its data in another file (QEMU: QCOW2_INCOMPAT_DATA_FILE). */
export const INCOMPAT_DATA_FILE = 1n << 2n;

export class Qcow2FormatError extends Error {}

export function isQcow2(head: Uint8Array): boolean {
  return head.length >= 4 && Buffer.from(head.buffer, head.byteOffset, 4).readUInt32BE(0) === QCOW2_MAGIC;
}

/** Decode the header from the first bytes of an image (up to QCOW2_HEAD_BYTES). */
export function decodeQcow2Header(head: Buffer): Qcow2Header {
  if (head.length < 72 || !isQcow2(head)) throw new Qcow2FormatError('not a qcow2 image (no QFI\\xfb magic)');
  const version = head.readUInt32BE(4);
  if (version !== 2 && version !== 3) throw new Qcow2FormatError(`qcow2 version ${version} is not 2 or 3`);
  const backingOffset = Number(head.readBigUInt64BE(8));
  const backingLength = head.readUInt32BE(16);
  if (backingLength > MAX_BACKING_NAME)
    throw new Qcow2FormatError(`backing file name of ${backingLength} bytes`);
  if (backingLength > 0 && backingOffset < 72)
    throw new Qcow2FormatError(`backing file name at offset ${backingOffset}`);
  const headerLength = version === 3 ? readV3HeaderLength(head) : 72;
  return {
    version,
    virtualSize: Number(head.readBigUInt64BE(24)),
    clusterBits: head.readUInt32BE(20),
    backingOffset,
    backingLength,
    backingFormat: readBackingFormat(head, headerLength),
    incompatibleFeatures: version === 3 ? head.readBigUInt64BE(72) : 0n,
  };
}

function readV3HeaderLength(head: Buffer): number {
  if (head.length < 104) throw new Qcow2FormatError('qcow2 v3 header cut short');
  const length = head.readUInt32BE(100);
  if (length < 104 || length > head.length) throw new Qcow2FormatError(`qcow2 header length ${length}`);
  return length;
}

/** Walk the header extensions (bounded by the bytes given) for the backing format name. */
function readBackingFormat(head: Buffer, start: number): string | undefined {
  let at = start;
  while (at + 8 <= head.length) {
    const type = head.readUInt32BE(at);
    const length = head.readUInt32BE(at + 4);
    if (type === EXT_END) return undefined;
    if (at + 8 + length > head.length)
      throw new Qcow2FormatError(`header extension of ${length} bytes at ${at}`);
    if (type === EXT_BACKING_FORMAT) return head.toString('utf8', at + 8, at + 8 + length);
    at += 8 + Math.ceil(length / 8) * 8;
  }
  return undefined;
}

/** The backing file's name as the header records it (relative names are relative to the image's directory). */
export function decodeBackingName(head: Buffer, header: Qcow2Header): string | undefined {
  if (header.backingLength === 0) return undefined;
  const end = header.backingOffset + header.backingLength;
  if (end > head.length)
    throw new Qcow2FormatError(`backing file name at ${header.backingOffset} beyond the header`);
  return head.toString('utf8', header.backingOffset, end);
}
