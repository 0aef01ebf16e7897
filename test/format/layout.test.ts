import { describe, expect, it } from 'vitest';
import {
  checkBlocks,
  checkRecordedLayout,
  layoutFile,
  layoutRam,
  pageTableSpan,
} from '../../src/format/layout.js';
import { MiB } from '../support/files.js';

const KiB = 1024;

describe('layoutRam', () => {
  it('version 1, a pc guest: pc.ram at 0, then the small blocks, each page-aligned', () => {
    const l = layoutRam(
      [
        { name: 'pc.ram', usedLength: 512 * MiB },
        { name: 'vga.vram', usedLength: 16 * MiB },
        { name: '/rom@etc/acpi/tables', usedLength: 128 * KiB },
        { name: 'pc.bios', usedLength: 256 * KiB },
        { name: '/rom@etc/table-loader', usedLength: 4 * KiB },
        { name: '/rom@etc/acpi/rsdp', usedLength: 4 * KiB },
      ],
      1,
    );
    expect(l.blocks.map((b) => [b.name, b.fileOffset, b.fileLength, b.firstPage, b.pageCount])).toEqual([
      ['pc.ram', 0, 0x2000_0000, 0, 0x20000],
      ['vga.vram', 0x2000_0000, 0x100_0000, 0x20000, 0x1000],
      ['/rom@etc/acpi/tables', 0x2100_0000, 0x2_0000, 0x21000, 0x20],
      ['pc.bios', 0x2102_0000, 0x4_0000, 0x21020, 0x40],
      ['/rom@etc/table-loader', 0x2106_0000, 0x1000, 0x21060, 1],
      ['/rom@etc/acpi/rsdp', 0x2106_1000, 0x1000, 0x21061, 1],
    ]);
    expect(l.ramEnd).toBe(0x2106_2000);
    expect(l.totalPages).toBe(0x21062);
  });

  it('rounds a used length that is not a page multiple up to a page', () => {
    const l = layoutRam(
      [
        { name: 'a', usedLength: 1 },
        { name: 'b', usedLength: 4097 },
        { name: 'c', usedLength: 4096 },
      ],
      1,
    );
    expect(l.blocks.map((b) => [b.fileOffset, b.fileLength, b.pageCount])).toEqual([
      [0, 4096, 1],
      [4096, 8192, 2],
      [12288, 4096, 1],
    ]);
  });

  it('handles RAM beyond 4 GiB (offsets past 32 bits)', () => {
    const l = layoutRam(
      [
        { name: 'pc.ram', usedLength: 6 * 1024 * MiB },
        { name: 'vga.vram', usedLength: 16 * MiB },
      ],
      1,
    );
    expect(l.blocks[1]!.fileOffset).toBe(6 * 1024 * MiB);
    expect(l.blocks[1]!.firstPage).toBe((6 * 1024 * MiB) / 4096);
    expect(l.ramEnd).toBe(6 * 1024 * MiB + 16 * MiB);
  });

  it('version 2: a link page after every block but the last; page indexes stay dense', () => {
    const l = layoutRam([
      { name: 'pc.ram', usedLength: 6 * 1024 * MiB },
      { name: 'vga.vram', usedLength: 16 * MiB },
      { name: 'pc.bios', usedLength: 256 * KiB },
    ]);
    expect(l.version).toBe(2);
    expect(l.blocks.map((b) => [b.fileOffset, b.firstPage])).toEqual([
      [0, 0],
      [6 * 1024 * MiB + 4096, (6 * 1024 * MiB) / 4096],
      [6 * 1024 * MiB + 16 * MiB + 8192, (6 * 1024 * MiB + 16 * MiB) / 4096],
    ]);
    expect(l.links).toEqual([
      { offset: 6 * 1024 * MiB, length: 4096 },
      { offset: 6 * 1024 * MiB + 16 * MiB + 4096, length: 4096 },
    ]);
    expect(l.ramEnd).toBe(6 * 1024 * MiB + 16 * MiB + 8192 + 256 * KiB);
    expect(l.totalPages).toBe((6 * 1024 * MiB + 16 * MiB + 256 * KiB) / 4096);
    expect(() => layoutRam([{ name: 'a', usedLength: 4096 }], 3)).toThrow(RangeError);
  });

  it('refuses impossible block lists', () => {
    expect(checkBlocks([])).toMatch(/no RAM blocks/);
    expect(checkBlocks([{ name: '', usedLength: 4096 }])).toMatch(/name/);
    expect(checkBlocks([{ name: 'x'.repeat(256), usedLength: 4096 }])).toMatch(/1\.\.255/);
    expect(checkBlocks([{ name: 'é'.repeat(128), usedLength: 4096 }])).toMatch(/1\.\.255/); // 256 UTF-8 bytes
    expect(checkBlocks([{ name: 'a', usedLength: 0 }])).toMatch(/positive/);
    expect(checkBlocks([{ name: 'a', usedLength: 1.5 }])).toMatch(/positive/);
    expect(
      checkBlocks([
        { name: 'a', usedLength: 4096 },
        { name: 'a', usedLength: 4096 },
      ]),
    ).toMatch(/duplicate/);
    expect(() => layoutRam([])).toThrow(RangeError);
    expect(checkBlocks([{ name: 'pc.ram', usedLength: 4096 }])).toBeUndefined();
  });
});

describe('layoutFile', () => {
  const ram = layoutRam(
    [
      { name: 'pc.ram', usedLength: 8 * MiB },
      { name: 'pc.bios', usedLength: 256 * KiB },
    ],
    1,
  );
  const file = layoutFile(ram, { prologue: 100, deviceTail: 5000, manifest: 700 });

  it('places page table, prologue, tail, manifest and trailer back to back after RAM', () => {
    const pages = 2048 + 64;
    expect(file.pageTable).toEqual({ offset: 8 * MiB + 256 * KiB, length: pages * 4 });
    expect(file.prologue).toEqual({ offset: file.pageTable.offset + pages * 4, length: 100 });
    expect(file.deviceTail).toEqual({ offset: file.prologue.offset + 100, length: 5000 });
    expect(file.manifest).toEqual({ offset: file.deviceTail.offset + 5000, length: 700 });
    expect(file.trailer).toEqual({ offset: file.manifest.offset + 700, length: 80 });
    expect(file.fileLength).toBe(file.trailer.offset + 80);
  });

  it('version 2: glue and device tail right after RAM, then page table, prologue, bitmaps, prefix', () => {
    const v2 = layoutRam([
      { name: 'pc.ram', usedLength: 8 * MiB },
      { name: 'pc.bios', usedLength: 256 * KiB },
    ]);
    const f = layoutFile(v2, {
      glue: 13,
      prologue: 100,
      deviceTail: 5000,
      bitmaps: 264,
      mappedRamPrefix: 90,
      manifest: 700,
    });
    const ramEnd = 8 * MiB + 4096 + 256 * KiB;
    expect(f.glue).toEqual({ offset: ramEnd, length: 13 });
    expect(f.deviceTail).toEqual({ offset: ramEnd + 13, length: 5000 });
    expect(f.pageTable).toEqual({ offset: ramEnd + 5013, length: (2048 + 64) * 4 });
    expect(f.prologue.offset).toBe(f.pageTable.offset + f.pageTable.length);
    expect(f.bitmaps).toEqual({ offset: f.prologue.offset + 100, length: 264 });
    expect(f.mappedRamPrefix).toEqual({ offset: f.bitmaps.offset + 264, length: 90 });
    expect(f.manifest).toEqual({ offset: f.mappedRamPrefix.offset + 90, length: 700 });
    expect(f.fileLength).toBe(f.manifest.offset + 700 + 80);
  });

  it('gives each block its slice of the page table', () => {
    expect(pageTableSpan(file, 0)).toEqual({ offset: file.pageTable.offset, length: 2048 * 4 });
    expect(pageTableSpan(file, 1)).toEqual({ offset: file.pageTable.offset + 2048 * 4, length: 64 * 4 });
    expect(() => pageTableSpan(file, 2)).toThrow(RangeError);
  });
});

describe('checkRecordedLayout', () => {
  const ram = layoutRam(
    [
      { name: 'pc.ram', usedLength: 64 * KiB },
      { name: 'pc.bios', usedLength: 8 * KiB },
    ],
    1,
  );
  const file = layoutFile(ram, { prologue: 10, deviceTail: 20, manifest: 30 });
  const region = (s: { offset: number; length: number }) => ({ ...s, sha256: '0'.repeat(64) });
  const recorded = () => ({
    version: 1,
    ram: {
      blocks: ram.blocks.map((b) => ({
        name: b.name,
        usedLength: b.usedLength,
        fileOffset: b.fileOffset,
        fileLength: b.fileLength,
        dataPages: 1,
        zeroPages: b.pageCount - 1,
        missingPages: 0,
        zeroCrcDataPages: [] as number[],
      })),
      pageTable: region(file.pageTable),
    },
    stream: { prologue: region(file.prologue), deviceTail: region(file.deviceTail) },
  });

  it('accepts the layout it computes and returns it', () => {
    const r = checkRecordedLayout(recorded(), file.manifest, file.fileLength);
    expect(r).toEqual({ ok: true, layout: file });
  });

  const broken: [string, (r: ReturnType<typeof recorded>) => void, number?][] = [
    ['block offset', (r) => (r.ram.blocks[1]!.fileOffset += 4096)],
    ['block length', (r) => (r.ram.blocks[0]!.fileLength -= 4096)],
    ['page counts', (r) => (r.ram.blocks[0]!.missingPages = 1)],
    ['zeroCrcDataPages out of range', (r) => r.ram.blocks[1]!.zeroCrcDataPages.push(2)],
    ['page table', (r) => (r.ram.pageTable.offset += 1)],
    ['prologue', (r) => (r.stream.prologue.offset -= 1)],
    ['device tail', (r) => (r.stream.deviceTail.length += 1)],
    ['duplicate block names', (r) => (r.ram.blocks[1]!.name = 'pc.ram')],
    ['file length', () => {}, file.fileLength + 1],
    ['version', (r) => (r.version = 2)],
  ];
  for (const [name, mutate, size] of broken) {
    it(`refuses a wrong ${name}`, () => {
      const r = recorded();
      mutate(r);
      const res = checkRecordedLayout(r, file.manifest, size ?? file.fileLength);
      expect(res.ok).toBe(false);
    });
  }
});
