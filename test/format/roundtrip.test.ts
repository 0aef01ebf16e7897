import fs from 'node:fs';
import path from 'node:path';
import { crc32 } from 'node:zlib';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { TRAILER_MAGIC, TRAILER_SIZE, ZERO_PAGE_CRC } from '../../src/format/codec.js';
import { openSnapshot, type SnapshotReader } from '../../src/format/reader.js';
import { SnapshotWriter } from '../../src/format/writer.js';
import {
  DEVICE_TAIL,
  type Expected,
  expectFileError,
  forgeZeroCrcPage,
  MiB,
  PAGE,
  PROLOGUE,
  pageData,
  rewriteManifest,
  sampleInfo,
  tempDir,
  verifyFile,
  writeSample,
} from './helpers.js';

const dir = tempDir();
afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

/** Reads every block back with readPages and compares page by page with what was delivered. */
async function expectContents(reader: SnapshotReader, expected: Expected, verify: boolean): Promise<void> {
  for (const [bi, pages] of expected.entries()) {
    const seen: string[] = [];
    for await (const run of reader.readPages(bi, { verify, maxRunBytes: 256 * 1024 })) {
      for (let k = 0; k < run.pageCount; k++) {
        const p = run.offset / PAGE + k;
        const want = pages[p]!;
        if (run.kind === 'zero') {
          expect(want.kind, `block ${bi} page ${p}`).toBe('zero');
        } else {
          expect(want.kind, `block ${bi} page ${p}`).toBe('data');
          const got = run.data.subarray(k * PAGE, (k + 1) * PAGE);
          expect(want.kind === 'data' && got.equals(want.data), `block ${bi} page ${p} bytes`).toBe(true);
        }
        seen.push(String(p));
      }
    }
    expect(seen.length).toBe(pages.length);
  }
}

describe('writer → reader round trip', () => {
  let file: string;
  let expected: Expected;
  let reader: SnapshotReader;
  let manifest: Awaited<ReturnType<SnapshotWriter['finish']>>;

  beforeAll(async () => {
    file = path.join(dir, 'vm.qsnap');
    // Small chunks so that sorting, run splitting and barriers happen many times.
    const w = await writeSample(file, { chunkBytes: 64 * 1024, bufferBytes: 256 * 1024 });
    expected = w.expected;
    expect(fs.existsSync(file)).toBe(false);
    manifest = await w.writer.finish({ prologue: PROLOGUE, deviceTail: DEVICE_TAIL, info: sampleInfo() });
    reader = await openSnapshot(file);
  });
  afterAll(() => reader.close());

  it('returns the manifest it wrote, and the reader reads the same', () => {
    expect(reader.manifest).toEqual(manifest);
    expect(manifest.format).toBe('qsnap-snapshot');
    expect(manifest.version).toBe(2);
    expect(manifest.ram.blocks.map((b) => [b.name, b.usedLength, b.fileOffset, b.fileLength])).toEqual([
      // Format 2: a link page after each block but the last.
      ['pc.ram', 8 * MiB, 0, 8 * MiB],
      ['vga.vram', 1 * MiB, 8 * MiB + 4096, 1 * MiB],
      ['pc.bios', 256 * 1024, 9 * MiB + 8192, 256 * 1024],
      ['/rom@etc/acpi/tables', 5000, 9 * MiB + 256 * 1024 + 12288, 8192],
    ]);
    // The sample's prologue is not a real stream: no mapped-ram view, its regions empty.
    expect(manifest.mappedRam).toMatchObject({ prefix: { length: 0 }, streamOffset: 0 });
    expect(manifest.disks[0]?.frozenFile).toBe('/var/lib/qsnap/disk0.qcow2');
    expect(manifest.timings.downtimeMs).toBe(3.2);
    expect(manifest.counts.streamBytes).toBe(12345678);
  });

  it('counts pages as delivered (final state of each page)', () => {
    const flat = expected.flat();
    const data = flat.filter((p) => p.kind === 'data').length;
    expect(manifest.counts.pagesWritten).toBe(data);
    expect(manifest.counts.zeroPages).toBe(flat.length - data);
    // Each of the six extra records hits a page the main pass had delivered already.
    expect(manifest.counts.duplicatePages).toBe(6);
    expect(manifest.counts.missingPages).toBe(0);
    for (const [i, b] of manifest.ram.blocks.entries()) {
      expect(b.dataPages).toBe(expected[i]!.filter((p) => p.kind === 'data').length);
      expect(b.dataPages + b.zeroPages).toBe(expected[i]!.length);
    }
  });

  it('reads back every byte of every page, with and without verification', async () => {
    await expectContents(reader, expected, false);
    await expectContents(reader, expected, true);
  });

  it('holds zeros at zero pages, including one overwritten after data', () => {
    const fd = fs.openSync(file, 'r');
    const buf = Buffer.alloc(PAGE);
    fs.readSync(fd, buf, 0, PAGE, 10 * PAGE); // pc.ram page 10: data, then zero
    fs.closeSync(fd);
    expect(buf.equals(Buffer.alloc(PAGE))).toBe(true);
    expect(expected[0]![10]!.kind).toBe('zero');
  });

  it('has a page table with the CRC of every page', async () => {
    for (const [bi, pages] of expected.entries()) {
      const table = await reader.readPageTable(bi);
      expect(table.length).toBe(pages.length);
      for (const [p, want] of pages.entries()) {
        expect(table[p]).toBe(want.kind === 'data' ? crc32(want.data) : ZERO_PAGE_CRC);
      }
    }
  });

  it('keeps the prologue and device tail verbatim', async () => {
    expect((await reader.readPrologue()).equals(PROLOGUE)).toBe(true);
    expect((await reader.readDeviceTail()).equals(DEVICE_TAIL)).toBe(true);
  });

  it('puts pc.ram at offset 0, page for page (what memory-backend-file maps)', () => {
    const fd = fs.openSync(file, 'r');
    const buf = Buffer.alloc(PAGE);
    for (const p of [0, 1, 100, 2047]) {
      fs.readSync(fd, buf, 0, PAGE, p * PAGE);
      const want = expected[0]![p]!;
      expect(buf.equals(want.kind === 'data' ? want.data : Buffer.alloc(PAGE)), `page ${p}`).toBe(true);
    }
    fs.closeSync(fd);
  });

  it('ends with the trailer and its magic', () => {
    const st = fs.statSync(file);
    const fd = fs.openSync(file, 'r');
    const tail = Buffer.alloc(8);
    fs.readSync(fd, tail, 0, 8, st.size - 8);
    fs.closeSync(fd);
    expect(tail.equals(TRAILER_MAGIC)).toBe(true);
    expect(reader.layout.trailer).toEqual({ offset: st.size - TRAILER_SIZE, length: TRAILER_SIZE });
  });

  it('verifies clean and reports progress up to the file length', async () => {
    const progress: number[] = [];
    const r = await reader.verify({ onProgress: (p) => progress.push(p.bytesDone) });
    expect(r.bytesVerified).toBe(reader.fileLength);
    expect(progress.at(-1)).toBe(reader.fileLength);
    expect(r.dataPages).toBe(manifest.counts.pagesWritten);
    expect(r.zeroPages).toBe(manifest.counts.zeroPages);
  });

  it('verify stops when its signal is aborted', async () => {
    const ac = new AbortController();
    let calls = 0;
    const run = reader.verify({
      signal: ac.signal,
      onProgress: () => {
        if (++calls === 3) ac.abort();
      },
    });
    await expect(run).rejects.toMatchObject({ name: 'AbortError' });
    expect(calls).toBeLessThan(10);
  });

  it('is sparse: allocated ≈ data pages + metadata', () => {
    const st = fs.statSync(file);
    const allocated = st.blocks * 512;
    const metadata = st.size - reader.layout.ramEnd;
    // +1 page: pc.ram page 10 was zeroed after data, so zeros were written there.
    const minimum = (manifest.counts.pagesWritten + 1) * PAGE;
    expect(allocated).toBeGreaterThanOrEqual(minimum);
    expect(allocated).toBeLessThanOrEqual(minimum + metadata + 64 * 1024);
    expect(allocated).toBeLessThan(0.8 * st.size);
  });

  it('negative control: a densely written file of the same size fails the sparse check', () => {
    const dense = path.join(dir, 'dense');
    fs.writeFileSync(dense, Buffer.alloc(fs.statSync(file).size, 1));
    const st = fs.statSync(dense);
    expect(st.blocks * 512).not.toBeLessThan(0.8 * st.size);
    fs.rmSync(dense);
  });

  it('leaves no temporary file behind', () => {
    expect(fs.readdirSync(dir).filter((n) => n.includes('qsnap-partial'))).toEqual([]);
  });
});

describe('zero-CRC data pages', () => {
  it('a data page whose CRC equals the zero-page CRC is kept as data and listed', async () => {
    const forged = forgeZeroCrcPage();
    expect(crc32(forged)).toBe(ZERO_PAGE_CRC);
    expect(forged.equals(Buffer.alloc(PAGE))).toBe(false);
    const file = path.join(dir, 'forged.qsnap');
    const blocks = [{ name: 'pc.ram', usedLength: 16 * PAGE }];
    const w = await SnapshotWriter.create(file, { blocks });
    for (let p = 0; p < 16; p++) {
      if (p === 5) w.writePage(0, p * PAGE, forged);
      else if (p % 2 === 0) w.writeZeroPage(0, p * PAGE);
      else w.writePage(0, p * PAGE, pageData(0, p));
    }
    const m = await w.finish({ prologue: PROLOGUE, deviceTail: DEVICE_TAIL, info: sampleInfo() });
    expect(m.ram.blocks[0]!.zeroCrcDataPages).toEqual([5]);
    const r = await openSnapshot(file);
    const table = await r.readPageTable(0);
    expect(r.isZeroPage(0, 5, table)).toBe(false);
    expect(r.isZeroPage(0, 4, table)).toBe(true);
    const runs: [string, number, number][] = [];
    for await (const run of r.readPages(0)) {
      runs.push([run.kind, run.offset / PAGE, run.pageCount]);
      if (run.kind === 'data' && run.offset / PAGE <= 5 && 5 < run.offset / PAGE + run.pageCount) {
        const k = 5 - run.offset / PAGE;
        expect(run.data.subarray(k * PAGE, (k + 1) * PAGE).equals(forged)).toBe(true);
      }
    }
    expect(runs.slice(0, 7)).toEqual([
      ['zero', 0, 1],
      ['data', 1, 1],
      ['zero', 2, 1],
      ['data', 3, 1],
      ['zero', 4, 1],
      ['data', 5, 1],
      ['zero', 6, 1],
    ]);
    await r.verify();
    await r.close();
  });

  it('negative control: without the list, the forged page reads as a hole and fails verification', async () => {
    const file = path.join(dir, 'forged.qsnap');
    rewriteManifest(file, (m) => {
      m.ram.blocks[0].zeroCrcDataPages = [];
    });
    const r = await openSnapshot(file);
    const kinds: string[] = [];
    for await (const run of r.readPages(0)) kinds.push(`${run.kind}@${run.offset / PAGE}`);
    expect(kinds).toContain('zero@4');
    expect(kinds).not.toContain('data@5');
    await expectFileError(r.verify(), 'QSNAP_FILE_CORRUPT', { region: 'ram', pageIndex: 5, badPages: 1 });
    await r.close();
  });
});

describe('missing pages', () => {
  it('finish refuses while pages are missing and stays open; delivering them completes it', async () => {
    const file = path.join(dir, 'missing.qsnap');
    const blocks = [
      { name: 'pc.ram', usedLength: 8 * PAGE },
      { name: 'vga.vram', usedLength: 4 * PAGE },
    ];
    const w = await SnapshotWriter.create(file, { blocks });
    for (let p = 0; p < 8; p++) w.writePage(0, p * PAGE, pageData(0, p));
    w.writePage(1, 0, pageData(1, 0));
    expect(w.missingPages()).toEqual({
      total: 3,
      blocks: [{ blockIndex: 1, name: 'vga.vram', count: 3, firstOffset: PAGE }],
    });
    const info = { prologue: PROLOGUE, deviceTail: DEVICE_TAIL, info: sampleInfo() };
    await expectFileError(w.finish(info), 'QSNAP_FILE_INCOMPLETE', { missingPages: 3 });
    expect(w.state).toBe('open');
    expect(fs.existsSync(file)).toBe(false);
    for (let p = 1; p < 4; p++) w.writeZeroPage(1, p * PAGE);
    expect(w.missingPages().total).toBe(0);
    await w.finish(info);
    await verifyFile(file);
  });

  it('with allowMissingPages, missing pages are holes and counted', async () => {
    const file = path.join(dir, 'missing-allowed.qsnap');
    const w = await SnapshotWriter.create(file, { blocks: [{ name: 'pc.ram', usedLength: 8 * PAGE }] });
    w.writePage(0, 3 * PAGE, pageData(0, 3));
    const m = await w.finish({
      prologue: PROLOGUE,
      deviceTail: DEVICE_TAIL,
      info: sampleInfo(),
      allowMissingPages: true,
    });
    expect(m.counts.missingPages).toBe(7);
    expect(m.ram.blocks[0]).toMatchObject({ dataPages: 1, zeroPages: 0, missingPages: 7 });
    const r = await openSnapshot(file);
    await r.verify();
    const runs = [];
    for await (const run of r.readPages(0)) runs.push([run.kind, run.offset / PAGE, run.pageCount]);
    expect(runs).toEqual([
      ['zero', 0, 3],
      ['data', 3, 1],
      ['zero', 4, 4],
    ]);
    await r.close();
  });
});

describe('empty blobs and a single page', () => {
  it('round-trips a one-page block with empty prologue and tail', async () => {
    const file = path.join(dir, 'tiny.qsnap');
    const w = await SnapshotWriter.create(file, { blocks: [{ name: 'pc.ram', usedLength: PAGE }] });
    w.writePage(0, 0, pageData(0, 0));
    await w.finish({ prologue: Buffer.alloc(0), deviceTail: Buffer.alloc(0), info: sampleInfo() });
    const r = await openSnapshot(file);
    expect((await r.readPrologue()).length).toBe(0);
    await r.verify();
    expect(r.fileLength).toBe(PAGE + 4 + r.layout.manifest.length + TRAILER_SIZE);
    await r.close();
  });
});
