/**
 * Every integrity claim of docs/format.md, each shown on a clean file first (the check passes)
 * and then on a damaged copy (the same check fails with the right code and region).
 */
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { TRAILER_SIZE } from '../../src/format/codec.js';
import { openSnapshot } from '../../src/format/reader.js';
import {
  DEVICE_TAIL,
  type Expected,
  expectFileError,
  flipByte,
  type Json,
  PAGE,
  PROLOGUE,
  rewriteManifest,
  rng,
  sampleInfo,
  tempDir,
  writeSample,
} from './helpers.js';

const dir = tempDir();
let original: string;
let expected: Expected;
let layout: Awaited<ReturnType<typeof openSnapshot>>['layout'];

beforeAll(async () => {
  original = path.join(dir, 'original.qsnap');
  const w = await writeSample(original, { seed: 7 });
  expected = w.expected;
  await w.writer.finish({ prologue: PROLOGUE, deviceTail: DEVICE_TAIL, info: sampleInfo() });
  const r = await openSnapshot(original);
  layout = r.layout;
  await r.close();
});
afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

let copies = 0;
function copy(): string {
  const file = path.join(dir, `copy-${copies++}.qsnap`);
  fs.copyFileSync(original, file);
  return file;
}

async function verifyOk(file: string): Promise<void> {
  const r = await openSnapshot(file);
  try {
    await r.verify();
  } finally {
    await r.close();
  }
}

async function verifyFails(file: string, details: Record<string, unknown>) {
  const r = await openSnapshot(file);
  try {
    return await expectFileError(r.verify(), 'QSNAP_FILE_CORRUPT', details);
  } finally {
    await r.close();
  }
}

function firstPage(kind: 'data' | 'zero', block = 0): number {
  return expected[block]!.findIndex((p) => p.kind === kind);
}

describe('flipped bytes', () => {
  it('positive control: the untouched file opens and verifies', async () => {
    await verifyOk(original);
  });

  it('in a data page → ram, with block, page and file offset', async () => {
    const file = copy();
    const p = firstPage('data', 1);
    const fileOffset = layout.blocks[1]!.fileOffset + p * PAGE;
    flipByte(file, fileOffset + 123);
    const err = await verifyFails(file, {
      region: 'ram',
      block: 'vga.vram',
      blockIndex: 1,
      pageIndex: p,
      fileOffset,
      badPages: 1,
    });
    expect(err.details['badRegions']).toEqual(['ram']);
    // Lazy check of that page while streaming it.
    const r = await openSnapshot(file);
    const consume = async () => {
      for await (const _ of r.readPages(1, { verify: true })) {
        // drain
      }
    };
    await expectFileError(consume(), 'QSNAP_FILE_CORRUPT', { region: 'ram', pageIndex: p });
    await r.close();
  });

  it('in a hole (zero page) → ram', async () => {
    const file = copy();
    const p = firstPage('zero');
    flipByte(file, p * PAGE + 4000);
    await verifyFails(file, {
      region: 'ram',
      block: 'pc.ram',
      pageIndex: p,
      fileOffset: p * PAGE,
      badPages: 1,
    });
  });

  it('in the padding of a partial last page → ram', async () => {
    const file = copy();
    const b = layout.blocks[3]!; // usedLength 5000: bytes 5000..8191 are padding, zero
    flipByte(file, b.fileOffset + 6000);
    await verifyFails(file, { region: 'ram', block: b.name, pageIndex: 1 });
  });

  it('in several pages → all counted, the first one reported', async () => {
    const file = copy();
    const pages = [firstPage('zero'), firstPage('data'), 2000];
    for (const p of pages) flipByte(file, p * PAGE + 7);
    const err = await verifyFails(file, { region: 'ram', pageIndex: Math.min(...pages), badPages: 3 });
    expect(err.details['badPagesByBlock']).toEqual({ 'pc.ram': 3 });
  });

  it('in the page table → page-table (and readPageTable refuses it)', async () => {
    const file = copy();
    flipByte(file, layout.pageTable.offset + layout.pageTable.length - 1);
    await verifyFails(file, { region: 'page-table', ramChecked: false });
    const r = await openSnapshot(file);
    await expectFileError(r.readPageTable(0), 'QSNAP_FILE_CORRUPT', { region: 'page-table' });
    await r.close();
  });

  it('in the prologue → prologue', async () => {
    const file = copy();
    flipByte(file, layout.prologue.offset);
    await verifyFails(file, { region: 'prologue' });
    const r = await openSnapshot(file);
    await expectFileError(r.readPrologue(), 'QSNAP_FILE_CORRUPT', { region: 'prologue' });
    await r.close();
  });

  it('in the device tail → device-tail', async () => {
    const file = copy();
    flipByte(file, layout.deviceTail.offset + layout.deviceTail.length - 1);
    await verifyFails(file, { region: 'device-tail' });
    const r = await openSnapshot(file);
    await expectFileError(r.readDeviceTail(), 'QSNAP_FILE_CORRUPT', { region: 'device-tail' });
    await r.close();
  });

  it('in several regions → the first in file order, all listed', async () => {
    const file = copy();
    flipByte(file, layout.deviceTail.offset);
    flipByte(file, 5 * PAGE);
    const err = await verifyFails(file, { region: 'ram', pageIndex: 5 });
    expect(err.details['badRegions']).toEqual(['ram', 'device-tail']);
  });

  it('in the manifest → open fails: manifest', async () => {
    for (const at of [0, Math.floor(layout.manifest.length / 2), layout.manifest.length - 1]) {
      const file = copy();
      flipByte(file, layout.manifest.offset + at);
      await expectFileError(openSnapshot(file), 'QSNAP_FILE_CORRUPT', { region: 'manifest' });
    }
  });

  it('in any trailer byte → open fails: trailer, or not a snapshot for the magic', async () => {
    const file = copy();
    const start = layout.trailer.offset;
    for (let i = 0; i < TRAILER_SIZE; i++) {
      flipByte(file, start + i);
      if (i >= TRAILER_SIZE - 8) await expectFileError(openSnapshot(file), 'QSNAP_FILE_NOT_SNAPSHOT');
      else await expectFileError(openSnapshot(file), 'QSNAP_FILE_CORRUPT', { region: 'trailer' });
      flipByte(file, start + i);
    }
    await verifyOk(file); // flipped back: the loop's checks saw only the damage
  });

  it('made while a reader is open → verify catches the trailer and manifest too', async () => {
    const file = copy();
    const r = await openSnapshot(file);
    flipByte(file, layout.manifest.offset + 10);
    flipByte(file, layout.trailer.offset + 3);
    const err = await expectFileError(r.verify(), 'QSNAP_FILE_CORRUPT', { region: 'manifest' });
    expect(err.details['badRegions']).toEqual(['manifest', 'trailer']);
    await r.close();
  });
});

describe('truncation', () => {
  it('by one byte → not a snapshot', async () => {
    const file = copy();
    fs.truncateSync(file, fs.statSync(file).size - 1);
    await expectFileError(openSnapshot(file), 'QSNAP_FILE_NOT_SNAPSHOT');
  });

  it('at region boundaries and 40 random points → refused', async () => {
    const size = fs.statSync(original).size;
    const random = rng(99);
    const points = [
      0,
      1,
      PAGE,
      layout.ramEnd - 1,
      layout.ramEnd,
      layout.pageTable.offset + 1,
      layout.prologue.offset,
      layout.deviceTail.offset,
      layout.manifest.offset,
      layout.manifest.offset + 1,
      layout.trailer.offset,
      layout.trailer.offset + 1,
      size - 8,
      size - 2,
      ...Array.from({ length: 40 }, () => Math.floor(random() * size)),
    ];
    const file = path.join(dir, 'truncated.qsnap');
    for (const at of points) {
      fs.copyFileSync(original, file);
      fs.truncateSync(file, at);
      const err = await expectFileError(openSnapshot(file), 'QSNAP_FILE_NOT_SNAPSHOT');
      expect(err.message).toContain('truncated or not a qsnap snapshot');
    }
  });

  it('bytes cut from the middle, trailer intact → truncated', async () => {
    const file = path.join(dir, 'cut.qsnap');
    const all = fs.readFileSync(original);
    fs.writeFileSync(file, Buffer.concat([all.subarray(0, PAGE), all.subarray(2 * PAGE)]));
    await expectFileError(openSnapshot(file), 'QSNAP_FILE_TRUNCATED', {
      expectedBytes: all.length,
      actualBytes: all.length - PAGE,
    });
  });

  it('cut right after a snapshot embedded in RAM → refused (the embedded trailer records another length)', async () => {
    // A guest holding a qsnap file in memory: truncating the outer file at the end of the inner
    // one leaves a valid-looking trailer at the end.
    const inner = fs.readFileSync(original);
    const outer = Buffer.concat([Buffer.alloc(3 * PAGE, 1), inner, Buffer.alloc(PAGE, 2)]);
    const file = path.join(dir, 'embedded.qsnap');
    fs.writeFileSync(file, outer.subarray(0, 3 * PAGE + inner.length));
    await expectFileError(openSnapshot(file), 'QSNAP_FILE_TRUNCATED');
    // Negative control: the inner file by itself is a valid snapshot.
    fs.writeFileSync(file, inner);
    await verifyOk(file);
  });
});

describe('not a snapshot', () => {
  it('an empty file, a text file, a directory', async () => {
    const empty = path.join(dir, 'empty');
    fs.writeFileSync(empty, '');
    await expectFileError(openSnapshot(empty), 'QSNAP_FILE_NOT_SNAPSHOT');
    const text = path.join(dir, 'text');
    fs.writeFileSync(text, 'hello\n'.repeat(1000));
    await expectFileError(openSnapshot(text), 'QSNAP_FILE_NOT_SNAPSHOT');
    await expectFileError(openSnapshot(dir), 'QSNAP_FILE_NOT_SNAPSHOT');
  });

  it('a missing file → QSNAP_FILE_IO ENOENT', async () => {
    await expectFileError(openSnapshot(path.join(dir, 'nope')), 'QSNAP_FILE_IO', { errno: 'ENOENT' });
  });
});

describe('versions', () => {
  it('positive control: re-sealing an unchanged manifest gives a valid file', async () => {
    const file = copy();
    rewriteManifest(file, () => {});
    await verifyOk(file);
  });

  it('a newer major version in the trailer → QSNAP_FILE_VERSION', async () => {
    const file = copy();
    rewriteManifest(
      file,
      () => {},
      (t) => t.writeUInt16LE(3, TRAILER_SIZE - 20),
    );
    const err = await expectFileError(openSnapshot(file), 'QSNAP_FILE_VERSION', { versionMajor: 3 });
    expect(err.hint).toMatch(/newer qsnap/);
  });

  it('a newer minor version opens (compatible additions)', async () => {
    const file = copy();
    rewriteManifest(
      file,
      (m) => {
        m.futureField = { anything: true };
      },
      (t) => t.writeUInt16LE(7, TRAILER_SIZE - 18),
    );
    const r = await openSnapshot(file);
    expect(r.trailer.versionMinor).toBe(7);
    expect((r.manifest as Record<string, unknown>)['futureField']).toEqual({ anything: true });
    await r.verify();
    await r.close();
  });

  it('a newer version in the manifest → QSNAP_FILE_VERSION', async () => {
    const file = copy();
    rewriteManifest(file, (m) => {
      m.version = 3;
    });
    await expectFileError(openSnapshot(file), 'QSNAP_FILE_VERSION', { version: 3 });
  });
});

describe('manifest consistency (well-sealed but wrong manifests)', () => {
  const cases: [string, (m: Json) => void][] = [
    ['a block moved', (m) => (m.ram.blocks[1].fileOffset += PAGE)],
    ['a block resized', (m) => (m.ram.blocks[2].usedLength += PAGE)],
    ['page counts that do not add up', (m) => (m.ram.blocks[0].dataPages += 1)],
    ['the page table moved', (m) => (m.ram.pageTable.offset += 4)],
    ['the prologue length changed', (m) => (m.stream.prologue.length -= 1)],
    ['a missing required field', (m) => delete m.qemu.machine],
    ['a wrong type', (m) => (m.vm.ramBytes = '8M')],
    ['a relative disk path', (m) => (m.disks[0].frozenFile = 'disk0.qcow2')],
    ['another page size', (m) => (m.ram.pageSize = 65536)],
    ['another format name', (m) => (m.format = 'something-else')],
  ];
  for (const [name, mutate] of cases) {
    it(`${name} → manifest`, async () => {
      const file = copy();
      rewriteManifest(file, mutate);
      await expectFileError(openSnapshot(file), 'QSNAP_FILE_CORRUPT', { region: 'manifest' });
    });
  }
});
