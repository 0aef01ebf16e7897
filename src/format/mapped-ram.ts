/**
 * The mapped-ram view of a snapshot file (format 2): the few bytes that make the file, read from
 * `streamOffset`, a migration stream that QEMU ≥ 9.0 loads itself with the `mapped-ram`
 * capability (`migrate-incoming file:<snapshot>,offset=<streamOffset>`), reading each RAM block's
 * pages straight from where the snapshot keeps them. docs/format.md "The mapped-ram view".
 *
 * QEMU's loader (migration/ram.c, parse_ramblock_mapped_ram) reads, for each block of the RAM
 * START section, its entry (u8 len, idstr, be64 used_length) and a 28-byte header (be32 version
 * 1, be64 page size, be64 bitmap offset, be64 pages offset), reads the bitmap and the pages it
 * marks with positioned reads, then goes on reading the stream at pages offset + used_length:
 * right after the block. So:
 *
 * - the prefix (anywhere; QEMU starts there) holds the stream header, the configuration with the
 *   `mapped-ram` capability added, the RAM START section's header, the total and block 0's entry;
 * - the link page after block i holds block i+1's entry;
 * - the glue after the last block ends the START section (EOS, footer), and the stream's own
 *   device tail follows it unchanged.
 *
 * The bitmaps mark every page of the small blocks, and only the data pages of block 0: the view
 * is for a destination whose main RAM is fresh zeros (restore checks that, as for the stream).
 */
import {
  encodeFooter,
  encodePrologue,
  encodeSectionHeader,
  RAM_SECTION_IDSTR,
  RAM_SECTION_INSTANCE_ID,
  RAM_SECTION_VERSION_ID,
  RamFlag,
  SectionType,
  tryDecodePrologue,
  tryDecodeRamSetupSection,
} from '../stream/codec.js';
import { PAGE_SIZE } from './codec.js';
import type { FileLayout, RamLayout } from './layout.js';

/** migration/ram.c MAPPED_RAM_HDR_VERSION, and sizeof(MappedRamHeader) (packed). */
const HEADER_VERSION = 1;
const HEADER_BYTES = 4 + 8 + 8 + 8;
export const MAPPED_RAM_CAPABILITY = 'mapped-ram';

/** What a file's view needs, known from the prologue alone (before any offset is). */
export interface MappedRamPlan {
  /** The stream header and configuration, with `mapped-ram` among the capabilities. */
  header: Buffer;
  sectionId: number;
  footers: boolean;
  glueLength: number;
  bitmapsLength: number;
  prefixLength: number;
}

/** One bitmap per block: BITS_TO_LONGS(pages) unsigned longs (64-bit, little-endian hosts). */
function bitmapBytes(pageCount: number): number {
  return Math.ceil(pageCount / 64) * 8;
}

function entryBytes(name: string): number {
  return 1 + Buffer.byteLength(name, 'latin1') + 8 + HEADER_BYTES;
}

/**
 * The plan for a file whose stream starts with `prologue`, or undefined when QEMU could not load
 * it as mapped-ram: a prologue that does not decode, x-ignore-shared (its block entries differ),
 * a block list other than the file's, a used length that is not a page multiple.
 */
export function planMappedRam(prologue: Uint8Array, ram: RamLayout): MappedRamPlan | undefined {
  if (ram.version < 2) return undefined;
  const bytes = Buffer.from(prologue.buffer, prologue.byteOffset, prologue.byteLength);
  let header: ReturnType<typeof tryDecodePrologue>;
  let setup: ReturnType<typeof tryDecodeRamSetupSection>;
  try {
    header = tryDecodePrologue(bytes, 0);
    setup = header && tryDecodeRamSetupSection(bytes, header.size, 0, { ignoreShared: false });
  } catch {
    return undefined;
  }
  if (!header || !setup || header.machine === undefined) return undefined;
  if (header.capabilities.length > 0) return undefined; // x-ignore-shared, or mapped-ram already
  const sameBlocks =
    setup.blocks.length === ram.blocks.length &&
    setup.blocks.every(
      (b, i) => b.idstr === ram.blocks[i]!.name && b.usedLength === ram.blocks[i]!.usedLength,
    );
  if (!sameBlocks || ram.blocks.some((b) => b.usedLength !== b.fileLength)) return undefined;
  if (ram.blocks.some((b) => Buffer.byteLength(b.name, 'latin1') !== Buffer.byteLength(b.name, 'utf8'))) {
    return undefined;
  }
  const config = encodePrologue({
    machine: header.machine,
    capabilities: [MAPPED_RAM_CAPABILITY],
    ...(header.uuid !== undefined ? { uuid: header.uuid } : {}),
    ...(header.targetPageBits !== undefined ? { targetPageBits: header.targetPageBits } : {}),
  });
  const startHeader = startSectionHeader(setup.sectionId);
  return {
    header: config,
    sectionId: setup.sectionId,
    footers: setup.footers,
    glueLength: 8 + (setup.footers ? 5 : 0),
    bitmapsLength: ram.blocks.reduce((sum, b) => sum + bitmapBytes(b.pageCount), 0),
    prefixLength: config.length + startHeader.length + 8 + entryBytes(ram.blocks[0]!.name),
  };
}

function startSectionHeader(sectionId: number): Buffer {
  return encodeSectionHeader({
    type: SectionType.START,
    sectionId,
    idstr: RAM_SECTION_IDSTR,
    instanceId: RAM_SECTION_INSTANCE_ID,
    versionId: RAM_SECTION_VERSION_ID,
  });
}

export interface MappedRamBytes {
  /** One page per link of the layout: the next block's entry, zeros after it. */
  links: Buffer[];
  glue: Buffer;
  bitmaps: Buffer;
  prefix: Buffer;
}

/**
 * The view's bytes for a file laid out as `layout` (made with the plan's lengths);
 * `isDataPage(pageIndex)` says which pages of block 0 hold data.
 */
export function encodeMappedRam(
  plan: MappedRamPlan,
  layout: FileLayout,
  isDataPage: (pageIndex: number) => boolean,
): MappedRamBytes {
  const blocks = layout.blocks;
  const bitmapAt: number[] = [];
  let at = layout.bitmaps.offset;
  for (const b of blocks) {
    bitmapAt.push(at);
    at += bitmapBytes(b.pageCount);
  }
  const entry = (i: number): Buffer => {
    const b = blocks[i]!;
    const name = Buffer.from(b.name, 'latin1');
    const out = Buffer.alloc(entryBytes(b.name));
    out[0] = name.length;
    name.copy(out, 1);
    let pos = 1 + name.length;
    out.writeBigUInt64BE(BigInt(b.usedLength), pos);
    pos += 8;
    out.writeUInt32BE(HEADER_VERSION, pos);
    out.writeBigUInt64BE(BigInt(PAGE_SIZE), pos + 4);
    out.writeBigUInt64BE(BigInt(bitmapAt[i]!), pos + 12);
    out.writeBigUInt64BE(BigInt(b.fileOffset), pos + 20);
    return out;
  };
  const links = layout.links.map((_, i) => {
    const page = Buffer.alloc(PAGE_SIZE);
    entry(i + 1).copy(page);
    return page;
  });
  const glue = Buffer.alloc(plan.glueLength);
  glue.writeBigUInt64BE(BigInt(RamFlag.EOS));
  if (plan.footers) encodeFooter(plan.sectionId).copy(glue, 8);
  const bitmaps = Buffer.alloc(plan.bitmapsLength);
  for (const [i, b] of blocks.entries()) {
    const base = bitmapAt[i]! - layout.bitmaps.offset;
    for (let p = 0; p < b.pageCount; p++) {
      if (i === 0 && !isDataPage(p)) continue;
      bitmaps[base + (p >> 3)]! |= 1 << (p & 7);
    }
  }
  const total = Buffer.alloc(8);
  total.writeBigUInt64BE(BigInt(blocks.reduce((sum, b) => sum + b.usedLength, 0) + RamFlag.MEM_SIZE));
  const prefix = Buffer.concat([plan.header, startSectionHeader(plan.sectionId), total, entry(0)]);
  if (prefix.length !== plan.prefixLength) throw new Error('mapped-ram prefix length differs from its plan');
  return { links, glue, bitmaps, prefix };
}
