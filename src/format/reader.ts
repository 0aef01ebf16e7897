/**
 * Opens a snapshot file: trailer and manifest are read and checked up front (O(1) in RAM size);
 * the page table, blobs and pages are read on demand, each against its checksum.
 */
import fs from 'node:fs';
import path from 'node:path';
import {
  decodePageTable,
  decodeTrailer,
  PAGE_SIZE,
  pageCrc,
  sha256Hex,
  TRAILER_MAX,
  type Trailer,
  ZERO_PAGE_CRC,
} from './codec.js';
import { type CorruptRegion, corrupt, ioError, notSnapshot, SnapshotFileError, usage } from './errors.js';
import { closeFd, prefetch, readExact } from './io.js';
import { checkRecordedLayout, type FileLayout, type Span } from './layout.js';
import { type Manifest, parseManifest } from './manifest.js';

/** A manifest larger than this is refused before it is read (qsnap writes a few KiB). */
const MANIFEST_MAX = 64 * 1024 * 1024;
const MiB = 1024 * 1024;
const ZERO_RUN = Buffer.alloc(8 * MiB);

export type PageRun =
  /** `data` holds pageCount × 4096 bytes; it is reused: valid until the iterator is resumed. */
  | { kind: 'data'; blockIndex: number; offset: number; pageCount: number; data: Buffer }
  /** Zero pages (holes): nothing to read. */
  | { kind: 'zero'; blockIndex: number; offset: number; pageCount: number };

export interface ReadPagesOptions {
  /**
   * Check each page against the page table before yielding it: true checks holes too (they
   * must read as zeros), 'data' only the data pages (holes are not read).
   */
  verify?: boolean | 'data';
  /** Largest data run yielded (default 8 MiB). */
  maxRunBytes?: number;
}

export interface VerifyProgress {
  region: CorruptRegion;
  bytesDone: number;
  bytesTotal: number;
}

export interface VerifyOptions {
  onProgress?: (p: VerifyProgress) => void;
  signal?: AbortSignal;
}

export interface VerifyResult {
  bytesVerified: number;
  dataPages: number;
  zeroPages: number;
  durationMs: number;
}

interface BadRegion {
  region: CorruptRegion;
  offset: number;
  what: string;
  details: Record<string, unknown>;
}

/** Opens and checks trailer + manifest. Throws QSNAP_FILE_NOT_SNAPSHOT / _TRUNCATED / _CORRUPT / _VERSION / _IO. */
export async function openSnapshot(file: string): Promise<SnapshotReader> {
  const abs = path.resolve(file);
  let fd: number;
  try {
    fd = await new Promise<number>((res, rej) => fs.open(abs, 'r', (e, n) => (e ? rej(e) : res(n))));
  } catch (err) {
    throw ioError('open', abs, err);
  }
  try {
    const head = await readHead(abs, fd);
    return new SnapshotReader(abs, fd, head);
  } catch (err) {
    await closeFd(fd).catch(() => {});
    throw err;
  }
}

interface Head {
  trailer: Trailer;
  manifest: Manifest;
  manifestSha256: string;
  layout: FileLayout;
}

async function readHead(file: string, fd: number): Promise<Head> {
  let st: fs.Stats;
  try {
    st = await fstat(fd);
  } catch (err) {
    throw ioError('inspect', file, err);
  }
  if (!st.isFile()) throw notSnapshot(file, 'not a regular file');
  const size = st.size;
  if (size === 0) throw notSnapshot(file, 'empty file');
  const tail = Buffer.alloc(Math.min(size, TRAILER_MAX));
  await readExact(file, fd, tail, size - tail.length);
  const t = decodeTrailer(tail);
  if (!t.ok) {
    switch (t.problem) {
      case 'no-magic':
        throw notSnapshot(file, 'no qsnap trailer at the end');
      case 'newer-version':
        throw new SnapshotFileError(
          'QSNAP_FILE_VERSION',
          `${file} uses snapshot format ${t.versionMajor}.${t.versionMinor}; this qsnap reads format 1`,
          {
            hint: 'open it with a newer qsnap',
            details: { file, versionMajor: t.versionMajor, versionMinor: t.versionMinor },
          },
        );
      case 'bad-crc':
        throw corrupt(file, 'trailer', 'trailer checksum mismatch', {
          offset: size - tail.length,
          stored: t.stored,
          computed: t.computed,
        });
      case 'bad-length':
        throw corrupt(file, 'trailer', `impossible trailer length ${t.trailerLength}`);
      case 'bad-version':
        throw corrupt(file, 'trailer', `impossible format version ${t.versionMajor}`);
    }
  }
  const trailer = t.trailer;
  if (trailer.fileLength !== size) {
    throw new SnapshotFileError(
      'QSNAP_FILE_TRUNCATED',
      `${file} is ${size} bytes but its trailer records ${trailer.fileLength}: bytes were cut out or the file is truncated`,
      {
        hint: 'copy the snapshot again from its source',
        details: { file, expectedBytes: trailer.fileLength, actualBytes: size },
      },
    );
  }
  const manifestSpan = { offset: trailer.manifestOffset, length: trailer.manifestLength };
  if (
    manifestSpan.length > MANIFEST_MAX ||
    manifestSpan.offset + manifestSpan.length !== size - trailer.trailerLength
  ) {
    throw corrupt(file, 'trailer', 'the manifest does not end where the trailer starts', manifestSpan);
  }
  const bytes = Buffer.alloc(manifestSpan.length);
  await readExact(file, fd, bytes, manifestSpan.offset);
  const manifestSha256 = sha256Hex(bytes);
  if (manifestSha256 !== trailer.manifestSha256) {
    throw corrupt(file, 'manifest', 'manifest checksum mismatch', {
      offset: manifestSpan.offset,
      length: manifestSpan.length,
    });
  }
  const m = parseManifest(bytes);
  if (!m.ok) {
    if (m.problem === 'newer-version') {
      throw new SnapshotFileError(
        'QSNAP_FILE_VERSION',
        `${file} has a manifest of format version ${m.version}; this qsnap reads 1`,
        {
          hint: 'open it with a newer qsnap',
          details: { file, version: m.version },
        },
      );
    }
    throw corrupt(
      file,
      'manifest',
      `invalid manifest: ${m.message}`,
      m.problem === 'invalid' ? { issues: m.issues } : {},
    );
  }
  if (m.manifest.version !== trailer.versionMajor) {
    throw corrupt(
      file,
      'manifest',
      `manifest version ${m.manifest.version} differs from trailer version ${trailer.versionMajor}`,
    );
  }
  const checked = checkRecordedLayout(m.manifest, manifestSpan, size);
  if (!checked.ok) throw corrupt(file, 'manifest', `inconsistent layout: ${checked.problem}`);
  return { trailer, manifest: m.manifest, manifestSha256, layout: checked.layout };
}

export class SnapshotReader {
  readonly path: string;
  readonly manifest: Manifest;
  readonly trailer: Trailer;
  readonly layout: FileLayout;
  #fd: number;
  #pageTable: Promise<Uint32Array> | undefined;
  readonly #manifestSha256: string;
  readonly #zeroCrcCache = new Map<number, Set<number>>();

  /** @internal use openSnapshot() */
  constructor(file: string, fd: number, head: Head) {
    this.path = file;
    this.#fd = fd;
    this.manifest = head.manifest;
    this.trailer = head.trailer;
    this.layout = head.layout;
    this.#manifestSha256 = head.manifestSha256;
  }

  get fileLength(): number {
    return this.layout.fileLength;
  }

  /** Stream header + configuration + RAM START section, sha256-checked. */
  readPrologue(): Promise<Buffer> {
    return this.#readRegion('prologue', this.manifest.stream.prologue);
  }

  /** Device state sections + EOF + VMDESCRIPTION, sha256-checked. */
  readDeviceTail(): Promise<Buffer> {
    return this.#readRegion('device-tail', this.manifest.stream.deviceTail);
  }

  /**
   * CRC-32 of every page of a block (the whole table is read and sha256-checked once, then
   * cached). The array is a view into the cache: do not modify it.
   */
  async readPageTable(blockIndex: number): Promise<Uint32Array> {
    const b = this.#block(blockIndex);
    if (!this.#pageTable) {
      const loading = this.#loadPageTable();
      this.#pageTable = loading;
      // A failed load is not cached: the next call reads again.
      loading.catch(() => {
        if (this.#pageTable === loading) this.#pageTable = undefined;
      });
    }
    return (await this.#pageTable).subarray(b.firstPage, b.firstPage + b.pageCount);
  }

  /** True if the page table marks page `pageIndex` of the block as a zero page (a hole). */
  isZeroPage(blockIndex: number, pageIndex: number, table: Uint32Array): boolean {
    return table[pageIndex] === ZERO_PAGE_CRC && !this.#zeroCrcDataPages(blockIndex).has(pageIndex);
  }

  /**
   * Yields the block's pages in order as runs: data runs read with large reads (prefetching the
   * next run), zero runs without reading. With verify, each page is checked before it is yielded
   * and QSNAP_FILE_CORRUPT is thrown at the first bad one.
   */
  async *readPages(blockIndex: number, opts: ReadPagesOptions = {}): AsyncGenerator<PageRun> {
    const b = this.#block(blockIndex);
    const table = await this.readPageTable(blockIndex);
    const verify = opts.verify ?? false;
    // 'data' checks data pages only: a hole is sent as a zero page whatever the file holds there.
    const verifyHoles = verify === true;
    const maxPages = Math.max(1, Math.floor((opts.maxRunBytes ?? 8 * MiB) / PAGE_SIZE));
    const zeroAt = (i: number): boolean => this.isZeroPage(blockIndex, i, table);
    function* runs(): Generator<Span & { zero: boolean; first: number; count: number }> {
      let i = 0;
      while (i < b.pageCount) {
        const zero = zeroAt(i);
        let j = i + 1;
        while (j < b.pageCount && zeroAt(j) === zero && ((zero && !verifyHoles) || j - i < maxPages)) j++;
        const read = !zero || verifyHoles;
        yield {
          zero,
          first: i,
          count: j - i,
          offset: b.fileOffset + i * PAGE_SIZE,
          length: read ? (j - i) * PAGE_SIZE : 0,
        };
        i = j;
      }
    }
    for await (const { item, data } of prefetch(this.path, this.#open(), runs(), maxPages * PAGE_SIZE, 2)) {
      const offset = item.first * PAGE_SIZE;
      if (verify !== false && (!item.zero || verifyHoles)) {
        const bad = checkPages(data, table, item.first, item.count, zeroAt);
        if (bad.length > 0) {
          const pageIndex = item.first + bad[0]!;
          throw corrupt(
            this.path,
            'ram',
            `page ${pageIndex} of block "${b.name}" does not match its checksum`,
            {
              block: b.name,
              blockIndex,
              pageIndex,
              fileOffset: b.fileOffset + pageIndex * PAGE_SIZE,
            },
          );
        }
      }
      if (item.zero) yield { kind: 'zero', blockIndex, offset, pageCount: item.count };
      else yield { kind: 'data', blockIndex, offset, pageCount: item.count, data };
    }
  }

  /**
   * Checks every byte of the file: trailer and manifest again, page table, prologue, device tail
   * and every RAM page (data pages by CRC, holes by content). Throws QSNAP_FILE_CORRUPT for the
   * first bad region in file order; details carry `badRegions` and `badPages`.
   */
  async verify(opts: VerifyOptions = {}): Promise<VerifyResult> {
    const started = performance.now();
    const fd = this.#open();
    const L = this.layout;
    const bad: BadRegion[] = [];
    const bytesTotal = L.fileLength;
    let bytesDone = 0;
    const progress = (region: CorruptRegion, n: number): void => {
      bytesDone += n;
      opts.onProgress?.({ region, bytesDone, bytesTotal });
    };
    const checkRegion = async (
      region: CorruptRegion,
      span: Span,
      sha256: string,
    ): Promise<Buffer | undefined> => {
      opts.signal?.throwIfAborted();
      const bytes = Buffer.alloc(span.length);
      await readExact(this.path, fd, bytes, span.offset);
      progress(region, span.length);
      if (sha256Hex(bytes) === sha256) return bytes;
      bad.push({
        region,
        offset: span.offset,
        what: `${region} checksum mismatch`,
        details: { offset: span.offset, length: span.length },
      });
      return undefined;
    };

    // Trailer and manifest may have changed since open.
    const tail = Buffer.alloc(L.trailer.length);
    await readExact(this.path, fd, tail, L.trailer.offset);
    progress('trailer', tail.length);
    const t = decodeTrailer(tail);
    if (
      !t.ok ||
      t.trailer.manifestSha256 !== this.trailer.manifestSha256 ||
      t.trailer.fileLength !== L.fileLength
    ) {
      bad.push({
        region: 'trailer',
        offset: L.trailer.offset,
        what: 'trailer changed or damaged',
        details: {},
      });
    }
    await checkRegion('manifest', L.manifest, this.#manifestSha256);
    const tableBytes = await checkRegion('page-table', L.pageTable, this.manifest.ram.pageTable.sha256);
    await checkRegion('prologue', L.prologue, this.manifest.stream.prologue.sha256);
    await checkRegion('device-tail', L.deviceTail, this.manifest.stream.deviceTail.sha256);

    let dataPages = 0;
    let zeroPages = 0;
    if (tableBytes) {
      const table = decodePageTable(tableBytes);
      const ram = await this.#verifyRam(fd, table, opts, (n) => progress('ram', n));
      dataPages = ram.dataPages;
      zeroPages = ram.zeroPages;
      if (ram.first) bad.push(ram.first);
    } else {
      progress('ram', L.ramEnd);
    }

    if (bad.length > 0) {
      bad.sort((a, b) => a.offset - b.offset);
      const first = bad[0]!;
      const badPages = bad.find((r) => r.region === 'ram')?.details['badPages'] ?? 0;
      throw corrupt(this.path, first.region, first.what, {
        ...first.details,
        badRegions: bad.map((r) => r.region),
        badPages,
        ramChecked: tableBytes !== undefined,
      });
    }
    return { bytesVerified: bytesDone, dataPages, zeroPages, durationMs: performance.now() - started };
  }

  async close(): Promise<void> {
    if (this.#fd < 0) return;
    const fd = this.#fd;
    this.#fd = -1;
    await closeFd(fd).catch(() => {});
  }

  async #verifyRam(
    fd: number,
    table: Uint32Array,
    opts: VerifyOptions,
    progress: (n: number) => void,
  ): Promise<{ dataPages: number; zeroPages: number; first?: BadRegion }> {
    const chunkPages = (8 * MiB) / PAGE_SIZE;
    const L = this.layout;
    function* chunks(): Generator<Span & { blockIndex: number; first: number; count: number }> {
      for (const [blockIndex, b] of L.blocks.entries()) {
        for (let first = 0; first < b.pageCount; first += chunkPages) {
          const count = Math.min(chunkPages, b.pageCount - first);
          yield {
            blockIndex,
            first,
            count,
            offset: b.fileOffset + first * PAGE_SIZE,
            length: count * PAGE_SIZE,
          };
        }
      }
    }
    let dataPages = 0;
    let zeroPages = 0;
    let badPages = 0;
    const badPagesByBlock: Record<string, number> = {};
    let first: BadRegion | undefined;
    for await (const { item, data } of prefetch(this.path, fd, chunks(), chunkPages * PAGE_SIZE, 3)) {
      opts.signal?.throwIfAborted();
      const b = L.blocks[item.blockIndex]!;
      const blockTable = table.subarray(b.firstPage, b.firstPage + b.pageCount);
      const zeroAt = (i: number): boolean => this.isZeroPage(item.blockIndex, i, blockTable);
      const bad = checkPages(data, blockTable, item.first, item.count, zeroAt, (zero, n) => {
        if (zero) zeroPages += n;
        else dataPages += n;
      });
      if (bad.length > 0) {
        badPages += bad.length;
        badPagesByBlock[b.name] = (badPagesByBlock[b.name] ?? 0) + bad.length;
        if (!first) {
          const pageIndex = item.first + bad[0]!;
          const fileOffset = b.fileOffset + pageIndex * PAGE_SIZE;
          first = {
            region: 'ram',
            offset: fileOffset,
            what: `page ${pageIndex} of block "${b.name}" does not match its checksum`,
            details: { block: b.name, blockIndex: item.blockIndex, pageIndex, fileOffset },
          };
        }
      }
      progress(data.length);
    }
    if (first) first.details = { ...first.details, badPages, badPagesByBlock };
    return { dataPages, zeroPages, ...(first ? { first } : {}) };
  }

  async #loadPageTable(): Promise<Uint32Array> {
    const span = this.layout.pageTable;
    const bytes = Buffer.alloc(span.length);
    await readExact(this.path, this.#open(), bytes, span.offset);
    if (sha256Hex(bytes) !== this.manifest.ram.pageTable.sha256) {
      throw corrupt(this.path, 'page-table', 'page table checksum mismatch', {
        offset: span.offset,
        length: span.length,
      });
    }
    return decodePageTable(bytes);
  }

  async #readRegion(
    region: CorruptRegion,
    r: { offset: number; length: number; sha256: string },
  ): Promise<Buffer> {
    const bytes = Buffer.alloc(r.length);
    await readExact(this.path, this.#open(), bytes, r.offset);
    if (sha256Hex(bytes) !== r.sha256) {
      throw corrupt(this.path, region, `${region} checksum mismatch`, { offset: r.offset, length: r.length });
    }
    return bytes;
  }

  #zeroCrcDataPages(blockIndex: number): Set<number> {
    let s = this.#zeroCrcCache.get(blockIndex);
    if (!s) {
      s = new Set(this.manifest.ram.blocks[blockIndex]?.zeroCrcDataPages ?? []);
      this.#zeroCrcCache.set(blockIndex, s);
    }
    return s;
  }

  #block(blockIndex: number) {
    const b = this.layout.blocks[blockIndex];
    if (!b) throw usage(`no RAM block ${blockIndex} in ${this.path}`, { blockIndex });
    return b;
  }

  #open(): number {
    if (this.#fd < 0) throw usage(`snapshot ${this.path} is closed`);
    return this.#fd;
  }
}

/**
 * Checks `count` pages in `data` (page `first` onwards of a block) against the block's table:
 * zero pages by content (one memcmp per run), data pages by CRC. Returns bad page positions
 * relative to `first`.
 */
function checkPages(
  data: Buffer,
  table: Uint32Array,
  first: number,
  count: number,
  zeroAt: (pageIndex: number) => boolean,
  tally?: (zero: boolean, n: number) => void,
): number[] {
  const bad: number[] = [];
  let k = 0;
  while (k < count) {
    if (zeroAt(first + k)) {
      let e = k + 1;
      while (e < count && zeroAt(first + e)) e++;
      tally?.(true, e - k);
      const run = data.subarray(k * PAGE_SIZE, e * PAGE_SIZE);
      if (!run.equals(ZERO_RUN.subarray(0, run.length))) {
        for (let p = k; p < e; p++) {
          const page = data.subarray(p * PAGE_SIZE, (p + 1) * PAGE_SIZE);
          if (!page.equals(ZERO_RUN.subarray(0, PAGE_SIZE))) bad.push(p);
        }
      }
      k = e;
    } else {
      tally?.(false, 1);
      if (pageCrc(data.subarray(k * PAGE_SIZE, (k + 1) * PAGE_SIZE)) !== table[first + k]) bad.push(k);
      k++;
    }
  }
  return bad;
}

function fstat(fd: number): Promise<fs.Stats> {
  return new Promise((res, rej) => fs.fstat(fd, (e, st) => (e ? rej(e) : res(st))));
}
