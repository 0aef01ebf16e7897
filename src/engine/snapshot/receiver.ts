import { closeSync } from 'node:fs';
import { rm } from 'node:fs/promises';
import { createServer, type Server, type Socket } from 'node:net';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { SnapshotWriter } from '../../format/index.js';
import {
  MigrationStreamParser,
  type PrologueEvent,
  type RamSetupEvent,
  type StreamSink,
  type StreamSummary,
} from '../../stream/index.js';
import { SnapshotError } from '../errors.js';
import { hangForever } from '../faults.js';
import { DrainGuard } from './drain-guard.js';
import {
  type HeldPipe,
  killPlaceholder,
  openPlaceholderPipe,
  PLACEHOLDER_PID_FILE,
  placeholderCommand,
} from './pipe-source.js';
import { ReadRateLimit } from './rate-limit.js';
import { readFdIntoReusedBuffer, readIntoReusedBuffer } from './socket-reader.js';

/**
 * How QEMU's stream reaches qsnap: `pipe` — `migrate exec:` and qsnap reading QEMU's pipe
 * (pipe-source.ts; a local QEMU whose /proc qsnap may read), `unix` — QEMU connects to a
 * socket qsnap listens on.
 */
export type StreamTransport = 'pipe' | 'unix';

export interface ReceivedStream {
  writer: SnapshotWriter;
  prologue: PrologueEvent;
  ramSetup: RamSetupEvent;
  deviceTail: Buffer;
  summary: StreamSummary;
  streamBytes: number;
  /** performance.now() of the first byte and of the end of the stream. */
  firstByteAt: number;
  endAt: number;
}

export interface ReceiverOptions {
  /** The stream directory (private to qsnap): the socket or the placeholder's pid file. */
  dir: string;
  transport: StreamTransport;
  out: string;
  overwrite: boolean;
  onWriterCreated: (writer: SnapshotWriter) => void;
  onProgress: (doneBytes: number, totalBytes: number) => void;
  /** The stream reached the device state (all RAM was sent). */
  onDeviceTail?: () => void;
  /** Read the stream no faster than this (bytes per second). */
  maxBytesPerSecond?: number | undefined;
  /**
   * Asked when QEMU connects: whether a failure must hand the stream to a drain guard (a
   * background snapshot) or may simply close it (a pre-copy migration fails cleanly).
   */
  needsDrainGuard: () => boolean;
  /** Test-only (faults.ts): fail, or hang, once this many bytes of the stream arrived. */
  fault?: { afterBytes: number; kind: 'error' | 'hang' } | undefined;
}

/** A pipe read shorter than this is followed by PIPE_FILL_MS without reading (letPipeFill). */
const BATCH_READ_BYTES = 256 * 1024;
const PIPE_FILL_MS = 1;

/** Pages held in memory while the snapshot file is created (32 MiB), before the socket is paused. */
const MAX_PENDING_PAGES = 8192;

/** A page parsed before the file writer existed. */
interface PendingPage {
  blockIndex: number;
  offset: number;
  data: Buffer | undefined;
}

/**
 * Listens on a unix socket for QEMU's outgoing migration, parses the stream as it arrives
 * and writes every page to its place in the snapshot file. Holds the socket (backpressure)
 * while the file writer catches up, so memory stays bounded whatever the stream's speed.
 * Once QEMU has connected, a failure hands the rest of a background snapshot's stream to a
 * drain guard (drain-guard.ts): a begun background snapshot is never cut off. A pre-copy
 * stream is closed instead: QEMU fails the migration and resumes a guest it stopped.
 */
export class StreamReceiver {
  readonly done: Promise<ReceivedStream>;
  /**
   * Resolves when the first RAM PART section arrives: QEMU has captured the device state and
   * write-protected RAM (migration.c, bg_migration_thread), so the guest may run again.
   */
  readonly captured: Promise<void>;
  private onCaptured!: () => void;
  private settle!: { resolve: (r: ReceivedStream) => void; reject: (err: unknown) => void };
  private server: Server | undefined;
  private socket: Socket | undefined;
  private pipe: HeldPipe | undefined;
  private closed = false;
  private guard: DrainGuard | undefined;
  private listeningGuard: DrainGuard | undefined;
  private writer: SnapshotWriter | undefined;
  private creating: Promise<void> | undefined;
  private pending: PendingPage[] = [];
  private prologue: PrologueEvent | undefined;
  private ramSetup: RamSetupEvent | undefined;
  private deviceTail: Buffer | undefined;
  private summary: StreamSummary | undefined;
  private bytes = 0;
  private pagesSeen = 0;
  private totalBytes = 0;
  private lastProgressAt = 0;
  private firstByteAt = 0;
  private failed = false;
  private rate: ReadRateLimit;

  constructor(private readonly options: ReceiverOptions) {
    this.done = new Promise((resolve, reject) => {
      this.settle = { resolve, reject };
    });
    this.done.catch(() => undefined);
    this.captured = new Promise((resolve) => {
      this.onCaptured = resolve;
    });
    this.rate = new ReadRateLimit(options.maxBytesPerSecond);
  }

  /** The `migrate` URI that sends the stream here. */
  get uri(): string {
    return this.options.transport === 'pipe'
      ? `exec:${placeholderCommand(this.pidFile)}`
      : `unix:${this.socketPath}`;
  }

  private get socketPath(): string {
    return join(this.options.dir, 'migration.sock');
  }

  private get pidFile(): string {
    return join(this.options.dir, PLACEHOLDER_PID_FILE);
  }

  /** Be ready for `migrate` (the socket listening, or the pipe's guard started). */
  async listen(): Promise<void> {
    if (this.options.transport === 'pipe') {
      if (this.options.needsDrainGuard())
        this.guard = DrainGuard.spawnForPipe(this.pidFile, () => this.guardHoldsPipe());
      return;
    }
    const server = createServer({ pauseOnConnect: true }, (socket) => this.accept(socket));
    this.server = server;
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(this.socketPath, () => {
        server.off('error', reject);
        // Before `migrate`: a kill of qsnap before it accepts QEMU's connection is covered too.
        if (this.options.needsDrainGuard()) this.listeningGuard = DrainGuard.spawnListening(server);
        resolve();
      });
    });
  }

  /** Stop accepting, hand the stream to the guard, remove the partial file; idempotent. */
  async abort(reason: unknown): Promise<void> {
    this.fail(reason);
    await this.creating?.catch(() => undefined);
    await this.writer?.abort(reason);
  }

  /** Read as fast as QEMU sends from now on (the --max-bandwidth limit no longer applies). */
  liftRateLimit(): void {
    this.rate = new ReadRateLimit(undefined);
  }

  /**
   * `migrate` returned: over a pipe, open it (QEMU has started the placeholder) and read it.
   * Failures go to `done`; a placeholder that never comes is given up by close().
   */
  attach(): void {
    if (this.options.transport !== 'pipe') return;
    this.attaching = openPlaceholderPipe(this.pidFile).then(
      (pipe) => {
        if (this.closed || this.failed) {
          // Failed while QEMU started it: a background snapshot's guard takes the pipe (and
          // kills the placeholder itself); otherwise it must go, or the migration stays
          // blocked on a pipe nobody reads.
          if (!this.guard) killPlaceholder(pipe);
          closeSync(pipe.fd);
          return;
        }
        this.pipe = pipe;
        // Without a guard, or with one that holds the pipe already, the placeholder can go.
        if (!this.guard || this.guardHolds) killPlaceholder(pipe);
        const parser = new MigrationStreamParser(this.sink());
        const reader = readFdIntoReusedBuffer(pipe.fd, (chunk) => this.onData(reader, parser, chunk));
        this.startReading(reader, parser);
      },
      (err: unknown) =>
        this.fail(
          new SnapshotError(
            'QSNAP_SNAPSHOT_MIGRATION',
            `cannot read the migration pipe: ${(err as Error).message}`,
            { hint: 'run qsnap as the user QEMU runs as, or with --transport unix', cause: err },
          ),
        ),
    );
  }

  /** attach() opening the pipe; close() waits for it, so no placeholder outlives the receiver. */
  private attaching: Promise<void> | undefined;
  private guardHolds = false;
  /** The socket is paused by backpressure (applyBackpressure), which resumes it. */
  private held = false;
  private capturedSeen = false;

  private guardHoldsPipe(): void {
    this.guardHolds = true;
    if (this.pipe) killPlaceholder(this.pipe);
  }

  async close(): Promise<void> {
    this.closed = true;
    if (!this.failed) this.guard?.dismiss();
    this.dismissListeningGuard();
    this.socket?.destroy();
    // QEMU's end of an exec: migration waits for the placeholder to exit; after a failure, a
    // guard that does not hold the pipe yet still needs it (it kills it itself).
    await this.attaching;
    if (this.pipe && (!this.failed || !this.guard)) killPlaceholder(this.pipe);
    await new Promise<void>((resolve) => (this.server ? this.server.close(() => resolve()) : resolve()));
    if (this.options.transport === 'unix') await rm(this.socketPath, { force: true });
  }

  private accept(socket: Socket): void {
    if (this.socket) {
      // One migration per receiver: a second connection is not QEMU's.
      socket.destroy();
      return;
    }
    this.socket = socket;
    this.server?.close();
    if (this.options.needsDrainGuard()) this.guard = DrainGuard.spawn(socket);
    this.dismissListeningGuard();
    if (this.failed) {
      // qsnap failed between `migrate` and this connection: QEMU's background snapshot may
      // already be under way, so it must be drained like any other (never just dropped).
      // A pre-copy migration is just closed.
      this.handOff();
      return;
    }
    const parser = new MigrationStreamParser(this.sink());
    const reader = readIntoReusedBuffer(socket, (chunk) => this.onData(reader, parser, chunk));
    this.startReading(reader, parser);
  }

  private startReading(reader: Socket, parser: MigrationStreamParser): void {
    this.socket = reader;
    reader.on('end', () => this.onEnd(parser));
    reader.on('error', (err) =>
      this.fail(
        new SnapshotError('QSNAP_SNAPSHOT_MIGRATION', `migration stream failed: ${err.message}`, {
          cause: err,
        }),
      ),
    );
    reader.resume();
  }

  /** The listening socket's guard is not needed once qsnap holds the connection (or gave up). */
  private dismissListeningGuard(): void {
    this.listeningGuard?.dismiss();
    this.listeningGuard = undefined;
  }

  private onData(socket: Socket, parser: MigrationStreamParser, chunk: Buffer): void {
    if (this.failed) return;
    if (this.bytes === 0) this.firstByteAt = performance.now();
    this.bytes += chunk.length;
    if (this.options.fault && this.bytes > this.options.fault.afterBytes && this.strikeFault()) return;
    try {
      parser.feedBorrowed(chunk);
    } catch (err) {
      this.fail(err);
      return;
    }
    const held = this.applyBackpressure(socket);
    // Not before the capture: on QEMU >= 9.0 the guest resumes only when qsnap has seen it.
    if (!held && this.pipe && this.capturedSeen && chunk.length < BATCH_READ_BYTES) this.letPipeFill(socket);
    this.reportProgress(false);
  }

  /**
   * QEMU writes a page at a time; a reader that reads as soon as anything is there wakes once
   * per page, and on two cores those wake-ups are CPU taken from QEMU's migration thread
   * (perf: a quarter of qsnap's CPU in the scheduler). After a short read, wait a little and
   * take what QEMU wrote meanwhile in one read: the pipe holds 1 MiB (placeholderCommand).
   */
  private letPipeFill(socket: Socket): void {
    socket.pause();
    setTimeout(() => {
      if (!this.failed && !this.held) socket.resume();
    }, PIPE_FILL_MS);
  }

  private onEnd(parser: MigrationStreamParser): void {
    if (this.failed) return;
    try {
      parser.end();
    } catch (err) {
      this.fail(err);
      return;
    }
    void this.complete();
  }

  /** The test-only stream fault (faults.ts); true when the receiver failed. */
  private strikeFault(): boolean {
    if (this.options.fault?.kind === 'hang') hangForever();
    this.fail(
      new SnapshotError('QSNAP_SNAPSHOT_OUTPUT', 'injected fault: the snapshot file could not be written'),
    );
    return true;
  }

  private reportProgress(force: boolean): void {
    const now = performance.now();
    if (!force && (now - this.lastProgressAt <= 100 || this.totalBytes === 0)) return;
    this.lastProgressAt = now;
    // Pre-copy resends dirtied pages: count no more than all of RAM.
    this.options.onProgress(Math.min(this.pagesSeen * 4096, this.totalBytes), this.totalBytes);
  }

  /**
   * Pause the socket while the file writer catches up or the stream is ahead of its rate limit;
   * true when it did.
   */
  private applyBackpressure(socket: Socket): boolean {
    // While the file is being created the stream goes on into memory, up to a bound: the first
    // RAM section — QEMU's signal that the guest may run again — must not wait for a slow disk
    // to create a file (measured: 199 ms of pause on a 16 MB/s disk when it did).
    const creating = this.creating && this.pending.length > MAX_PENDING_PAGES ? this.creating : undefined;
    const writer = creating ?? (this.writer?.needsDrain ? this.writer.onceDrained() : undefined);
    const aheadMs = this.rate.delayMs(this.bytes, this.firstByteAt);
    if (!writer && aheadMs <= 0) return false;
    socket.pause();
    this.held = true;
    Promise.all([writer, aheadMs > 0 ? sleep(aheadMs) : undefined]).then(
      () => {
        this.held = false;
        if (!this.failed) socket.resume();
      },
      (err) => this.fail(err),
    );
    return true;
  }

  private async complete(): Promise<void> {
    try {
      await this.creating;
      if (!this.writer || !this.prologue || !this.ramSetup || !this.summary || !this.deviceTail) {
        throw new SnapshotError(
          'QSNAP_SNAPSHOT_MIGRATION',
          'the migration stream ended before any RAM was sent',
          {
            hint: 'check the QEMU log for the migration error',
          },
        );
      }
      this.reportProgress(true);
      this.settle.resolve({
        writer: this.writer,
        prologue: this.prologue,
        ramSetup: this.ramSetup,
        deviceTail: this.deviceTail,
        summary: this.summary,
        streamBytes: this.bytes,
        firstByteAt: this.firstByteAt,
        endAt: performance.now(),
      });
    } catch (err) {
      this.fail(err);
    }
  }

  private fail(err: unknown): void {
    if (this.failed) return;
    this.failed = true;
    // qsnap lives on: a connection still to come is accepted and handed off by accept().
    this.dismissListeningGuard();
    this.handOff();
    this.settle.reject(err);
  }

  /** Hand the rest of the stream to the guard, then let go of it. */
  private handOff(): void {
    this.guard?.drain();
    this.socket?.destroy();
  }

  /** The file writer exists once the block list is known: pages parsed before wait for it. */
  private createWriter(setup: RamSetupEvent): void {
    this.ramSetup = setup;
    this.totalBytes = setup.blocks.reduce((sum, b) => sum + b.usedLength, 0);
    this.creating = SnapshotWriter.create(this.options.out, {
      blocks: setup.blocks.map((b) => ({ name: b.idstr, usedLength: b.usedLength })),
      overwrite: this.options.overwrite,
    }).then((writer) => {
      this.writer = writer;
      this.creating = undefined;
      this.options.onWriterCreated(writer);
      for (const page of this.pending) this.writePage(page.blockIndex, page.offset, page.data);
      this.pending = [];
    });
    this.creating.catch((err) => this.fail(err));
  }

  /** A data page (zero page when `data` is undefined), to the file or the pending list. */
  private writePage(blockIndex: number, offset: number, data: Buffer | undefined): void {
    if (!this.writer) this.pending.push({ blockIndex, offset, data: data && Buffer.from(data) });
    else if (data) this.writer.writePage(blockIndex, offset, data);
    else this.writer.writeZeroPage(blockIndex, offset);
  }

  private sink(): StreamSink {
    return {
      onPrologue: (p) => {
        this.prologue = p;
      },
      onRamSetup: (setup) => this.createWriter(setup),
      onPage: (blockIndex, offset, data) => {
        this.pagesSeen++;
        this.writePage(blockIndex, offset, data);
      },
      onZeroPage: (blockIndex, offset) => {
        this.pagesSeen++;
        this.writePage(blockIndex, offset, undefined);
      },
      onRamPart: (index) => {
        if (index === 0) {
          this.capturedSeen = true;
          this.onCaptured();
        }
      },
      onDeviceTailStart: () => this.options.onDeviceTail?.(),
      onEnd: (summary, deviceTail) => {
        this.summary = summary;
        this.deviceTail = deviceTail;
      },
    };
  }
}
