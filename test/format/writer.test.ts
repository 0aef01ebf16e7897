/** The writer's life cycle: publishing, refusing to overwrite, aborting, misuse, backpressure. */
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { pwriteAll } from '../../src/format/io.js';
import { openSnapshot } from '../../src/format/reader.js';
import { planWrites, SnapshotWriter } from '../../src/format/writer.js';
import {
  DEVICE_TAIL,
  expectFileError,
  MiB,
  PAGE,
  PROLOGUE,
  pageData,
  rng,
  sampleInfo,
  tempDir,
  verifyFile,
  writeSample,
} from './helpers.js';

const root = tempDir();
afterAll(() => fs.rmSync(root, { recursive: true, force: true }));

let dirs = 0;
const freshDir = () => fs.mkdtempSync(path.join(root, `d${dirs++}-`));
const finishOpts = () => ({ prologue: PROLOGUE, deviceTail: DEVICE_TAIL, info: sampleInfo() });
const small = [{ name: 'pc.ram', usedLength: 64 * PAGE }];

function fill(w: SnapshotWriter, pages = 64): void {
  for (let p = 0; p < pages; p++) w.writePage(0, p * PAGE, pageData(0, p));
}

describe('publishing', () => {
  it('writes under a hidden temporary name that is not a snapshot, then renames it into place', async () => {
    const dir = freshDir();
    const file = path.join(dir, 'vm.qsnap');
    const w = await SnapshotWriter.create(file, { blocks: small });
    expect(path.dirname(w.tempPath)).toBe(dir);
    expect(path.basename(w.tempPath)).toMatch(/^\.vm\.qsnap\.qsnap-partial-[0-9a-f]{12}$/);
    fill(w);
    expect(fs.readdirSync(dir)).toEqual([path.basename(w.tempPath)]);
    await expectFileError(openSnapshot(w.tempPath), 'QSNAP_FILE_NOT_SNAPSHOT');
    await w.finish(finishOpts());
    expect(fs.readdirSync(dir)).toEqual(['vm.qsnap']);
    expect(w.state).toBe('finished');
    expect(fs.statSync(file).mode & 0o777).toBe(0o600);
    await verifyFile(file);
  });

  it('refuses an existing final path at create, and leaves it untouched', async () => {
    const dir = freshDir();
    const file = path.join(dir, 'vm.qsnap');
    fs.writeFileSync(file, 'precious');
    await expectFileError(SnapshotWriter.create(file, { blocks: small }), 'QSNAP_FILE_EXISTS', { file });
    expect(fs.readFileSync(file, 'utf8')).toBe('precious');
    expect(fs.readdirSync(dir)).toEqual(['vm.qsnap']);
  });

  it('refuses a final path created while the snapshot was being written', async () => {
    const dir = freshDir();
    const file = path.join(dir, 'vm.qsnap');
    const w = await SnapshotWriter.create(file, { blocks: small });
    fill(w);
    fs.writeFileSync(file, 'created meanwhile');
    await expectFileError(w.finish(finishOpts()), 'QSNAP_FILE_EXISTS');
    expect(fs.readFileSync(file, 'utf8')).toBe('created meanwhile');
    expect(fs.readdirSync(dir)).toEqual(['vm.qsnap']);
  });

  it('replaces an existing file with overwrite: true', async () => {
    const dir = freshDir();
    const file = path.join(dir, 'vm.qsnap');
    fs.writeFileSync(file, 'old');
    const w = await SnapshotWriter.create(file, { blocks: small, overwrite: true });
    fill(w);
    await w.finish(finishOpts());
    await verifyFile(file);
    expect(fs.readdirSync(dir)).toEqual(['vm.qsnap']);
  });

  it('honours mode', async () => {
    const dir = freshDir();
    const w = await SnapshotWriter.create(path.join(dir, 'vm.qsnap'), { blocks: small, mode: 0o640 });
    fill(w);
    await w.finish(finishOpts());
    expect(fs.statSync(path.join(dir, 'vm.qsnap')).mode & 0o777).toBe(0o640);
  });
});

describe('abort', () => {
  it('removes the temporary file; nothing exists at the final path; idempotent', async () => {
    const dir = freshDir();
    const file = path.join(dir, 'vm.qsnap');
    const { writer } = await writeSample(file);
    expect(fs.readdirSync(dir)).toHaveLength(1);
    await writer.abort(new Error('stream ended'));
    expect(fs.readdirSync(dir)).toEqual([]);
    expect(writer.state).toBe('aborted');
    await writer.abort();
    await expectFileError(() => writer.writePage(0, 0, pageData(0, 0)), 'QSNAP_FILE_USAGE');
    await expectFileError(writer.finish(finishOpts()), 'QSNAP_FILE_USAGE');
  });

  it('with writes in flight, waits for them before removing the file', async () => {
    const dir = freshDir();
    const w = await SnapshotWriter.create(path.join(dir, 'vm.qsnap'), {
      blocks: [{ name: 'pc.ram', usedLength: 32 * MiB }],
      chunkBytes: 256 * 1024,
      bufferBytes: 64 * MiB,
    });
    for (let p = 0; p < 4096; p++) w.writePage(0, p * PAGE, pageData(0, p));
    expect(w.bufferedBytes).toBeGreaterThan(0);
    await w.abort();
    expect(fs.readdirSync(dir)).toEqual([]);
  });

  it('after finish, abort is a no-op and the snapshot stays', async () => {
    const dir = freshDir();
    const file = path.join(dir, 'vm.qsnap');
    const w = await SnapshotWriter.create(file, { blocks: small });
    fill(w);
    await w.finish(finishOpts());
    await w.abort();
    expect(fs.existsSync(file)).toBe(true);
  });

  it('a failed finish (invalid information) leaves nothing behind', async () => {
    const dir = freshDir();
    const w = await SnapshotWriter.create(path.join(dir, 'vm.qsnap'), { blocks: small });
    fill(w);
    const info = sampleInfo({ disks: [{ ...sampleInfo().disks![0]!, overlayFile: 'relative.qcow2' }] });
    const err = await expectFileError(w.finish({ ...finishOpts(), info }), 'QSNAP_FILE_USAGE');
    expect(err.message).toMatch(/disks\.0\.overlayFile/);
    expect(fs.readdirSync(dir)).toEqual([]);
  });
});

describe('misuse', () => {
  it('refuses pages outside the blocks, unaligned, or of the wrong size', async () => {
    const dir = freshDir();
    const w = await SnapshotWriter.create(path.join(dir, 'vm.qsnap'), {
      blocks: [
        { name: 'pc.ram', usedLength: 4 * PAGE },
        { name: 'odd', usedLength: 5000 },
      ],
    });
    const page = pageData(0, 0);
    await expectFileError(() => w.writePage(2, 0, page), 'QSNAP_FILE_USAGE', { blockIndex: 2 });
    await expectFileError(() => w.writePage(-1, 0, page), 'QSNAP_FILE_USAGE');
    await expectFileError(() => w.writePage(0, 4 * PAGE, page), 'QSNAP_FILE_USAGE', { block: 'pc.ram' });
    await expectFileError(() => w.writePage(0, 100, page), 'QSNAP_FILE_USAGE');
    await expectFileError(() => w.writeZeroPage(1, 2 * PAGE), 'QSNAP_FILE_USAGE', { block: 'odd' });
    await expectFileError(() => w.writePage(0, 0, page.subarray(0, 100)), 'QSNAP_FILE_USAGE');
    // Positive controls: the last page of each block is accepted.
    w.writePage(0, 3 * PAGE, page);
    w.writeZeroPage(1, PAGE);
    expect(w.counts).toMatchObject({ dataPages: 1, zeroPages: 1 });
    await w.abort();
  });

  it('refuses an invalid block list', async () => {
    const dir = freshDir();
    await expectFileError(SnapshotWriter.create(path.join(dir, 'x'), { blocks: [] }), 'QSNAP_FILE_USAGE');
    expect(fs.readdirSync(dir)).toEqual([]);
  });

  it('treats an all-zero data page as a zero page (a hole)', async () => {
    const dir = freshDir();
    const w = await SnapshotWriter.create(path.join(dir, 'vm.qsnap'), { blocks: small });
    w.writePage(0, 0, Buffer.alloc(PAGE));
    expect(w.counts).toMatchObject({ dataPages: 0, zeroPages: 1, missingPages: 63 });
    await w.abort();
  });
});

describe('backpressure', () => {
  it('asks to drain at the buffer cap and resumes once chunks are written', async () => {
    const dir = freshDir();
    const w = await SnapshotWriter.create(path.join(dir, 'vm.qsnap'), {
      blocks: [{ name: 'pc.ram', usedLength: 16 * MiB }],
      chunkBytes: 256 * 1024,
      bufferBytes: 1 * MiB,
    });
    let maxBuffered = 0;
    let drains = 0;
    for (let p = 0; p < 4096; p++) {
      w.writePage(0, p * PAGE, pageData(0, p));
      maxBuffered = Math.max(maxBuffered, w.bufferedBytes);
      if (w.needsDrain) {
        drains++;
        await w.onceDrained();
        expect(w.needsDrain).toBe(false);
      }
    }
    expect(drains).toBeGreaterThan(0);
    expect(maxBuffered).toBeLessThanOrEqual(1 * MiB);
    await w.finish(finishOpts());
  });

  it('negative control: a caller that ignores needsDrain hits the hard limit', async () => {
    const dir = freshDir();
    const w = await SnapshotWriter.create(path.join(dir, 'vm.qsnap'), {
      blocks: [{ name: 'pc.ram', usedLength: 64 * MiB }],
      chunkBytes: 64 * 1024,
      bufferBytes: 256 * 1024,
    });
    const err = await expectFileError(() => {
      for (let p = 0; p < 16384; p++) w.writePage(0, p * PAGE, pageData(0, p));
    }, 'QSNAP_FILE_USAGE');
    expect(err.message).toMatch(/backpressure/);
    await w.abort();
    expect(fs.readdirSync(dir)).toEqual([]);
  });
});

describe('planWrites (grouping a staged chunk into positioned writes)', () => {
  it('a linear chunk is one write of the whole chunk', () => {
    expect(planWrites([100, 101, 102, 103], 4, 8)).toEqual([{ filePage: 100, slots: [[0, 4]] }]);
  });

  it('scattered pages become one run per contiguous file range, slots in file order', () => {
    // slot:        0   1   2  3  4   5
    const pages = [50, 10, 11, 3, 51, 12];
    expect(planWrites(pages, 6, 8)).toEqual([
      { filePage: 3, slots: [[3, 4]] },
      {
        filePage: 10,
        slots: [
          [1, 3],
          [5, 6],
        ],
      },
      {
        filePage: 50,
        slots: [
          [0, 1],
          [4, 5],
        ],
      },
    ]);
  });

  it('pages arriving in reverse order form one run of single-slot ranges', () => {
    expect(planWrites([7, 6, 5], 3, 4)).toEqual([
      {
        filePage: 5,
        slots: [
          [2, 3],
          [1, 2],
          [0, 1],
        ],
      },
    ]);
  });

  it('only the first `count` slots count; an empty chunk plans nothing', () => {
    expect(planWrites([1, 9, 2], 1, 4)).toEqual([{ filePage: 1, slots: [[0, 1]] }]);
    expect(planWrites([], 0, 4)).toEqual([]);
  });

  it('handles file pages beyond 2^32 (RAM over 16 TiB)', () => {
    const big = 2 ** 33;
    expect(planWrites([big + 1, big], 2, 1024)).toEqual([
      {
        filePage: big,
        slots: [
          [1, 2],
          [0, 1],
        ],
      },
    ]);
  });
});

describe('pages delivered more than once', () => {
  it('the last record wins even when the earlier write is slower (write barriers)', async () => {
    const dir = freshDir();
    const file = path.join(dir, 'vm.qsnap');
    // The first write at each position is slow: an unordered writer would let the newer copy of
    // a page land first and the older one overwrite it.
    const seen = new Set<number>();
    const w = await SnapshotWriter.create(file, {
      blocks: [{ name: 'pc.ram', usedLength: 8 * PAGE }],
      chunkBytes: PAGE,
      maxConcurrentWrites: 16, // room for every write at once
      pwrite: async (fd, iov, position) => {
        const first = !seen.has(position);
        seen.add(position);
        if (first) await new Promise((r) => setTimeout(r, 30));
        await pwriteAll(fd, iov, position);
      },
    });
    for (let p = 0; p < 8; p++) w.writePage(0, p * PAGE, pageData(0, p, 1));
    for (let p = 0; p < 8; p++) {
      if (p % 2 === 0)
        w.writeZeroPage(0, p * PAGE); // data → zero: zeros are written over it
      else w.writePage(0, p * PAGE, pageData(0, p, 2)); // data → data
    }
    expect(w.counts).toMatchObject({ duplicatePages: 8, dataPages: 4, zeroPages: 4 });
    await w.finish(finishOpts());
    const bytes = fs.readFileSync(file);
    for (let p = 0; p < 8; p++) {
      const want = p % 2 === 0 ? Buffer.alloc(PAGE) : pageData(0, p, 2);
      expect(bytes.subarray(p * PAGE, (p + 1) * PAGE).equals(want), `page ${p}`).toBe(true);
    }
    await verifyFile(file);
  });

  it('a burst of pages sent again stays within the buffer: rewrites of staged pages add no chunks', async () => {
    // Pre-copy: a pass resends pages the guest dirtied, zero pages among them (9 bytes each in the
    // stream, so one socket read can carry thousands). Each used to seal a chunk of its own and
    // hit the hard limit before the caller could drain (found by a live-precopy snapshot).
    const dir = freshDir();
    const w = await SnapshotWriter.create(path.join(dir, 'vm.qsnap'), {
      blocks: [{ name: 'pc.ram', usedLength: 256 * PAGE }],
      chunkBytes: 64 * 1024,
      bufferBytes: 256 * 1024,
    });
    for (let p = 0; p < 8; p++) w.writePage(0, p * PAGE, pageData(0, p, 1));
    const buffered = w.bufferedBytes;
    for (let round = 2; round < 50; round++) {
      for (let p = 0; p < 8; p++) {
        if ((p + round) % 3 === 0) w.writeZeroPage(0, p * PAGE);
        else w.writePage(0, p * PAGE, pageData(0, p, round));
      }
    }
    expect(w.bufferedBytes, 'rewritten in place').toBe(buffered);
    for (let p = 8; p < 256; p++) w.writeZeroPage(0, p * PAGE);
    await w.finish(finishOpts());
    const bytes = fs.readFileSync(path.join(dir, 'vm.qsnap'));
    for (let p = 0; p < 8; p++) {
      const want = (p + 49) % 3 === 0 ? Buffer.alloc(PAGE) : pageData(0, p, 49);
      expect(bytes.subarray(p * PAGE, (p + 1) * PAGE).equals(want), `page ${p}`).toBe(true);
    }
    expect(w.counts).toMatchObject({ duplicatePages: 8 * 48 });
    await verifyFile(path.join(dir, 'vm.qsnap'));
  });

  it('random resends against writes of random speed: the last record of every page wins', async () => {
    const dir = freshDir();
    const file = path.join(dir, 'vm.qsnap');
    const random = rng(7);
    const pages = 512;
    const w = await SnapshotWriter.create(file, {
      blocks: [{ name: 'pc.ram', usedLength: pages * PAGE }],
      chunkBytes: 16 * PAGE,
      bufferBytes: 64 * PAGE,
      pwrite: async (fd, iov, position) => {
        await new Promise((r) => setTimeout(r, Math.floor(random() * 4)));
        await pwriteAll(fd, iov, position);
      },
    });
    const last = new Map<number, number>(); // page → version (0: zero)
    for (let i = 0; i < 6000; i++) {
      // Mostly nearby pages (a copy of it is likely still staged or being written), some anywhere.
      const p = random() < 0.8 ? (i + Math.floor(random() * 40)) % pages : Math.floor(random() * pages);
      const version = random() < 0.2 ? 0 : i + 1;
      if (version === 0) w.writeZeroPage(0, p * PAGE);
      else w.writePage(0, p * PAGE, pageData(0, p, version));
      last.set(p, version);
      if (w.needsDrain) await w.onceDrained();
    }
    for (let p = 0; p < pages; p++) if (!last.has(p)) w.writeZeroPage(0, p * PAGE);
    await w.finish(finishOpts());
    const bytes = fs.readFileSync(file);
    for (let p = 0; p < pages; p++) {
      const version = last.get(p) ?? 0;
      const want = version === 0 ? Buffer.alloc(PAGE) : pageData(0, p, version);
      expect(bytes.subarray(p * PAGE, (p + 1) * PAGE).equals(want), `page ${p}`).toBe(true);
    }
    await verifyFile(file);
  });
});
