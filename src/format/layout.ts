/**
 * Where every region of a snapshot file lives, computed from the format version, the RAM block
 * list and the blob lengths. Pure: the writer uses it to place bytes, the reader to check a
 * manifest against it.
 *
 * Version 2 (written since 2026-12-03): a link page after every block but the last, and the
 * stream's device tail right after RAM, so that QEMU ≥ 9.0 can load the file as a mapped-ram
 * migration stream (docs/format.md "The mapped-ram view"):
 *
 *   [ block 0 | link | block 1 | link | … | block n−1 | glue | device tail | page table | prologue | bitmaps | mapped-ram prefix | manifest | trailer ]
 *
 * Version 1: [ block 0 | block 1 | … | page table | prologue | device tail | manifest | trailer ].
 * Block 0 is at offset 0 in both (memory-backend-file maps from 0); regions page-aligned, holes
 * for zero pages.
 */
import { FORMAT_VERSION_MAJOR, PAGE_SIZE, TRAILER_SIZE } from './codec.js';

export interface BlockSpec {
  /** QEMU RAMBlock idstr, e.g. "pc.ram" (u8-length-prefixed in the stream: 1..255 bytes). */
  name: string;
  /** RAMBlock used_length in bytes. */
  usedLength: number;
}

export interface BlockLayout extends BlockSpec {
  /** Pages of the block: ceil(usedLength / 4096). */
  pageCount: number;
  /** Index of the block's first page among all pages of the file (= fileOffset / 4096). */
  firstPage: number;
  fileOffset: number;
  /** usedLength rounded up to a page. */
  fileLength: number;
}

export interface Span {
  offset: number;
  length: number;
}

export interface RamLayout {
  /** Format major version the layout is of (1 or 2). */
  version: number;
  blocks: BlockLayout[];
  /** Pages of all blocks (the page table's entries). */
  totalPages: number;
  /** v2: the page after each block but the last (a mapped-ram block entry); v1: none. */
  links: Span[];
  /** End of the last block: where the regions after RAM start. Page-aligned. */
  ramEnd: number;
}

export interface FileLayout extends RamLayout {
  pageTable: Span;
  prologue: Span;
  deviceTail: Span;
  /** v2 only (empty in v1, and when the file has no mapped-ram view): see mapped-ram.ts. */
  glue: Span;
  bitmaps: Span;
  mappedRamPrefix: Span;
  manifest: Span;
  trailer: Span;
  fileLength: number;
}

/** The lengths of the variable-size regions after RAM. */
export interface RegionLengths {
  prologue: number;
  deviceTail: number;
  manifest: number;
  /** v2: 0 when the file has no mapped-ram view. */
  glue?: number;
  bitmaps?: number;
  mappedRamPrefix?: number;
}

/** Explains why a block list cannot be laid out, or undefined when it can. */
export function checkBlocks(blocks: readonly BlockSpec[]): string | undefined {
  if (blocks.length === 0) return 'no RAM blocks';
  const seen = new Set<string>();
  let total = 0;
  for (const [i, b] of blocks.entries()) {
    const nameBytes = Buffer.byteLength(b.name, 'utf8');
    if (nameBytes < 1 || nameBytes > 255) return `block ${i}: name must be 1..255 bytes`;
    if (seen.has(b.name)) return `block ${i}: duplicate name "${b.name}"`;
    seen.add(b.name);
    if (!Number.isSafeInteger(b.usedLength) || b.usedLength <= 0) {
      return `block ${i} "${b.name}": usedLength must be a positive integer, got ${b.usedLength}`;
    }
    // A file from elsewhere may claim blocks whose sum no double holds exactly.
    total += Math.ceil(b.usedLength / PAGE_SIZE) * PAGE_SIZE;
    if (!Number.isSafeInteger(total)) return `blocks 0..${i}: more RAM than a file can hold`;
  }
  return undefined;
}

/**
 * Blocks in stream order, each at a page-aligned offset, the first at 0 (memory-backend-file maps
 * from 0); in version 2 a link page follows each block but the last.
 */
export function layoutRam(blocks: readonly BlockSpec[], version = FORMAT_VERSION_MAJOR): RamLayout {
  const problem = checkBlocks(blocks);
  if (problem) throw new RangeError(problem);
  if (version !== 1 && version !== 2) throw new RangeError(`no layout for format version ${version}`);
  let offset = 0;
  let pages = 0;
  const out: BlockLayout[] = [];
  const links: Span[] = [];
  for (const [i, b] of blocks.entries()) {
    const pageCount = Math.ceil(b.usedLength / PAGE_SIZE);
    const fileLength = pageCount * PAGE_SIZE;
    out.push({
      name: b.name,
      usedLength: b.usedLength,
      pageCount,
      firstPage: pages,
      fileOffset: offset,
      fileLength,
    });
    offset += fileLength;
    pages += pageCount;
    if (version >= 2 && i < blocks.length - 1) {
      links.push({ offset, length: PAGE_SIZE });
      offset += PAGE_SIZE;
    }
  }
  if (!Number.isSafeInteger(offset)) throw new RangeError('RAM blocks too large');
  return { version, blocks: out, totalPages: pages, links, ramEnd: offset };
}

/** The whole file, given the RAM layout and the lengths of the variable-size regions after it. */
export function layoutFile(ram: RamLayout, lengths: RegionLengths): FileLayout {
  let at = ram.ramEnd;
  const next = (length: number): Span => {
    const span = { offset: at, length };
    at += length;
    return span;
  };
  const pageTableLength = ram.totalPages * 4;
  if (ram.version === 1) {
    const pageTable = next(pageTableLength);
    const prologue = next(lengths.prologue);
    const deviceTail = next(lengths.deviceTail);
    const empty = { offset: at, length: 0 };
    const manifest = next(lengths.manifest);
    const trailer = next(TRAILER_SIZE);
    const none = { glue: empty, bitmaps: empty, mappedRamPrefix: empty };
    return { ...ram, pageTable, prologue, deviceTail, ...none, manifest, trailer, fileLength: at };
  }
  // The glue and the device tail right after the last block: QEMU reads on there (mapped-ram.ts).
  const glue = next(lengths.glue ?? 0);
  const deviceTail = next(lengths.deviceTail);
  const pageTable = next(pageTableLength);
  const prologue = next(lengths.prologue);
  const bitmaps = next(lengths.bitmaps ?? 0);
  const mappedRamPrefix = next(lengths.mappedRamPrefix ?? 0);
  const manifest = next(lengths.manifest);
  const trailer = next(TRAILER_SIZE);
  return {
    ...ram,
    pageTable,
    prologue,
    deviceTail,
    glue,
    bitmaps,
    mappedRamPrefix,
    manifest,
    trailer,
    fileLength: at,
  };
}

/** Byte range of one block's entries in the page table. */
export function pageTableSpan(layout: FileLayout, blockIndex: number): Span {
  const b = layout.blocks[blockIndex];
  if (!b) throw new RangeError(`no block ${blockIndex}`);
  return { offset: layout.pageTable.offset + b.firstPage * 4, length: b.pageCount * 4 };
}

/** The parts of a manifest that place bytes (a structural subset of Manifest). */
export interface RecordedLayout {
  version: number;
  ram: {
    blocks: readonly (BlockSpec & {
      fileOffset: number;
      fileLength: number;
      dataPages: number;
      zeroPages: number;
      missingPages: number;
      zeroCrcDataPages: readonly number[];
    })[];
    pageTable: Span;
    /** v2 only. */
    links?: { sha256: string } | undefined;
  };
  stream: { prologue: Span; deviceTail: Span };
  /** v2 only. */
  mappedRam?: { glue: Span; bitmaps: Span; prefix: Span; streamOffset: number } | undefined;
}

/**
 * Recomputes the layout from a manifest's block list and blob lengths and checks that every
 * recorded offset matches it, so the regions tile the file exactly from 0 to its end (no byte is
 * outside a checksummed region). Returns the layout, or the first mismatch.
 */
export function checkRecordedLayout(
  recorded: RecordedLayout,
  manifest: Span,
  fileLength: number,
): { ok: true; layout: FileLayout } | { ok: false; problem: string } {
  const problem = checkBlocks(recorded.ram.blocks);
  if (problem) return { ok: false, problem };
  const { version, mappedRam } = recorded;
  if (version !== 1 && version !== 2) return { ok: false, problem: `no layout for version ${version}` };
  const v2Parts = mappedRam !== undefined && recorded.ram.links !== undefined;
  if ((version === 2) !== v2Parts || (version === 1 && (mappedRam || recorded.ram.links))) {
    return {
      ok: false,
      problem: `a version ${version} manifest must have mappedRam and ram.links exactly when 2`,
    };
  }
  const layout = layoutFile(layoutRam(recorded.ram.blocks, version), {
    prologue: recorded.stream.prologue.length,
    deviceTail: recorded.stream.deviceTail.length,
    manifest: manifest.length,
    ...(mappedRam
      ? {
          glue: mappedRam.glue.length,
          bitmaps: mappedRam.bitmaps.length,
          mappedRamPrefix: mappedRam.prefix.length,
        }
      : {}),
  });
  const mismatch =
    recordedBlockMismatch(recorded.ram.blocks, layout) ??
    recordedSpanMismatch(recorded, manifest, layout) ??
    (layout.fileLength !== fileLength
      ? `regions end at ${layout.fileLength}, the file is ${fileLength} bytes`
      : undefined);
  return mismatch ? { ok: false, problem: mismatch } : { ok: true, layout };
}

/** Explains the first recorded block that is misplaced or miscounted, or undefined when none is. */
function recordedBlockMismatch(
  recorded: RecordedLayout['ram']['blocks'],
  layout: FileLayout,
): string | undefined {
  for (const [i, b] of layout.blocks.entries()) {
    const r = recorded[i]!;
    if (r.fileOffset !== b.fileOffset || r.fileLength !== b.fileLength) {
      return `block "${b.name}" is at ${r.fileOffset}+${r.fileLength}, expected ${b.fileOffset}+${b.fileLength}`;
    }
    if (r.dataPages + r.zeroPages + r.missingPages !== b.pageCount) {
      return `block "${b.name}": page counts do not add up to ${b.pageCount}`;
    }
    if (r.zeroCrcDataPages.some((p) => !Number.isSafeInteger(p) || p < 0 || p >= b.pageCount)) {
      return `block "${b.name}": zeroCrcDataPages out of range`;
    }
  }
  return undefined;
}

/** Explains the first recorded region after RAM that is not where the layout puts it, or undefined. */
function recordedSpanMismatch(
  recorded: RecordedLayout,
  manifest: Span,
  layout: FileLayout,
): string | undefined {
  const spans: [string, Span, Span][] = [
    ['page table', recorded.ram.pageTable, layout.pageTable],
    ['prologue', recorded.stream.prologue, layout.prologue],
    ['device tail', recorded.stream.deviceTail, layout.deviceTail],
    ['manifest', manifest, layout.manifest],
  ];
  const m = recorded.mappedRam;
  if (m) {
    spans.push(['glue', m.glue, layout.glue], ['bitmaps', m.bitmaps, layout.bitmaps]);
    spans.push(['mapped-ram prefix', m.prefix, layout.mappedRamPrefix]);
    if (m.prefix.length > 0 && m.streamOffset !== m.prefix.offset) {
      return `the mapped-ram stream starts at ${m.streamOffset}, its prefix at ${m.prefix.offset}`;
    }
  }
  for (const [name, r, want] of spans) {
    if (r.offset !== want.offset || r.length !== want.length) {
      return `${name} is at ${r.offset}+${r.length}, expected ${want.offset}+${want.length}`;
    }
  }
  return undefined;
}
