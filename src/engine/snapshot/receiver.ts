import { type ChildProcess, spawn } from 'node:child_process';
import { rm } from 'node:fs/promises';
import { createServer, type Server, type Socket } from 'node:net';
import type { Writable } from 'node:stream';
import { setTimeout as sleep } from 'node:timers/promises';
import { type SnapshotWriter, SnapshotWriter as Writer } from '../../format/index.js';
import {
  MigrationStreamParser,
  type PrologueEvent,
  type RamSetupEvent,
  type StreamSink,
  type StreamSummary,
} from '../../stream/index.js';
import { SnapshotError } from '../errors.js';
import { activeFaults, faultPoint } from '../faults.js';

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
  socketPath: string;
  out: string;
  overwrite: boolean;
  onWriterCreated: (writer: SnapshotWriter) => void;
  onProgress: (doneBytes: number, totalBytes: number) => void;
  /** Read the stream no faster than this (bytes per second). */
  maxBytesPerSecond?: number | undefined;
}

/**
 * Listens on a unix socket for QEMU's outgoing migration, parses the stream as it arrives
 * and writes every page to its place in the snapshot file. Holds the socket (backpressure)
 * while the file writer catches up, so memory stays bounded whatever the stream's speed.
 *
 * A background snapshot, once begun, must be read to its end. QEMU 7.2 leaves guest RAM
 * write-protected with nobody to resolve the faults when the stream breaks or the migration
 * is cancelled: the guest hangs for good and QEMU refuses further background snapshots
 * (measured here; newer QEMUs stop the write tracking on every exit path). So a failure
 * here never closes the stream: a drain guard — a small detached process holding a copy of
 * the socket — reads the rest to /dev/null. It starts when told to, or by itself when qsnap
 * dies (even by SIGKILL), because the pipe it waits on then reaches end-of-file.
 */
/**
 * The drain guard: a small Node process holding the migration socket as its fd 4 and a pipe
 * from qsnap as its fd 3. It reads nothing until a line arrives on the pipe or the pipe
 * reaches end-of-file (qsnap died); then it reads the socket to its end and exits. The socket
 * is passed as fd 4, not as stdin: libuv makes a child's fds 0–2 blocking, and the flag is
 * shared with qsnap's own descriptor of the socket.
 */
const DRAIN_GUARD = `// qsnap drain guard
process.title = 'qsnap-drain-guard';
const net = require('node:net');
let draining = false;
function drain() {
  if (draining) return;
  draining = true;
  const stream = new net.Socket({ fd: 4, readable: true, writable: false });
  stream.on('data', () => {});
  stream.on('end', () => process.exit(0));
  stream.on('error', () => process.exit(0));
}
const control = new net.Socket({ fd: 3, readable: true, writable: false });
control.on('data', drain);
control.on('end', drain);
control.on('error', drain);
`;

function spawnDrainGuard(socket: Socket): ChildProcess {
  return spawn(process.execPath, ['-e', DRAIN_GUARD], {
    stdio: ['ignore', 'ignore', 'ignore', 'pipe', socket],
    detached: true,
  });
}

export class StreamReceiver {
  readonly done: Promise<ReceivedStream>;
  /**
   * Resolves when the first RAM PART section arrives: QEMU has captured the device state and
   * write-protected RAM (migration.c, bg_migration_thread), so the guest may run again.
   */
  readonly captured: Promise<void>;
  private onCaptured!: () => void;
  private server: Server | undefined;
  private socket: Socket | undefined;
  private writer: SnapshotWriter | undefined;
  private creating: Promise<void> | undefined;
  /** Pages parsed before the writer existed (at most one socket chunk). */
  private pending: { blockIndex: number; offset: number; data: Buffer | undefined }[] = [];
  private prologue: PrologueEvent | undefined;
  private ramSetup: RamSetupEvent | undefined;
  private readonly tail: Buffer[] = [];
  private summary: StreamSummary | undefined;
  private bytes = 0;
  private pagesSeen = 0;
  private totalBytes = 0;
  private lastProgressAt = 0;
  private firstByteAt = 0;
  private settle!: { resolve: (r: ReceivedStream) => void; reject: (err: unknown) => void };
  private failed = false;
  private guard: ChildProcess | undefined;

  /** Test-only fault points, read once: the data handler runs for every chunk of the stream. */
  private readonly faults = activeFaults();

  constructor(private readonly options: ReceiverOptions) {
    this.done = new Promise((resolve, reject) => {
      this.settle = { resolve, reject };
    });
    this.done.catch(() => undefined);
    this.captured = new Promise((resolve) => {
      this.onCaptured = resolve;
    });
  }

  async listen(): Promise<void> {
    const server = createServer({ pauseOnConnect: true }, (socket) => this.accept(socket));
    this.server = server;
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(this.options.socketPath, () => {
        server.off('error', reject);
        resolve();
      });
    });
  }

  /** Stop accepting, drop the connection, remove the partial file; idempotent. */
  async abort(reason: unknown): Promise<void> {
    this.fail(reason);
    await this.creating?.catch(() => undefined);
    await this.writer?.abort(reason);
  }

  async close(): Promise<void> {
    if (!this.failed) this.guard?.kill('SIGKILL');
    this.socket?.destroy();
    await new Promise<void>((resolve) => (this.server ? this.server.close(() => resolve()) : resolve()));
    await rm(this.options.socketPath, { force: true });
  }

  private accept(socket: Socket): void {
    if (this.socket) {
      // One migration per receiver: a second connection is not QEMU's.
      socket.destroy();
      return;
    }
    this.socket = socket;
    this.server?.close();
    this.guard = spawnDrainGuard(socket);
    this.guard.on('error', () => undefined);
    this.guard.unref();
    (this.guard.stdio[3] as unknown as Socket | undefined)?.unref?.();
    if (this.failed) {
      // qsnap failed between `migrate` and this connection: QEMU's background snapshot may
      // already be under way, so it must be drained like any other (never just dropped).
      this.handOff();
      return;
    }
    const parser = new MigrationStreamParser(this.sink());
    socket.on('data', (chunk: Buffer) => {
      if (this.failed) return;
      if (this.bytes === 0) this.firstByteAt = performance.now();
      this.bytes += chunk.length;
      if (this.faults.size > 0 && this.bytes > 20 * 2 ** 20) faultPoint('stream-hang', this.faults);
      if (this.faults.size > 0 && this.bytes > 20 * 2 ** 20 && faultPoint('stream-error', this.faults)) {
        this.fail(
          new SnapshotError(
            'QSNAP_SNAPSHOT_OUTPUT',
            'injected fault: the snapshot file could not be written',
          ),
        );
        return;
      }
      try {
        parser.feed(chunk);
      } catch (err) {
        this.fail(err);
        return;
      }
      this.applyBackpressure(socket);
      const now = performance.now();
      if (now - this.lastProgressAt > 100 && this.totalBytes > 0) {
        this.lastProgressAt = now;
        this.options.onProgress(this.pagesSeen * 4096, this.totalBytes);
      }
    });
    socket.on('end', () => {
      if (this.failed) return;
      try {
        parser.end();
      } catch (err) {
        this.fail(err);
        return;
      }
      void this.complete();
    });
    socket.on('error', (err) =>
      this.fail(
        new SnapshotError('QSNAP_SNAPSHOT_MIGRATION', `migration stream failed: ${err.message}`, {
          cause: err,
        }),
      ),
    );
    socket.resume();
  }

  private applyBackpressure(socket: Socket): void {
    const writer = this.creating ?? (this.writer?.needsDrain ? this.writer.onceDrained() : undefined);
    const aheadMs = this.aheadOfRateMs();
    if (!writer && aheadMs <= 0) return;
    const wait = Promise.all([writer, aheadMs > 0 ? sleep(aheadMs) : undefined]);
    socket.pause();
    wait.then(
      () => {
        if (!this.failed) socket.resume();
      },
      (err) => this.fail(err),
    );
  }

  /**
   * How far the stream is ahead of --max-bandwidth. QEMU 7.2 ignores max-bandwidth for a
   * background snapshot (measured: 20 MiB/s set, 50–70 MiB/s sent), so qsnap enforces it by
   * reading no faster.
   */
  private aheadOfRateMs(): number {
    const rate = this.options.maxBytesPerSecond;
    if (!rate) return 0;
    const ahead = (this.bytes / rate) * 1000 - (performance.now() - this.firstByteAt);
    return ahead > 5 ? ahead : 0;
  }

  private async complete(): Promise<void> {
    try {
      await this.creating;
      if (!this.writer || !this.prologue || !this.ramSetup || !this.summary) {
        throw new SnapshotError(
          'QSNAP_SNAPSHOT_MIGRATION',
          'the migration stream ended before any RAM was sent',
          {
            hint: 'check the QEMU log for the migration error',
          },
        );
      }
      this.options.onProgress(this.pagesSeen * 4096, this.totalBytes);
      this.settle.resolve({
        writer: this.writer,
        prologue: this.prologue,
        ramSetup: this.ramSetup,
        deviceTail: Buffer.concat(this.tail),
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
    this.handOff();
    this.settle.reject(err);
  }

  /** Hand the rest of the stream to the guard (see the class comment), then let go of it. */
  private handOff(): void {
    const control = this.guard?.stdio[3] as Writable | null | undefined;
    if (control?.writable) control.end('\n');
    this.socket?.destroy();
  }

  private sink(): StreamSink {
    return {
      onPrologue: (p) => {
        this.prologue = p;
      },
      onRamSetup: (setup) => {
        this.ramSetup = setup;
        this.totalBytes = setup.blocks.reduce((sum, b) => sum + b.usedLength, 0);
        this.creating = Writer.create(this.options.out, {
          blocks: setup.blocks.map((b) => ({ name: b.idstr, usedLength: b.usedLength })),
          overwrite: this.options.overwrite,
        }).then((writer) => {
          this.writer = writer;
          this.creating = undefined;
          this.options.onWriterCreated(writer);
          for (const page of this.pending) {
            if (page.data) writer.writePage(page.blockIndex, page.offset, page.data);
            else writer.writeZeroPage(page.blockIndex, page.offset);
          }
          this.pending = [];
        });
        this.creating.catch((err) => this.fail(err));
      },
      onPage: (blockIndex, offset, data) => {
        this.pagesSeen++;
        if (this.writer) this.writer.writePage(blockIndex, offset, data);
        else this.pending.push({ blockIndex, offset, data: Buffer.from(data) });
      },
      onZeroPage: (blockIndex, offset) => {
        this.pagesSeen++;
        if (this.writer) this.writer.writeZeroPage(blockIndex, offset);
        else this.pending.push({ blockIndex, offset, data: undefined });
      },
      onRamPart: (index) => {
        if (index === 0) this.onCaptured();
      },
      onDeviceTail: (chunk) => {
        this.tail.push(Buffer.from(chunk));
      },
      onEnd: (summary) => {
        this.summary = summary;
      },
    };
  }
}
