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

/**
 * The bytes `qemu-img create -f qcow2 -u -b <backing> -F <format> <file> <size>` writes (QEMU
 * 7.2, block/qcow2.c qcow2_co_create): an empty v3 image of 64 KiB clusters — header, backing
 * format extension, feature name table, end; the backing name at 0x210; one refcount table
 * cluster at 0x10000 pointing to one refcount block at 0x20000 that counts the first four
 * clusters; the L1 table at 0x30000, all zero. Made here, a restore's overlay costs no
 * process start. Undefined outside that shape (a size past 4 TiB needs a larger L1 table, a
 * name past the first cluster): the caller runs qemu-img then.
 */
export function encodeOverlay(spec: {
  backing: string;
  backingFormat: string;
  virtualSize: number;
}): Buffer | undefined {
  const name = Buffer.from(spec.backing, 'utf8');
  const format = Buffer.from(spec.backingFormat, 'utf8');
  const l1Entries = Math.ceil(spec.virtualSize / L1_ENTRY_BYTES);
  if (
    spec.virtualSize <= 0 ||
    spec.virtualSize % 512 !== 0 ||
    l1Entries * 8 > CLUSTER ||
    name.length === 0 ||
    name.length > MAX_BACKING_NAME ||
    format.length === 0 ||
    format.length > 16
  )
    return undefined;
  const formatPadded = Math.ceil(format.length / 8) * 8;
  const nameOffset = HEADER_LENGTH + 8 + formatPadded + 8 + FEATURE_TABLE.length + 8;
  if (nameOffset + name.length > CLUSTER) return undefined;
  const out = Buffer.alloc(3 * CLUSTER + l1Entries * 8);
  out.writeUInt32BE(QCOW2_MAGIC, 0);
  out.writeUInt32BE(3, 4);
  out.writeBigUInt64BE(BigInt(nameOffset), 8);
  out.writeUInt32BE(name.length, 16);
  out.writeUInt32BE(CLUSTER_BITS, 20);
  out.writeBigUInt64BE(BigInt(spec.virtualSize), 24);
  out.writeUInt32BE(l1Entries, 36); // crypt_method 0 at 32
  out.writeBigUInt64BE(BigInt(3 * CLUSTER), 40); // L1 table
  out.writeBigUInt64BE(BigInt(CLUSTER), 48); // refcount table
  out.writeUInt32BE(1, 56); // refcount table clusters; no snapshots, no feature bits
  out.writeUInt32BE(4, 96); // refcount_order: 16-bit refcounts
  out.writeUInt32BE(HEADER_LENGTH, 100); // compression type 0 (zlib) at 104
  let at = HEADER_LENGTH;
  out.writeUInt32BE(EXT_BACKING_FORMAT, at);
  out.writeUInt32BE(format.length, at + 4);
  format.copy(out, at + 8);
  at += 8 + formatPadded;
  out.writeUInt32BE(EXT_FEATURE_TABLE, at);
  out.writeUInt32BE(FEATURE_TABLE.length, at + 4);
  FEATURE_TABLE.copy(out, at + 8);
  at += 8 + FEATURE_TABLE.length + 8; // then the end extension (zeros)
  name.copy(out, at);
  out.writeBigUInt64BE(BigInt(2 * CLUSTER), CLUSTER); // refcount table → refcount block
  for (let c = 0; c < 4; c++) out.writeUInt16BE(1, 2 * CLUSTER + 2 * c);
  return out;
}

const CLUSTER_BITS = 16;
const CLUSTER = 1 << CLUSTER_BITS;
/** Guest bytes one L1 entry maps: an L2 table of CLUSTER / 8 entries of one cluster each. */
const L1_ENTRY_BYTES = (CLUSTER / 8) * CLUSTER;
const HEADER_LENGTH = 112;
const EXT_FEATURE_TABLE = 0x6803f857;

/** QEMU 7.2's feature name table: (type, bit, name) of 48 bytes each (qcow2.txt, "Feature name table"). */
const FEATURE_TABLE = ((): Buffer => {
  const features: [number, number, string][] = [
    [0, 0, 'dirty bit'],
    [0, 1, 'corrupt bit'],
    [0, 2, 'external data file'],
    [0, 3, 'compression type'],
    [0, 4, 'extended L2 entries'],
    [1, 0, 'lazy refcounts'],
    [2, 0, 'bitmaps'],
    [2, 1, 'raw external data'],
  ];
  const table = Buffer.alloc(48 * features.length);
  for (const [i, [type, bit, name]] of features.entries()) {
    table[48 * i] = type;
    table[48 * i + 1] = bit;
    table.write(name, 48 * i + 2, 'latin1');
  }
  return table;
})();
