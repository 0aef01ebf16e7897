/**
 * Format 2's mapped-ram view, byte for byte: what QEMU ≥ 9.0's loader reads from the stream
 * offset on (migration/ram.c, parse_ramblock_mapped_ram). test/compat/qemu10.test.ts loads such a
 * file into a real QEMU 10; this test pins the bytes, the checks that guard them, and format 1.
 */
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { openSnapshot, SnapshotWriter } from '../../src/format/index.js';
import { encodePrologue, encodeRamSetupSection, tryDecodePrologue } from '../../src/stream/index.js';
import { DEVICE_TAIL, expectFileError, flipByte, MiB, PAGE, sampleInfo, tempDir } from './helpers.js';

const BLOCKS = [
  { name: 'pc.ram', usedLength: 1 * MiB },
  { name: 'vga.vram', usedLength: 64 * 1024 },
  { name: 'pc.bios', usedLength: 8 * 1024 },
];
const SECTION_ID = 2;
const PROLOGUE = Buffer.concat([
  encodePrologue({ machine: 'pc-i440fx-9.2', capabilities: [] }),
  encodeRamSetupSection({
    sectionId: SECTION_ID,
    blocks: BLOCKS.map((b) => ({ idstr: b.name, usedLength: b.usedLength })),
    footers: true,
    ignoreShared: false,
  }),
]);
/** Pages of pc.ram holding data (the rest are zero); every page of the small blocks is data. */
const DATA_PAGES = [0, 1, 2, 7, 64, 255];

async function write(file: string, formatVersion?: 1 | 2, prologue: Buffer = PROLOGUE): Promise<void> {
  const w = await SnapshotWriter.create(file, {
    blocks: BLOCKS,
    ...(formatVersion ? { formatVersion } : {}),
  });
  for (const [i, b] of BLOCKS.entries()) {
    for (let p = 0; p < b.usedLength / PAGE; p++) {
      if (i === 0 && !DATA_PAGES.includes(p)) w.writeZeroPage(i, p * PAGE);
      else w.writePage(i, p * PAGE, Buffer.alloc(PAGE, (i * 31 + p) % 251 || 1));
    }
  }
  await w.finish({ prologue, deviceTail: DEVICE_TAIL, info: sampleInfo() });
}

describe('format 2: the mapped-ram view', () => {
  const dir = tempDir('qsnap-mapped-ram-');
  const file = path.join(dir, 'vm.qsnap');
  let bytes: Buffer;
  beforeAll(async () => {
    await write(file);
    bytes = fs.readFileSync(file);
  });
  afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

  /** A block entry as the loader reads it: u8 len, idstr, be64 used, then the 28-byte header. */
  function entryAt(at: number) {
    const len = bytes[at]!;
    const name = bytes.toString('latin1', at + 1, at + 1 + len);
    const h = at + 1 + len + 8;
    return {
      name,
      usedLength: Number(bytes.readBigUInt64BE(at + 1 + len)),
      version: bytes.readUInt32BE(h),
      pageSize: Number(bytes.readBigUInt64BE(h + 4)),
      bitmapOffset: Number(bytes.readBigUInt64BE(h + 12)),
      pagesOffset: Number(bytes.readBigUInt64BE(h + 20)),
      end: h + 28,
    };
  }

  it('reads as a mapped-ram stream from its stream offset: every block entry where QEMU looks for it', async () => {
    const r = await openSnapshot(file);
    try {
      const view = await r.mappedRamView();
      expect(view).toBeDefined();
      const prefix = tryDecodePrologue(bytes.subarray(view!.streamOffset), view!.streamOffset)!;
      expect(prefix.machine).toBe('pc-i440fx-9.2');
      expect(prefix.capabilities).toEqual(['mapped-ram']);
      // START header (type, id, "ram", instance 0, version 4), then total | MEM_SIZE.
      let at = view!.streamOffset + prefix.size;
      expect(bytes[at]).toBe(0x01);
      expect(bytes.readUInt32BE(at + 1)).toBe(SECTION_ID);
      at += 1 + 4 + 1 + 3 + 4 + 4;
      const total = BLOCKS.reduce((s, b) => s + b.usedLength, 0);
      expect(Number(bytes.readBigUInt64BE(at))).toBe(total + 0x04);
      at += 8;
      // Walk the chain as the loader does: an entry, then on at pages offset + used length.
      const seen: ReturnType<typeof entryAt>[] = [];
      for (const [i, b] of r.layout.blocks.entries()) {
        const e = entryAt(at);
        expect(e).toMatchObject({ name: b.name, usedLength: b.usedLength, version: 1, pageSize: 4096 });
        expect(e.pagesOffset).toBe(b.fileOffset);
        seen.push(e);
        at = e.pagesOffset + e.usedLength;
        if (i < r.layout.blocks.length - 1) expect(at).toBe(r.layout.links[i]!.offset);
      }
      // The glue ends the START section (EOS, footer); the stream's device tail follows verbatim.
      expect(at).toBe(r.layout.glue.offset);
      expect(bytes.readBigUInt64BE(at)).toBe(0x10n);
      expect(bytes[at + 8]).toBe(0x7e);
      expect(bytes.readUInt32BE(at + 9)).toBe(SECTION_ID);
      expect(bytes.subarray(at + 13, at + 13 + DEVICE_TAIL.length).equals(DEVICE_TAIL)).toBe(true);
      // Bitmaps: pc.ram's data pages only; every page of the other blocks.
      const bits = (e: (typeof seen)[number], pages: number) =>
        Array.from({ length: pages }, (_, p) => (bytes[e.bitmapOffset + (p >> 3)]! >> (p & 7)) & 1);
      const ram = bits(seen[0]!, 256);
      expect(ram.flatMap((b, p) => (b ? [p] : []))).toEqual(DATA_PAGES);
      expect(bits(seen[1]!, 16).every((b) => b === 1)).toBe(true);
      expect(bits(seen[2]!, 2)).toEqual([1, 1]);
      // Bitmaps are whole unsigned longs.
      expect(seen[1]!.bitmapOffset - seen[0]!.bitmapOffset).toBe(32);
      // Pages are where the entries say.
      expect(bytes[seen[0]!.pagesOffset + 7 * PAGE]).toBe(7);
      expect(bytes[seen[1]!.pagesOffset]).toBe(31);
      await r.verify();
    } finally {
      await r.close();
    }
  });

  const damage: [string, (r: Awaited<ReturnType<typeof openSnapshot>>) => number, string][] = [
    ['a link page', (r) => r.layout.links[0]!.offset + 3, 'links'],
    ['the glue', (r) => r.layout.glue.offset + 2, 'mapped-ram'],
    ['a bitmap', (r) => r.layout.bitmaps.offset, 'mapped-ram'],
    ['the prefix', (r) => r.layout.mappedRamPrefix.offset + 20, 'mapped-ram'],
  ];
  for (const [what, where, region] of damage) {
    it(`a flipped byte in ${what} is refused before QEMU would read it, and by verify`, async () => {
      const copy = path.join(dir, `damaged-${region}-${where.name}.qsnap`);
      fs.copyFileSync(file, copy);
      const at = await openSnapshot(copy);
      const offset = where(at);
      await at.close();
      flipByte(copy, offset);
      const r = await openSnapshot(copy);
      try {
        await expectFileError(r.mappedRamView(), 'QSNAP_FILE_CORRUPT', { region });
        await expectFileError(r.verify(), 'QSNAP_FILE_CORRUPT', { region });
      } finally {
        await r.close();
      }
    });
  }

  it('a stream QEMU could not load as mapped-ram gets no view (x-ignore-shared)', async () => {
    const other = path.join(dir, 'ignore-shared.qsnap');
    const prologue = Buffer.concat([
      encodePrologue({ machine: 'pc-i440fx-9.2', capabilities: ['x-ignore-shared'] }),
      encodeRamSetupSection({
        sectionId: SECTION_ID,
        blocks: BLOCKS.map((b) => ({ idstr: b.name, usedLength: b.usedLength, mrAddr: 0n })),
        footers: true,
        ignoreShared: true,
      }),
    ]);
    await write(other, 2, prologue);
    const r = await openSnapshot(other);
    try {
      expect(await r.mappedRamView()).toBeUndefined();
      expect(r.manifest.mappedRam?.prefix.length).toBe(0);
      await r.verify();
    } finally {
      await r.close();
    }
  });

  it('format 1 files (written before 2026-12-03) still read and verify, without a view', async () => {
    const old = path.join(dir, 'v1.qsnap');
    await write(old, 1);
    const r = await openSnapshot(old);
    try {
      expect(r.trailer.versionMajor).toBe(1);
      expect(r.manifest.version).toBe(1);
      expect(r.manifest.mappedRam).toBeUndefined();
      expect(r.manifest.ram.blocks.map((b) => b.fileOffset)).toEqual([0, 1 * MiB, 1 * MiB + 64 * 1024]);
      expect(await r.mappedRamView()).toBeUndefined();
      const runs = [];
      for await (const run of r.readPages(1, { verify: true })) runs.push(run.kind);
      expect(runs).toEqual(['data']);
      await r.verify();
    } finally {
      await r.close();
    }
  });
});
