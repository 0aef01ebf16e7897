import { once } from 'node:events';
import type { Socket } from 'node:net';
import type { SnapshotReader } from '../../format/index.js';
import {
  type RamPageRun,
  type SectionPool,
  tryDecodePrologue,
  writeMigrationStream,
} from '../../stream/index.js';
import { RestoreError } from '../errors.js';

/**
 * A snapshot file turned back into the QEMU migration stream it came from: the original
 * prologue and device state verbatim, RAM pages read (and checked) from the file. With
 * `skipMainBlock` the main RAM block is left out (lazy restore maps it from the file).
 */
export async function* snapshotStream(
  reader: SnapshotReader,
  options: {
    skipMainBlock: boolean;
    verify: boolean | 'data';
    /**
     * The destination's main RAM block is known to be all zeros (fresh anonymous memory, no ROM
     * loaded into it): its zero pages are not sent. QEMU's loader leaves a page it is not sent
     * as it is (ram.c, ram_load_precopy), and a zero page it is sent costs it a page fault.
     */
    mainBlockZeroed?: boolean;
    /** Section buffers to reuse (the consumer gives back what it has written). */
    sections?: SectionPool;
  },
): AsyncGenerator<Buffer> {
  const stored = await reader.readPrologue();
  const header = tryDecodePrologue(stored, 0);
  if (!header)
    throw new RestoreError('QSNAP_RESTORE_FORMAT', 'the snapshot has no valid stream header', {
      hint: 'run qsnap verify on it',
    });
  const deviceTail = await reader.readDeviceTail();
  yield* writeMigrationStream({
    prologue: stored.subarray(0, header.size),
    ramSetup: { bytes: stored.subarray(header.size) },
    deviceTail,
    ...(options.sections ? { sections: options.sections } : {}),
    pages: (_block, index) => {
      if (index === 0 && options.skipMainBlock) return 'skip';
      return blockRuns(reader, index, options.verify, index === 0 && options.mainBlockZeroed === true);
    },
  });
}

/**
 * Reads of this size stay in the CPU's cache from the read through the CRC to the copy into a
 * section; 8 MiB runs went to memory and back three times (measured: ~20 % more CPU).
 */
const STREAM_RUN_BYTES = 256 * 1024;

async function* blockRuns(
  reader: SnapshotReader,
  blockIndex: number,
  verify: boolean | 'data',
  omitZeroPages: boolean,
): AsyncGenerator<RamPageRun> {
  for await (const run of reader.readPages(blockIndex, { verify, maxRunBytes: STREAM_RUN_BYTES })) {
    if (run.kind === 'data') yield { offset: run.offset, data: run.data };
    else if (!omitZeroPages) yield { offset: run.offset, zeroPages: run.pageCount };
  }
}

/**
 * Write `chunks` to `socket` with backpressure, then end it; rejects if the peer closes first.
 * Each chunk goes back to `sections` once the kernel has it.
 */
export async function feed(
  socket: Socket,
  chunks: AsyncIterable<Buffer>,
  sections?: SectionPool,
): Promise<void> {
  // Listened for before the first write: QEMU exits as soon as it refuses the stream, and a
  // socket that closed while nobody waited for 'drain' would otherwise leave this loop waiting forever.
  let cause: Error | undefined;
  const gone = new Promise<never>((_, reject) => {
    socket.on('error', (err) => {
      cause ??= err;
    });
    socket.once('close', () => reject(cause ?? new Error('QEMU closed the incoming migration socket')));
  });
  gone.catch(() => undefined);
  for await (const chunk of chunks) {
    const written = socket.write(chunk, sections ? () => sections.give(chunk) : undefined);
    if (!written) await Promise.race([once(socket, 'drain'), gone]);
  }
  await new Promise<void>((resolve) => socket.end(resolve));
}

/**
 * `chunks`, pulled up to `maxBytes` ahead from now on: a full restore builds the start of its
 * stream while QEMU starts up (node is idle then, and QEMU uses the other core). `discard()`
 * stops it and drops what it pulled.
 */
export class PulledAhead implements AsyncIterable<Buffer> {
  readonly #source: AsyncIterator<Buffer>;
  readonly #chunks: Buffer[] = [];
  readonly #pulling: Promise<void>;
  #error: unknown;
  #done = false;
  #stop = false;

  constructor(chunks: AsyncIterable<Buffer>, maxBytes: number) {
    this.#source = chunks[Symbol.asyncIterator]();
    this.#pulling = this.#pull(maxBytes);
  }

  async #pull(maxBytes: number): Promise<void> {
    let bytes = 0;
    try {
      while (!this.#stop && bytes < maxBytes) {
        const next = await this.#source.next();
        if (next.done) {
          this.#done = true;
          return;
        }
        this.#chunks.push(next.value);
        bytes += next.value.length;
      }
    } catch (err) {
      this.#error = err;
      this.#done = true;
    }
  }

  async *[Symbol.asyncIterator](): AsyncGenerator<Buffer> {
    await this.#pulling;
    yield* this.#chunks.splice(0);
    if (this.#error) throw this.#error;
    if (this.#done) return;
    for (;;) {
      const next = await this.#source.next();
      if (next.done) return;
      yield next.value;
    }
  }

  async discard(): Promise<void> {
    this.#stop = true;
    await this.#pulling;
    this.#chunks.length = 0;
    await this.#source.return?.();
  }
}
