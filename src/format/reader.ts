/**
 * Opens a snapshot file: trailer and manifest are read and checked up front (O(1) in RAM size);
 * the page table, blobs and pages are read on demand, each against its checksum.
 */
import fs from 'node:fs';
import path from 'node:path';
import {
  combinedPageCrc,
  decodePageTable,
  decodeTrailer,
  FORMAT_VERSION_MAJOR,
  PAGE_SIZE,
  pageCrc,
  sha256Hex,
  TRAILER_MAX,
  type Trailer,
  type TrailerDecode,
  ZERO_PAGE_CRC,
} from './codec.js';
import { type CorruptRegion, corrupt, ioError, notSnapshot, SnapshotFileError, usage } from './errors.js';
import { closeFd, prefetch, readExact } from './io.js';
import { type BlockLayout, checkRecordedLayout, type FileLayout, type Span } from './layout.js';
import { type Manifest, type ManifestParse, parseManifest } from './manifest.js';

/** A manifest larger than this is refused before it is read (qsnap writes a few KiB). */
const MANIFEST_MAX = 64 * 1024 * 1024;
/**
 * The largest stream prologue and device tail a file may claim: what qsnap's stream parser
 * accepts (src/stream/parser.ts: 64 KiB header + 1 MiB RAM START; 256 MiB of device state).
 * Both are read whole into memory, so a claim past these is refused before anything is allocated.
 */
const PROLOGUE_MAX = 64 * 1024 + 1024 * 1024;
const DEVICE_TAIL_MAX = 256 * 1024 * 1024;
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

interface RamCheck {
  dataPages: number;
  zeroPages: number;
  first?: BadRegion;
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
  const size = await regularFileSize(file, fd);
  const trailer = await readTrailer(file, fd, size);
  const manifestSpan = manifestSpanBeforeTrailer(file, trailer, size);
  const { manifest, manifestSha256 } = await readManifest(file, fd, trailer, manifestSpan);
  const { prologue, deviceTail } = manifest.stream;
  if (prologue.length > PROLOGUE_MAX || deviceTail.length > DEVICE_TAIL_MAX) {
    throw corrupt(
      file,
      'manifest',
      `a stream prologue of ${prologue.length} bytes or a device tail of ${deviceTail.length} bytes is more than qsnap writes`,
      { prologueBytes: prologue.length, deviceTailBytes: deviceTail.length },
    );
  }
  const checked = checkRecordedLayout(manifest, manifestSpan, size);
  if (!checked.ok) throw corrupt(file, 'manifest', `inconsistent layout: ${checked.problem}`);
  return { trailer, manifest, manifestSha256, layout: checked.layout };
}

/** The size of `fd`, which must be a regular file with something in it. */
async function regularFileSize(file: string, fd: number): Promise<number> {
  let st: fs.Stats;
  try {
    st = await fstat(fd);
  } catch (err) {
    throw ioError('inspect', file, err);
  }
  if (!st.isFile()) throw notSnapshot(file, 'not a regular file');
  if (st.size === 0) throw notSnapshot(file, 'empty file');
  return st.size;
}

/** The trailer at the end of the file, intact and recording the file's actual length. */
async function readTrailer(file: string, fd: number, size: number): Promise<Trailer> {
  const tail = Buffer.alloc(Math.min(size, TRAILER_MAX));
  await readExact(file, fd, tail, size - tail.length);
  const t = decodeTrailer(tail);
  if (!t.ok) throw trailerError(file, t, size - tail.length);
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
  return trailer;
}

function trailerError(
  file: string,
  t: Exclude<TrailerDecode, { ok: true }>,
  tailOffset: number,
): SnapshotFileError {
  switch (t.problem) {
    case 'no-magic':
      return notSnapshot(file, 'no qsnap trailer at the end');
    case 'newer-version':
      return new SnapshotFileError(
        'QSNAP_FILE_VERSION',
        `${file} uses snapshot format ${t.versionMajor}.${t.versionMinor}; this qsnap reads formats 1 and ${FORMAT_VERSION_MAJOR}`,
        {
          hint: 'open it with a newer qsnap',
          details: { file, versionMajor: t.versionMajor, versionMinor: t.versionMinor },
        },
      );
    case 'bad-crc':
      return corrupt(file, 'trailer', 'trailer checksum mismatch', {
        offset: tailOffset,
        stored: t.stored,
        computed: t.computed,
      });
    case 'bad-length':
      return corrupt(file, 'trailer', `impossible trailer length ${t.trailerLength}`);
    case 'bad-version':
      return corrupt(file, 'trailer', `impossible format version ${t.versionMajor}`);
  }
}

/** Where the trailer says the manifest is: of a sane size, and ending where the trailer starts. */
function manifestSpanBeforeTrailer(file: string, trailer: Trailer, size: number): Span {
  const manifestSpan = { offset: trailer.manifestOffset, length: trailer.manifestLength };
  if (
    manifestSpan.length > MANIFEST_MAX ||
    manifestSpan.offset + manifestSpan.length !== size - trailer.trailerLength
  ) {
    throw corrupt(file, 'trailer', 'the manifest does not end where the trailer starts', manifestSpan);
  }
  return manifestSpan;
}

/** The manifest, checked against the trailer's sha256 and version. */
async function readManifest(
  file: string,
  fd: number,
  trailer: Trailer,
  manifestSpan: Span,
): Promise<{ manifest: Manifest; manifestSha256: string }> {
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
  if (!m.ok) throw manifestError(file, m);
  if (m.manifest.version !== trailer.versionMajor) {
    throw corrupt(
      file,
      'manifest',
      `manifest version ${m.manifest.version} differs from trailer version ${trailer.versionMajor}`,
    );
  }
  return { manifest: m.manifest, manifestSha256 };
}

function manifestError(file: string, m: Exclude<ManifestParse, { ok: true }>): SnapshotFileError {
  if (m.problem === 'newer-version') {
    return new SnapshotFileError(
      'QSNAP_FILE_VERSION',
      `${file} has a manifest of format version ${m.version}; this qsnap reads 1 and ${FORMAT_VERSION_MAJOR}`,
      {
        hint: 'open it with a newer qsnap',
        details: { file, version: m.version },
      },
    );
  }
  return corrupt(
    file,
    'manifest',
    `invalid manifest: ${m.message}`,
    m.problem === 'invalid' ? { issues: m.issues } : {},
  );
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
   * The file's mapped-ram view (format 2): where QEMU ≥ 9.0 starts reading the file as a
   * migration stream with the mapped-ram capability (`file:<path>,offset=<streamOffset>`). Every
   * byte QEMU reads there besides the RAM pages is checked here: the link pages, the glue, the
   * bitmaps and the prefix. Undefined for a v1 file, or one written without the view.
   */
  async mappedRamView(): Promise<{ streamOffset: number } | undefined> {
    const m = this.manifest.mappedRam;
    if (!m || m.prefix.length === 0) return undefined;
    await this.#readLinks();
    for (const r of [m.glue, m.bitmaps, m.prefix]) await this.#readRegion('mapped-ram', r);
    return { streamOffset: m.streamOffset };
  }

  /** The link pages (v2), concatenated in file order, checked against their sha256. */
  async #readLinks(): Promise<Buffer> {
    const links = this.layout.links;
    const bytes = Buffer.alloc(links.length * PAGE_SIZE);
    for (const [i, link] of links.entries()) {
      await readExact(
        this.path,
        this.#open(),
        bytes.subarray(i * PAGE_SIZE, (i + 1) * PAGE_SIZE),
        link.offset,
      );
    }
    const want = this.manifest.ram.links?.sha256;
    if (want !== undefined && sha256Hex(bytes) !== want) {
      throw corrupt(this.path, 'links', 'links checksum mismatch', { offset: links[0]?.offset ?? 0 });
    }
    return bytes;
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
    const runs = pageRuns(b, zeroAt, maxPages, verifyHoles);
    for await (const { item, data } of prefetch(this.path, this.#open(), runs, maxPages * PAGE_SIZE, 2)) {
      const offset = item.first * PAGE_SIZE;
      if (verify !== false && (!item.zero || verifyHoles)) {
        this.#checkRun(b, blockIndex, table, item, data, zeroAt);
      }
      if (item.zero) yield { kind: 'zero', blockIndex, offset, pageCount: item.count };
      else yield { kind: 'data', blockIndex, offset, pageCount: item.count, data };
    }
  }

  /** Throws QSNAP_FILE_CORRUPT naming the first page of the run that does not match the table. */
  #checkRun(
    b: BlockLayout,
    blockIndex: number,
    table: Uint32Array,
    run: { first: number; count: number },
    data: Buffer,
    zeroAt: (pageIndex: number) => boolean,
  ): void {
    const bad = checkPages(data, table, run.first, run.count, zeroAt);
    if (bad.length === 0) return;
    const pageIndex = run.first + bad[0]!;
    throw corrupt(this.path, 'ram', `page ${pageIndex} of block "${b.name}" does not match its checksum`, {
      block: b.name,
      blockIndex,
      pageIndex,
      fileOffset: b.fileOffset + pageIndex * PAGE_SIZE,
    });
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
    const pass = new VerifyPass(opts, L.fileLength);
    // Trailer and manifest may have changed since open.
    await this.#verifyTrailer(fd, pass);
    await this.#verifyRegion(fd, pass, 'manifest', L.manifest, this.#manifestSha256);
    const tableBytes = await this.#verifyRegion(
      fd,
      pass,
      'page-table',
      L.pageTable,
      this.manifest.ram.pageTable.sha256,
    );
    await this.#verifyRegion(fd, pass, 'prologue', L.prologue, this.manifest.stream.prologue.sha256);
    await this.#verifyRegion(fd, pass, 'device-tail', L.deviceTail, this.manifest.stream.deviceTail.sha256);
    await this.#verifyMappedRam(fd, pass);

    let ram: RamCheck = { dataPages: 0, zeroPages: 0 };
    if (tableBytes) {
      ram = await this.#verifyRam(fd, decodePageTable(tableBytes), opts, (n) => pass.progress('ram', n));
      if (ram.first) pass.bad.push(ram.first);
    } else {
      pass.progress('ram', L.ramEnd);
    }

    if (pass.bad.length > 0) throw this.#firstCorruption(pass.bad, tableBytes !== undefined);
    return {
      bytesVerified: pass.bytesDone,
      dataPages: ram.dataPages,
      zeroPages: ram.zeroPages,
      durationMs: performance.now() - started,
    };
  }

  /** v2: the link pages and the mapped-ram view's regions (each by its sha256). */
  async #verifyMappedRam(fd: number, pass: VerifyPass): Promise<void> {
    const m = this.manifest.mappedRam;
    if (!m) return;
    const L = this.layout;
    pass.throwIfAborted();
    try {
      await this.#readLinks();
    } catch (err) {
      if (!(err instanceof SnapshotFileError) || err.details['region'] !== 'links') throw err;
      const offset = L.links[0]?.offset ?? 0;
      pass.bad.push({ region: 'links', offset, what: 'links checksum mismatch', details: { offset } });
    }
    pass.progress('links', L.links.length * PAGE_SIZE);
    for (const r of [m.glue, m.bitmaps, m.prefix]) {
      await this.#verifyRegion(fd, pass, 'mapped-ram', r, r.sha256);
    }
  }

  /** The trailer must still be intact and record the manifest and file length it did at open. */
  async #verifyTrailer(fd: number, pass: VerifyPass): Promise<void> {
    const L = this.layout;
    const tail = Buffer.alloc(L.trailer.length);
    await readExact(this.path, fd, tail, L.trailer.offset);
    pass.progress('trailer', tail.length);
    const t = decodeTrailer(tail);
    if (
      !t.ok ||
      t.trailer.manifestSha256 !== this.trailer.manifestSha256 ||
      t.trailer.fileLength !== L.fileLength
    ) {
      pass.bad.push({
        region: 'trailer',
        offset: L.trailer.offset,
        what: 'trailer changed or damaged',
        details: {},
      });
    }
  }

  /** The region's bytes when they match `sha256`; undefined, and a bad region noted, when not. */
  async #verifyRegion(
    fd: number,
    pass: VerifyPass,
    region: CorruptRegion,
    span: Span,
    sha256: string,
  ): Promise<Buffer | undefined> {
    pass.throwIfAborted();
    const bytes = Buffer.alloc(span.length);
    await readExact(this.path, fd, bytes, span.offset);
    pass.progress(region, span.length);
    if (sha256Hex(bytes) === sha256) return bytes;
    pass.bad.push({
      region,
      offset: span.offset,
      what: `${region} checksum mismatch`,
      details: { offset: span.offset, length: span.length },
    });
    return undefined;
  }

  /** QSNAP_FILE_CORRUPT for the first bad region in file order, listing all of them. */
  #firstCorruption(bad: BadRegion[], ramChecked: boolean): SnapshotFileError {
    bad.sort((a, b) => a.offset - b.offset);
    const first = bad[0]!;
    const badPages = bad.find((r) => r.region === 'ram')?.details['badPages'] ?? 0;
    return corrupt(this.path, first.region, first.what, {
      ...first.details,
      badRegions: bad.map((r) => r.region),
      badPages,
      ramChecked,
    });
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
  ): Promise<RamCheck> {
    const chunkPages = (8 * MiB) / PAGE_SIZE;
    const blocks = this.layout.blocks;
    const tally = new RamTally();
    const chunks = ramChunks(blocks, chunkPages);
    for await (const { item, data } of prefetch(this.path, fd, chunks, chunkPages * PAGE_SIZE, 3)) {
      opts.signal?.throwIfAborted();
      const b = blocks[item.blockIndex]!;
      const blockTable = table.subarray(b.firstPage, b.firstPage + b.pageCount);
      const zeroAt = (i: number): boolean => this.isZeroPage(item.blockIndex, i, blockTable);
      const bad = checkPages(data, blockTable, item.first, item.count, zeroAt, (zero, n) =>
        tally.countPages(zero, n),
      );
      if (bad.length > 0) tally.addBadPages(b, item.blockIndex, item.first + bad[0]!, bad.length);
      progress(data.length);
    }
    return tally.result();
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
 * zero pages by content (one memcmp per run), data pages by one CRC per run of them. Returns bad page positions
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
      let e = k + 1;
      while (e < count && !zeroAt(first + e)) e++;
      tally?.(false, e - k);
      // One CRC over the whole stretch; page by page only to name the bad pages.
      const run = data.subarray(k * PAGE_SIZE, e * PAGE_SIZE);
      if (pageCrc(run) !== combinedPageCrc(table, first + k, e - k)) {
        for (let p = k; p < e; p++) {
          if (pageCrc(data.subarray(p * PAGE_SIZE, (p + 1) * PAGE_SIZE)) !== table[first + p]) bad.push(p);
        }
      }
      k = e;
    }
  }
  return bad;
}

function fstat(fd: number): Promise<fs.Stats> {
  return new Promise((res, rej) => fs.fstat(fd, (e, st) => (e ? rej(e) : res(st))));
}

/** A block's pages as runs of zero or data pages, for prefetch: holes are read only to verify them. */
function* pageRuns(
  b: BlockLayout,
  zeroAt: (pageIndex: number) => boolean,
  maxPages: number,
  verifyHoles: boolean,
): Generator<Span & { zero: boolean; first: number; count: number }> {
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

/** Every block's pages in chunks of at most `chunkPages`, for prefetch. */
function* ramChunks(
  blocks: readonly BlockLayout[],
  chunkPages: number,
): Generator<Span & { blockIndex: number; first: number; count: number }> {
  for (const [blockIndex, b] of blocks.entries()) {
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

/** Bytes done and bad regions found by one verify(), reported to its onProgress. */
class VerifyPass {
  readonly bad: BadRegion[] = [];
  bytesDone = 0;
  readonly #opts: VerifyOptions;
  readonly #bytesTotal: number;

  constructor(opts: VerifyOptions, bytesTotal: number) {
    this.#opts = opts;
    this.#bytesTotal = bytesTotal;
  }

  progress(region: CorruptRegion, n: number): void {
    this.bytesDone += n;
    this.#opts.onProgress?.({ region, bytesDone: this.bytesDone, bytesTotal: this.#bytesTotal });
  }

  throwIfAborted(): void {
    this.#opts.signal?.throwIfAborted();
  }
}

/** Page counts of a RAM check, and its bad pages: how many, per block, and the first in file order. */
class RamTally {
  #dataPages = 0;
  #zeroPages = 0;
  #badPages = 0;
  readonly #badPagesByBlock: Record<string, number> = {};
  #first: BadRegion | undefined;

  countPages(zero: boolean, n: number): void {
    if (zero) this.#zeroPages += n;
    else this.#dataPages += n;
  }

  /** `n` bad pages of block `b`, the first of them page `pageIndex`. */
  addBadPages(b: BlockLayout, blockIndex: number, pageIndex: number, n: number): void {
    this.#badPages += n;
    this.#badPagesByBlock[b.name] = (this.#badPagesByBlock[b.name] ?? 0) + n;
    if (this.#first) return;
    const fileOffset = b.fileOffset + pageIndex * PAGE_SIZE;
    this.#first = {
      region: 'ram',
      offset: fileOffset,
      what: `page ${pageIndex} of block "${b.name}" does not match its checksum`,
      details: { block: b.name, blockIndex, pageIndex, fileOffset },
    };
  }

  result(): RamCheck {
    const first = this.#first;
    if (first)
      first.details = { ...first.details, badPages: this.#badPages, badPagesByBlock: this.#badPagesByBlock };
    return { dataPages: this.#dataPages, zeroPages: this.#zeroPages, ...(first ? { first } : {}) };
  }
}
