/**
 * Streams RAM pages into a snapshot file as they arrive, then seals it with the page table, the
 * stream blobs, the manifest and the trailer, and publishes it atomically.
 *
 * Pages arrive in any order (a background snapshot sends the pages the guest overwrote first,
 * then the linear scan). They are copied into fixed-size staging chunks; a full chunk is sorted by
 * file offset and written with one positioned writev per run of contiguous pages, so the linear
 * scan costs one syscall per chunk. Zero pages are never written: the file is created sparse.
 * A page sent again (a pre-copy migration resends what the guest dirtied) replaces its copy in
 * place while that is still staged; the last record of a page always wins.
 *
 * Life cycle: create() → writePage()/writeZeroPage() (respecting needsDrain/onceDrained) →
 * finish() → the file exists at its final path; or abort() → nothing is left behind.
 */
import { randomBytes, randomUUID } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import {
  encodePageTable,
  encodeTrailer,
  isZeroPage,
  PAGE_SIZE,
  pageCrc,
  sha256Hex,
  ZERO_PAGE,
  ZERO_PAGE_CRC,
} from './codec.js';
import { ioError, SnapshotFileError, usage } from './errors.js';
import { closeFd, fsyncDir, fsyncFd, pwriteAll } from './io.js';
import {
  type BlockLayout,
  type BlockSpec,
  type FileLayout,
  layoutFile,
  layoutRam,
  type RamLayout,
  type RegionLengths,
} from './layout.js';
import { type DiskEntry, type Manifest, ManifestSchema, serializeManifest } from './manifest.js';
import { encodeMappedRam, type MappedRamBytes, planMappedRam } from './mapped-ram.js';

export interface SnapshotWriterOptions {
  /** RAM blocks in stream order (RAM START section); the first lands at file offset 0. */
  blocks: readonly BlockSpec[];
  /** Replace an existing file at the final path (default: refuse with QSNAP_FILE_EXISTS). */
  overwrite?: boolean;
  /** Permission bits of the new file (default 0o600: it holds guest memory). */
  mode?: number;
  /** Bytes staged or in flight at which needsDrain turns true (default 16 MiB). */
  bufferBytes?: number;
  /** Size of one staging chunk, the largest single write (default 4 MiB, at most 8 MiB). */
  chunkBytes?: number;
  /** Chunks being written at once (default 3). */
  maxConcurrentWrites?: number;
  /** Format major version to write (default FORMAT_VERSION_MAJOR; 1 for tests of older files). */
  formatVersion?: 1 | 2;
  /** @internal Test hook replacing the positioned write of pages (e.g. to delay or fail writes). */
  pwrite?: (fd: number, buffers: readonly Uint8Array[], position: number) => Promise<void>;
}

/** What the caller knows about the snapshot; the writer adds format, RAM layout, regions and page counts. */
export interface SnapshotInfo {
  id?: string;
  createdAt?: string;
  qemu: Manifest['qemu'];
  vm: Manifest['vm'];
  strategy?: Manifest['strategy'];
  pointInTime: Manifest['pointInTime'];
  stream: { streamVersion: number; ramSectionId: number; devices?: string[] };
  disks?: DiskEntry[];
  skippedDisks?: Manifest['skippedDisks'];
  timings: Manifest['timings'];
  counts: { streamBytes: number; [name: string]: number };
}

export interface FinishOptions {
  /** Stream header + configuration + RAM START section, verbatim. */
  prologue: Uint8Array;
  /** Device state sections + EOF + VMDESCRIPTION, verbatim. */
  deviceTail: Uint8Array;
  info: SnapshotInfo;
  /** Seal even if some pages never arrived (they read as zero). Default: QSNAP_FILE_INCOMPLETE. */
  allowMissingPages?: boolean;
}

export interface WriterCounts {
  /** Pages whose current content is data. */
  dataPages: number;
  /** Pages whose current content is zero (zero-page records and all-zero data pages). */
  zeroPages: number;
  missingPages: number;
  /** Records for a page already seen. */
  duplicatePages: number;
}

export interface MissingPages {
  total: number;
  blocks: { blockIndex: number; name: string; count: number; firstOffset: number }[];
}

export type WriterState = 'open' | 'finishing' | 'finished' | 'failed' | 'aborted';

/** Per-page state. ZERO_WRITTEN: zero after data, so zeros were written over it (not a hole). */
const UNSEEN = 0;
const ZERO_HOLE = 1;
const DATA = 2;
const ZERO_WRITTEN = 3;

const MiB = 1024 * 1024;
/** Background write-back granularity (see #writeBack). */
const WRITEBACK_BYTES = 64 * MiB;
/** Positioned writes of one chunk issued at once (the libuv pool runs 4 at a time). */
const RUNS_IN_FLIGHT = 16;

interface Chunk {
  buf: Buffer;
  /** File page number (= file offset / 4096) of each staged page, in arrival order. */
  pages: Float64Array;
  count: number;
  /** Must not start before every earlier chunk is on disk: it rewrites a page being written. */
  barrier: boolean;
  /** Names this use of the buffer (a new one each time it becomes the staging chunk). */
  serial: number;
  /** Handed to the disk: its pages can no longer be changed in place. */
  writing: boolean;
}

export class SnapshotWriter {
  readonly path: string;
  readonly tempPath: string;
  readonly layout: RamLayout;

  #fd: number;
  #state: WriterState = 'open';
  #failure: SnapshotFileError | undefined;
  readonly #overwrite: boolean;
  readonly #pageState: Uint8Array;
  readonly #crcs: Uint32Array;
  #counts: WriterCounts;

  readonly #chunkPages: number;
  readonly #poolChunks: number;
  readonly #maxConcurrent: number;
  readonly #pwrite: NonNullable<SnapshotWriterOptions['pwrite']>;
  #staging: Chunk;
  /** Where each page's last copy is staged: chunk serial (0: none) and slot. */
  readonly #pageChunk: Uint32Array;
  readonly #pageSlot: Uint16Array;
  /** Chunks staged, queued or being written, by serial: a page's copy in none of them is on disk. */
  readonly #pending = new Map<number, Chunk>();
  #nextSerial = 1;
  readonly #free: Chunk[] = [];
  readonly #queue: Chunk[] = [];
  #inFlight = 0;
  #drainWaiters: { resolve: () => void; reject: (err: unknown) => void }[] = [];
  #idleWaiters: (() => void)[] = [];
  #finishing: Promise<unknown> | undefined;
  #unsyncedBytes = 0;
  #syncing: Promise<void> | undefined;

  private constructor(
    file: string,
    tempPath: string,
    fd: number,
    layout: RamLayout,
    opts: SnapshotWriterOptions,
  ) {
    this.path = file;
    this.tempPath = tempPath;
    this.#fd = fd;
    this.layout = layout;
    this.#overwrite = opts.overwrite ?? false;
    // Indexed by file page (file offset / 4096): v2's link pages have entries nobody uses.
    const filePages = layout.ramEnd / PAGE_SIZE;
    this.#pageState = new Uint8Array(filePages);
    this.#crcs = new Uint32Array(filePages).fill(ZERO_PAGE_CRC);
    this.#counts = { dataPages: 0, zeroPages: 0, missingPages: layout.totalPages, duplicatePages: 0 };
    const chunkBytes = opts.chunkBytes ?? 4 * MiB;
    if (chunkBytes % PAGE_SIZE !== 0 || chunkBytes < PAGE_SIZE || chunkBytes > 8 * MiB) {
      throw usage('chunkBytes must be a multiple of 4096 between 4 KiB and 8 MiB', { chunkBytes });
    }
    this.#chunkPages = chunkBytes / PAGE_SIZE;
    this.#poolChunks = Math.max(2, Math.floor((opts.bufferBytes ?? 16 * MiB) / chunkBytes));
    this.#maxConcurrent = Math.max(1, opts.maxConcurrentWrites ?? 3);
    this.#pwrite = opts.pwrite ?? pwriteAll;
    this.#pageChunk = new Uint32Array(filePages);
    this.#pageSlot = new Uint16Array(filePages);
    this.#staging = this.#stagingChunk(this.#newChunk());
  }

  /**
   * Creates the temporary file next to `file` (`.<name>.qsnap-partial-<random>`), sized sparse to
   * the RAM extent. Fails early with QSNAP_FILE_EXISTS if `file` exists and overwrite is not set.
   */
  static async create(file: string, opts: SnapshotWriterOptions): Promise<SnapshotWriter> {
    let layout: RamLayout;
    try {
      layout = layoutRam(opts.blocks, opts.formatVersion);
    } catch (err) {
      throw usage(`invalid RAM block list: ${(err as Error).message}`, { blocks: opts.blocks });
    }
    const finalPath = path.resolve(file);
    if (!opts.overwrite && (await pathExists(finalPath))) throw exists(finalPath);
    const dir = path.dirname(finalPath);
    const tempPath = path.join(
      dir,
      `.${path.basename(finalPath)}.qsnap-partial-${randomBytes(6).toString('hex')}`,
    );
    let fd: number;
    try {
      fd = await new Promise<number>((res, rej) =>
        fs.open(tempPath, 'wx', opts.mode ?? 0o600, (e, n) => (e ? rej(e) : res(n))),
      );
    } catch (err) {
      throw ioError('create', finalPath, err, { tempPath });
    }
    try {
      await new Promise<void>((res, rej) => fs.ftruncate(fd, layout.ramEnd, (e) => (e ? rej(e) : res())));
      return new SnapshotWriter(finalPath, tempPath, fd, layout, opts);
    } catch (err) {
      await closeFd(fd).catch(() => {});
      await fs.promises.unlink(tempPath).catch(() => {});
      throw err instanceof SnapshotFileError ? err : ioError('size', finalPath, err, { tempPath });
    }
  }

  get state(): WriterState {
    return this.#state;
  }

  get counts(): Readonly<WriterCounts> {
    return { ...this.#counts };
  }

  /** Bytes copied into staging chunks and not yet on disk. */
  get bufferedBytes(): number {
    return (
      (this.#queue.length + this.#inFlight) * this.#chunkPages * PAGE_SIZE + this.#staging.count * PAGE_SIZE
    );
  }

  /** True when the caller should wait for onceDrained() before delivering more pages. */
  get needsDrain(): boolean {
    return this.#queue.length + this.#inFlight + 1 >= this.#poolChunks;
  }

  /** Resolves when needsDrain is false; rejects with the write error if the writer failed. */
  onceDrained(): Promise<void> {
    if (this.#failure) return Promise.reject(this.#failure);
    if (this.#state !== 'open' && this.#state !== 'finishing') return Promise.reject(this.#closedError());
    if (!this.needsDrain) return Promise.resolve();
    return new Promise((resolve, reject) => this.#drainWaiters.push({ resolve, reject }));
  }

  /** Stores a data page (copied; `data` may be reused once this returns). */
  writePage(blockIndex: number, offset: number, data: Uint8Array): void {
    const page = this.#acceptPage(blockIndex, offset);
    if (data.byteLength !== PAGE_SIZE) {
      throw usage(`page data must be ${PAGE_SIZE} bytes, got ${data.byteLength}`, { blockIndex, offset });
    }
    const crc = pageCrc(data);
    // QEMU sends zero pages as ZERO records, but an all-zero data page is a hole all the same.
    if (crc === ZERO_PAGE_CRC && isZeroPage(data)) {
      this.#zeroPage(page);
      return;
    }
    const prev = this.#pageState[page]!;
    this.#noteTransition(prev, DATA);
    this.#stage(page, data, prev === DATA || prev === ZERO_WRITTEN);
    this.#pageState[page] = DATA;
    this.#crcs[page] = crc;
  }

  /** Records a zero page: nothing is written unless the page held data before. */
  writeZeroPage(blockIndex: number, offset: number): void {
    this.#zeroPage(this.#acceptPage(blockIndex, offset));
  }

  /** Pages never delivered so far, per block (scans the page states: O(pages)). */
  missingPages(): MissingPages {
    const blocks: MissingPages['blocks'] = [];
    let total = 0;
    for (const [blockIndex, b] of this.layout.blocks.entries()) {
      let count = 0;
      let firstOffset = -1;
      for (let i = 0; i < b.pageCount; i++) {
        if (this.#pageState[this.#filePage(b, i)] === UNSEEN) {
          if (count++ === 0) firstOffset = i * PAGE_SIZE;
        }
      }
      if (count > 0) blocks.push({ blockIndex, name: b.name, count, firstOffset });
      total += count;
    }
    return { total, blocks };
  }

  /**
   * Writes the page table, blobs, manifest and trailer, fsyncs, moves the file to its final path
   * and fsyncs the directory. Returns the manifest written. On failure the temporary file is
   * removed, except for QSNAP_FILE_INCOMPLETE, which leaves the writer open (deliver or abort).
   */
  async finish(opts: FinishOptions): Promise<Manifest> {
    if (this.#failure) {
      await this.#cleanup();
      throw this.#failure;
    }
    this.#assertOpen();
    this.#state = 'finishing';
    const run = this.#finish(opts);
    this.#finishing = run;
    try {
      return await run;
    } catch (err) {
      if (
        this.#state === 'finishing' &&
        err instanceof SnapshotFileError &&
        err.code === 'QSNAP_FILE_INCOMPLETE'
      ) {
        this.#state = 'open';
      } else {
        await this.#cleanup();
      }
      throw err;
    } finally {
      this.#finishing = undefined;
    }
  }

  /**
   * Stops writing, closes and removes the temporary file. Idempotent; never throws; a no-op once
   * finish() has published the file. During finish(), waits for it and cleans up if it failed.
   */
  async abort(_reason?: unknown): Promise<void> {
    if (this.#finishing) await this.#finishing.catch(() => {});
    if (this.#state === 'finished' || this.#state === 'aborted') return;
    await this.#cleanup();
  }

  async #finish(opts: FinishOptions): Promise<Manifest> {
    this.#seal();
    await this.#whenIdle();
    await this.#syncing;
    if (this.#failure) throw this.#failure;
    if (this.#counts.missingPages > 0 && !opts.allowMissingPages) throw this.#incompleteError();

    const pageTable = encodePageTable(this.#pageTableCrcs());
    const seal = this.#planSeal(opts, pageTable);
    const manifest = this.#buildManifest(opts, seal);
    await this.#writeSealAndClose(opts, seal, serializeManifest(manifest));
    await this.#publish();
    this.#state = 'finished';
    return manifest;
  }

  #incompleteError(): SnapshotFileError {
    const missing = this.missingPages();
    const first = missing.blocks[0]!;
    return new SnapshotFileError(
      'QSNAP_FILE_INCOMPLETE',
      `${missing.total} RAM pages never arrived (first: block "${first.name}" offset ${first.firstOffset})`,
      {
        hint: 'the migration stream ended early; take the snapshot again',
        details: { file: this.path, missingPages: missing.total, blocks: missing.blocks },
      },
    );
  }

  /** Index of page `pageIndex` of block `b` in the per-page arrays: its file offset / 4096. */
  #filePage(b: BlockLayout, pageIndex: number): number {
    return b.fileOffset / PAGE_SIZE + pageIndex;
  }

  /** One CRC per page of the blocks, in block order (v2 leaves out the link pages). */
  #pageTableCrcs(): Uint32Array {
    if (this.layout.links.length === 0) return this.#crcs;
    const out = new Uint32Array(this.layout.totalPages);
    for (const b of this.layout.blocks) {
      const first = this.#filePage(b, 0);
      out.set(this.#crcs.subarray(first, first + b.pageCount), b.firstPage);
    }
    return out;
  }

  /**
   * What goes after the RAM, and where (the manifest's length aside): the page table, the blobs
   * and, in v2, the mapped-ram view when QEMU could load this stream that way.
   */
  #planSeal(opts: FinishOptions, pageTable: Buffer): Seal {
    const plan = planMappedRam(opts.prologue, this.layout);
    const lengths = (manifest: number): RegionLengths => ({
      prologue: opts.prologue.byteLength,
      deviceTail: opts.deviceTail.byteLength,
      manifest,
      ...(plan
        ? { glue: plan.glueLength, bitmaps: plan.bitmapsLength, mappedRamPrefix: plan.prefixLength }
        : {}),
    });
    const at = layoutFile(this.layout, lengths(0));
    const view = plan
      ? encodeMappedRam(plan, at, (p) => this.#pageState[this.#filePage(this.layout.blocks[0]!, p)] === DATA)
      : undefined;
    return { pageTable, view, lengths, at };
  }

  /** Links, page table, blobs, the mapped-ram view, manifest and trailer, fsynced; then the file is closed. */
  async #writeSealAndClose(opts: FinishOptions, seal: Seal, manifestBytes: Buffer): Promise<void> {
    const layout = layoutFile(this.layout, seal.lengths(manifestBytes.byteLength));
    const trailer = encodeTrailer({
      manifestOffset: layout.manifest.offset,
      manifestLength: layout.manifest.length,
      manifestSha256: sha256Hex(manifestBytes),
      fileLength: layout.fileLength,
      versionMajor: this.layout.version,
    });
    const fd = this.#fd;
    const v = seal.view;
    // In file order from the end of RAM: v1 page table, prologue, device tail; v2 glue, device
    // tail, page table, prologue, bitmaps, prefix.
    const after =
      this.layout.version === 1
        ? [seal.pageTable, opts.prologue, opts.deviceTail]
        : [v?.glue, opts.deviceTail, seal.pageTable, opts.prologue, v?.bitmaps, v?.prefix];
    try {
      for (const [i, link] of (v?.links ?? []).entries())
        await pwriteAll(fd, [link], layout.links[i]!.offset);
      await pwriteAll(
        fd,
        [...after.filter((b): b is Uint8Array => b !== undefined), manifestBytes, trailer],
        this.layout.ramEnd,
      );
      await fsyncFd(fd);
    } catch (err) {
      throw ioError('write', this.path, err, { tempPath: this.tempPath });
    }
    this.#fd = -1;
    try {
      await closeFd(fd);
    } catch (err) {
      throw ioError('close', this.path, err, { tempPath: this.tempPath });
    }
  }

  #buildManifest(opts: FinishOptions, seal: Seal): Manifest {
    const { info } = opts;
    const regions = this.#blobRegions(opts, seal);
    return validManifest({
      format: 'qsnap-snapshot',
      version: this.layout.version,
      id: info.id ?? randomUUID(),
      createdAt: info.createdAt ?? new Date().toISOString(),
      qemu: info.qemu,
      vm: info.vm,
      strategy: info.strategy ?? 'background-snapshot',
      pointInTime: info.pointInTime,
      ram: {
        pageSize: PAGE_SIZE,
        blocks: this.layout.blocks.map((b) => this.#blockEntry(b)),
        pageTable: regions.pageTable,
        ...(this.layout.version >= 2 ? { links: { sha256: this.#linksSha256(seal.view) } } : {}),
      },
      stream: { ...info.stream, prologue: regions.prologue, deviceTail: regions.deviceTail },
      ...(this.layout.version >= 2 ? { mappedRam: mappedRamEntry(seal.at, seal.view) } : {}),
      disks: info.disks ?? [],
      skippedDisks: info.skippedDisks ?? [],
      timings: info.timings,
      counts: {
        ...info.counts,
        pagesWritten: this.#counts.dataPages,
        zeroPages: this.#counts.zeroPages,
        missingPages: this.#counts.missingPages,
        duplicatePages: this.#counts.duplicatePages,
      },
    });
  }

  /** The link pages as written (zeros without the mapped-ram view). */
  #linksSha256(view: MappedRamBytes | undefined): string {
    const pages = view?.links ?? this.layout.links.map(() => Buffer.alloc(PAGE_SIZE));
    return sha256Hex(Buffer.concat(pages));
  }

  /** Place and sha256 of the page table, prologue and device tail. */
  #blobRegions(opts: FinishOptions, seal: Seal) {
    // Regions before the manifest do not depend on its length.
    const at = seal.at;
    return {
      pageTable: region(at.pageTable, seal.pageTable),
      prologue: region(at.prologue, opts.prologue),
      deviceTail: region(at.deviceTail, opts.deviceTail),
    };
  }

  /** A block's manifest entry: where it is, and its pages counted by state. */
  #blockEntry(b: BlockLayout) {
    let dataPages = 0;
    let missingPages = 0;
    const zeroCrcDataPages: number[] = [];
    for (let i = 0; i < b.pageCount; i++) {
      const s = this.#pageState[this.#filePage(b, i)];
      if (s === DATA) {
        dataPages++;
        if (this.#crcs[this.#filePage(b, i)] === ZERO_PAGE_CRC) zeroCrcDataPages.push(i);
      } else if (s === UNSEEN) missingPages++;
    }
    const zeroPages = b.pageCount - dataPages - missingPages;
    return {
      name: b.name,
      usedLength: b.usedLength,
      fileOffset: b.fileOffset,
      fileLength: b.fileLength,
      dataPages,
      zeroPages,
      missingPages,
      zeroCrcDataPages,
    };
  }

  /**
   * Moves the finished temporary file to the final path. Without overwrite, link() is the atomic
   * "create only if absent" (rename() would replace a file created since create()).
   */
  async #publish(): Promise<void> {
    const dir = path.dirname(this.path);
    try {
      if (this.#overwrite) {
        await fs.promises.rename(this.tempPath, this.path);
      } else {
        try {
          await fs.promises.link(this.tempPath, this.path);
          await fs.promises.unlink(this.tempPath);
        } catch (err) {
          const code = (err as NodeJS.ErrnoException).code;
          if (code === 'EEXIST') throw exists(this.path);
          if (code !== 'EPERM' && code !== 'ENOTSUP' && code !== 'EOPNOTSUPP' && code !== 'EMLINK') throw err;
          // File systems without hard links: check, then rename (a tiny race remains).
          if (await pathExists(this.path)) throw exists(this.path);
          await fs.promises.rename(this.tempPath, this.path);
        }
      }
      await fsyncDir(dir);
    } catch (err) {
      throw err instanceof SnapshotFileError ? err : ioError('publish', this.path, err);
    }
  }

  #acceptPage(blockIndex: number, offset: number): number {
    this.#assertOpen();
    const b = this.layout.blocks[blockIndex];
    if (!b || !Number.isInteger(blockIndex)) {
      throw usage(`no RAM block ${blockIndex} (the file has ${this.layout.blocks.length})`, {
        blockIndex,
        offset,
      });
    }
    if (!Number.isSafeInteger(offset) || offset < 0 || offset % PAGE_SIZE !== 0 || offset >= b.usedLength) {
      throw usage(`page offset ${offset} is not a page of block "${b.name}" (used length ${b.usedLength})`, {
        blockIndex,
        block: b.name,
        offset,
      });
    }
    if (this.#queue.length + this.#inFlight >= 4 * this.#poolChunks) {
      throw usage('page delivered while the writer asked to drain: backpressure ignored', {
        bufferedBytes: this.bufferedBytes,
      });
    }
    return this.#filePage(b, offset / PAGE_SIZE);
  }

  #zeroPage(page: number): void {
    const prev = this.#pageState[page]!;
    this.#noteTransition(prev, ZERO_HOLE);
    this.#crcs[page] = ZERO_PAGE_CRC;
    if (prev === DATA) {
      // The data may already be on disk: overwrite it with zeros, after that write.
      this.#stage(page, ZERO_PAGE, true);
      this.#pageState[page] = ZERO_WRITTEN;
    } else if (prev === UNSEEN) {
      this.#pageState[page] = ZERO_HOLE;
    }
  }

  #noteTransition(prev: number, next: typeof DATA | typeof ZERO_HOLE): void {
    const c = this.#counts;
    if (prev === UNSEEN) c.missingPages--;
    else c.duplicatePages++;
    if (prev === DATA) c.dataPages--;
    else if (prev === ZERO_HOLE || prev === ZERO_WRITTEN) c.zeroPages--;
    if (next === DATA) c.dataPages++;
    else c.zeroPages++;
  }

  /** Copies a page into the staging chunk; `rewrite`: an earlier copy of it was staged. */
  #stage(page: number, data: Uint8Array, rewrite: boolean): void {
    if (rewrite && this.#restage(page, data)) return;
    const s = this.#staging;
    s.buf.set(data, s.count * PAGE_SIZE);
    s.pages[s.count] = page;
    this.#pageChunk[page] = s.serial;
    this.#pageSlot[page] = s.count;
    s.count++;
    if (s.count === this.#chunkPages) this.#seal();
  }

  /**
   * A page sent again (pre-copy resends what the guest dirtied). Its earlier copy, if not handed
   * to the disk yet, is overwritten in place (true). One being written makes the staging chunk
   * wait for every earlier write (a barrier), or the older copy could land last. One already on
   * disk is simply overwritten by the later write. So rewrites never add chunks.
   */
  #restage(page: number, data: Uint8Array): boolean {
    const chunk = this.#pending.get(this.#pageChunk[page]!);
    if (!chunk) return false;
    if (!chunk.writing) {
      chunk.buf.set(data, this.#pageSlot[page]! * PAGE_SIZE);
      return true;
    }
    this.#staging.barrier = true;
    return false;
  }

  /** Queues the staging chunk (if it holds pages) for writing and starts a new one. */
  #seal(): void {
    if (this.#staging.count === 0) return;
    this.#queue.push(this.#staging);
    this.#staging = this.#stagingChunk(this.#free.pop() ?? this.#newChunk());
    this.#pump();
  }

  #stagingChunk(chunk: Chunk): Chunk {
    chunk.serial = this.#nextSerial++;
    chunk.writing = false;
    this.#pending.set(chunk.serial, chunk);
    return chunk;
  }

  #pump(): void {
    while (!this.#failure && this.#queue.length > 0 && this.#inFlight < this.#maxConcurrent) {
      const chunk = this.#queue[0]!;
      if (chunk.barrier && this.#inFlight > 0) return;
      this.#queue.shift();
      chunk.writing = true;
      this.#inFlight++;
      this.#writeChunk(chunk).then(
        () => this.#settled(chunk, undefined),
        (err: unknown) => this.#settled(chunk, err),
      );
    }
  }

  #settled(chunk: Chunk, err: unknown): void {
    this.#inFlight--;
    this.#pending.delete(chunk.serial);
    if (err === undefined) this.#writeBack(chunk.count * PAGE_SIZE);
    chunk.count = 0;
    chunk.barrier = false;
    if (this.#free.length + 1 < this.#poolChunks) this.#free.push(chunk);
    if (err !== undefined && !this.#failure) {
      this.#failure = ioError('write', this.path, err, { tempPath: this.tempPath });
      if (this.#state === 'open') this.#state = 'failed';
      this.#queue.length = 0;
    }
    this.#pump();
    if (this.#failure) {
      for (const w of this.#drainWaiters.splice(0)) w.reject(this.#failure);
    } else if (!this.needsDrain) {
      for (const w of this.#drainWaiters.splice(0)) w.resolve();
    }
    if (this.#inFlight === 0 && (this.#queue.length === 0 || this.#failure)) {
      for (const w of this.#idleWaiters.splice(0)) w();
    }
  }

  /**
   * Start writing pages back to disk while the stream still arrives (an fdatasync every
   * WRITEBACK_BYTES, one at a time, in the background), so the fsync that seals the file has
   * little left to do. Its errors surface at that final fsync.
   */
  #writeBack(bytes: number): void {
    this.#unsyncedBytes += bytes;
    if (this.#syncing || this.#unsyncedBytes < WRITEBACK_BYTES || this.#state !== 'open') return;
    this.#unsyncedBytes = 0;
    this.#syncing = new Promise<void>((resolve) => fs.fdatasync(this.#fd, () => resolve())).then(() => {
      this.#syncing = undefined;
    });
  }

  /**
   * Writes a chunk: one positioned writev per run of contiguous pages, several at once (pages
   * scattered over RAM, or data pages between holes, give many small runs; issuing them one
   * after another would cost an event-loop round trip each).
   */
  async #writeChunk(chunk: Chunk): Promise<void> {
    const { buf } = chunk;
    const runs = planWrites(chunk.pages, chunk.count, this.#chunkPages);
    let next = 0;
    const worker = async (): Promise<void> => {
      while (next < runs.length) {
        const run = runs[next++]!;
        const iov = run.slots.map(([a, b]) => buf.subarray(a * PAGE_SIZE, b * PAGE_SIZE));
        await this.#pwrite(this.#fd, iov, run.filePage * PAGE_SIZE);
      }
    };
    await Promise.all(Array.from({ length: Math.min(RUNS_IN_FLIGHT, runs.length) }, worker));
  }

  #whenIdle(): Promise<void> {
    if (this.#inFlight === 0 && (this.#queue.length === 0 || this.#failure)) return Promise.resolve();
    return new Promise((resolve) => this.#idleWaiters.push(resolve));
  }

  async #cleanup(): Promise<void> {
    const wasFailed = this.#failure;
    this.#state = 'aborted';
    this.#queue.length = 0;
    this.#staging.count = 0;
    await this.#whenIdle();
    await this.#syncing;
    for (const w of this.#drainWaiters.splice(0)) w.reject(wasFailed ?? this.#closedError());
    if (this.#fd >= 0) {
      const fd = this.#fd;
      this.#fd = -1;
      await closeFd(fd).catch(() => {});
    }
    await fs.promises.unlink(this.tempPath).catch(() => {});
  }

  #assertOpen(): void {
    if (this.#failure) throw this.#failure;
    if (this.#state !== 'open') throw this.#closedError();
  }

  #closedError(): SnapshotFileError {
    return usage(`snapshot writer for ${this.path} is ${this.#state}`, { state: this.#state });
  }

  #newChunk(): Chunk {
    return {
      buf: Buffer.allocUnsafeSlow(this.#chunkPages * PAGE_SIZE),
      pages: new Float64Array(this.#chunkPages),
      count: 0,
      barrier: false,
      serial: 0,
      writing: false,
    };
  }
}

function exists(file: string): SnapshotFileError {
  return new SnapshotFileError('QSNAP_FILE_EXISTS', `${file} already exists`, {
    hint: 'choose another file name, or allow replacing it (overwrite)',
    details: { file },
  });
}

/** The manifest as the schema outputs it; information the caller got wrong is a usage error. */
function validManifest(candidate: unknown): Manifest {
  const parsed = ManifestSchema.safeParse(candidate);
  if (!parsed.success) {
    throw usage(
      `invalid snapshot information for the manifest: ${parsed.error.issues.map((i) => `${i.path.join('.')}: ${i.message}`).join('; ')}`,
      {
        issues: parsed.error.issues,
      },
    );
  }
  return parsed.data;
}

async function pathExists(file: string): Promise<boolean> {
  try {
    await fs.promises.lstat(file);
    return true;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return false;
    throw ioError('inspect', file, err);
  }
}

export interface PlannedWrite {
  /** File page number (file offset / 4096) of the run's first page. */
  filePage: number;
  /** Slot ranges [start, end) of the staging chunk, in file order; together they fill the run. */
  slots: [number, number][];
}

/**
 * Groups the staged pages of a chunk (file page numbers in arrival order, one per slot) into runs
 * of contiguous file pages, each a list of slot ranges for one writev. Pure; exported for tests.
 */
export function planWrites(pages: ArrayLike<number>, count: number, slotsPerChunk: number): PlannedWrite[] {
  if (count === 0) return [];
  const first = pages[0]!;
  let linear = true;
  for (let i = 1; i < count && linear; i++) linear = pages[i] === first + i;
  if (linear) return [{ filePage: first, slots: [[0, count]] }];

  // key = filePage * slotsPerChunk + slot: a numeric sort orders by page and keeps the slot.
  const keys = new Float64Array(count);
  for (let slot = 0; slot < count; slot++) keys[slot] = pages[slot]! * slotsPerChunk + slot;
  keys.sort();
  const runs: PlannedWrite[] = [];
  let prevPage = -2;
  let run: PlannedWrite | undefined;
  for (let i = 0; i < count; i++) {
    const page = Math.floor(keys[i]! / slotsPerChunk);
    const slot = keys[i]! % slotsPerChunk;
    if (!run || page !== prevPage + 1) {
      run = { filePage: page, slots: [[slot, slot + 1]] };
      runs.push(run);
    } else {
      const last = run.slots[run.slots.length - 1]!;
      if (last[1] === slot) last[1] = slot + 1;
      else run.slots.push([slot, slot + 1]);
    }
    prevPage = page;
  }
  return runs;
}

interface Seal {
  pageTable: Buffer;
  view: MappedRamBytes | undefined;
  /** The lengths of the regions after RAM, given the manifest's. */
  lengths: (manifest: number) => RegionLengths;
  /** The layout with a manifest of length 0 (everything before the manifest is placed). */
  at: FileLayout;
}

function region(span: { offset: number; length: number }, bytes: Uint8Array) {
  return { ...span, sha256: sha256Hex(bytes) };
}

/** The manifest's `mappedRam`: the view's regions, empty when the file has none. */
function mappedRamEntry(
  at: FileLayout,
  view: MappedRamBytes | undefined,
): NonNullable<Manifest['mappedRam']> {
  const none = Buffer.alloc(0);
  return {
    glue: region(at.glue, view?.glue ?? none),
    bitmaps: region(at.bitmaps, view?.bitmaps ?? none),
    prefix: region(at.mappedRamPrefix, view?.prefix ?? none),
    streamOffset: view ? at.mappedRamPrefix.offset : 0,
  };
}
