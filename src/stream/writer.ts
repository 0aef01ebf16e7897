/**
 * Re-synthesizes a QEMU migration stream that `qemu -incoming` loads: the original header and
 * configuration, a RAM START section with the block list, PART sections with the pages, then
 * the original device tail verbatim. QEMU's loader does not need every page, nor a RAM END
 * section, nor particular section ids (migration/ram.c, ram_load_precopy; savevm.c,
 * qemu_loadvm_state_main): blocks that a restore maps from a file simply get no pages.
 *
 * The output is an async generator of Buffers, one per section, so a consumer that awaits each
 * write (stream.pipeline, Readable.from) gets backpressure for free.
 */
import {
  EOS_BYTES,
  encodeRamSetupSection,
  FOOTER_BYTES,
  MAX_RECORD_HEADER_BYTES,
  PAGE_SIZE,
  SectionType,
  tryDecodePrologue,
  tryDecodeRamSetupSection,
  writeEos,
  writeFooter,
  writePageRecord,
  writeSectionHeader,
  writeZeroRecord,
} from './codec.js';
import { StreamError } from './errors.js';
import type { RamBlock, RamPageRun, RamSetup } from './types.js';

/** Pages of one block, or 'skip' to send none (a block a restore maps from a file). */
export type RamPageSource = (
  block: RamBlock,
  blockIndex: number,
) => AsyncIterable<RamPageRun> | Iterable<RamPageRun> | 'skip';

export interface MigrationStreamInput {
  /** Exact header + configuration bytes (PrologueEvent.bytes). */
  prologue: Buffer;
  /** The RAM START section: its verbatim bytes (RamSetupEvent.bytes), or a setup to encode. */
  ramSetup: { bytes: Buffer } | RamSetup;
  pages: RamPageSource;
  /** The device tail, verbatim: FULL sections, EOF, VMDESCRIPTION. */
  deviceTail: Buffer | Iterable<Buffer> | AsyncIterable<Buffer>;
  /** Largest PART section (default 1 MiB, or the pool's section size). */
  maxSectionBytes?: number;
  /**
   * Where PART section buffers come from: a consumer that gives each yielded chunk back once it
   * is done with it (written to a socket) lets the next sections reuse its memory.
   */
  sections?: SectionPool;
}

/**
 * PART section buffers for reuse. Building a stream of fresh 1 MiB buffers costs more in garbage
 * collection and first-touch page faults than filling them (a restore profile: GC 25 %).
 * `give` takes any chunk of the stream and keeps only the section buffers this pool handed out.
 */
export class SectionPool {
  readonly sectionBytes: number;
  readonly #free: Buffer[] = [];
  /** Memory of the sections handed out and not yet given back. */
  readonly #out = new WeakSet<ArrayBufferLike>();
  readonly #maxFree: number;

  constructor(sectionBytes = 1024 * 1024, maxFree = 32) {
    this.sectionBytes = sectionBytes;
    this.#maxFree = maxFree;
  }

  take(): Buffer {
    const buf = this.#free.pop() ?? Buffer.allocUnsafeSlow(this.sectionBytes);
    this.#out.add(buf.buffer);
    return buf;
  }

  /** `chunk` (a yielded chunk) is no longer used by the consumer. */
  give(chunk: Buffer): void {
    if (!this.#out.delete(chunk.buffer) || this.#free.length >= this.#maxFree) return;
    this.#free.push(Buffer.from(chunk.buffer, 0, this.sectionBytes));
  }
}

const MIN_SECTION_BYTES = 5 + MAX_RECORD_HEADER_BYTES + PAGE_SIZE + EOS_BYTES + FOOTER_BYTES;

/** The stream as Buffers: prologue, START, PART sections of at most maxSectionBytes, tail. */
export async function* writeMigrationStream(
  input: MigrationStreamInput,
): AsyncGenerator<Buffer, void, undefined> {
  const maxSectionBytes = input.maxSectionBytes ?? input.sections?.sectionBytes ?? 1024 * 1024;
  if (input.sections && input.sections.sectionBytes < maxSectionBytes) {
    throw new RangeError('the section pool holds buffers smaller than maxSectionBytes');
  }
  if (maxSectionBytes < MIN_SECTION_BYTES) {
    throw new RangeError(`maxSectionBytes must be at least ${MIN_SECTION_BYTES}`);
  }
  // The prologue ends where the next section's type byte starts; give the decoder one.
  const prologue = tryDecodePrologue(Buffer.concat([input.prologue, Buffer.of(SectionType.START)]), 0);
  if (!prologue || prologue.size !== input.prologue.length) {
    throw writerError('the prologue bytes are not exactly a stream header and configuration');
  }
  const ignoreShared = prologue.capabilities.includes('x-ignore-shared');
  const { setup, bytes: startBytes } = resolveRamSetup(input.ramSetup, ignoreShared);

  yield input.prologue;
  yield startBytes;

  const parts = new PartSectionBuilder(setup.sectionId, setup.footers, maxSectionBytes, input.sections);
  for (const [index, block] of setup.blocks.entries()) {
    const source = input.pages(block, index);
    if (source === 'skip') continue;
    const idstr = Buffer.from(block.idstr, 'latin1');
    for await (const run of source) {
      const count = checkRun(block, run);
      for (let i = 0; i < count; i++) {
        const full = parts.reserve(idstr);
        if (full) yield full;
        if ('data' in run) parts.page(run.offset + i * PAGE_SIZE, run.data, i * PAGE_SIZE);
        else parts.zero(run.offset + i * PAGE_SIZE);
      }
    }
  }
  const last = parts.flush();
  if (last) yield last;

  yield* deviceTail(input.deviceTail);
}

function resolveRamSetup(ramSetup: MigrationStreamInput['ramSetup'], ignoreShared: boolean) {
  if ('bytes' in ramSetup) {
    // The START section, ended by its footer or by the next section's type byte.
    const decoded = tryDecodeRamSetupSection(
      Buffer.concat([ramSetup.bytes, Buffer.of(SectionType.EOF)]),
      0,
      0,
      {
        ignoreShared,
      },
    );
    if (!decoded || decoded.size !== ramSetup.bytes.length) {
      throw writerError('the RAM setup bytes are not exactly one RAM START section');
    }
    return { setup: decoded as RamSetup, bytes: ramSetup.bytes };
  }
  if (ramSetup.ignoreShared !== ignoreShared) {
    throw writerError('the RAM setup and the prologue disagree about x-ignore-shared');
  }
  return { setup: ramSetup, bytes: encodeRamSetupSection(ramSetup) };
}

/** Number of pages in the run, after checking it fits its block. */
function checkRun(block: RamBlock, run: RamPageRun): number {
  const count = 'data' in run ? run.data.length / PAGE_SIZE : run.zeroPages;
  if (!Number.isInteger(count) || count < 0) {
    throw writerError(`block ${block.idstr}: a page run must hold whole 4096-byte pages`);
  }
  if (run.offset % PAGE_SIZE !== 0 || run.offset < 0 || run.offset + count * PAGE_SIZE > block.usedLength) {
    throw writerError(
      `block ${block.idstr}: pages at 0x${run.offset.toString(16)} (+${count}) are not page-aligned within 0x${block.usedLength.toString(16)}`,
    );
  }
  return count;
}

async function* deviceTail(tail: MigrationStreamInput['deviceTail']): AsyncGenerator<Buffer> {
  const chunks = Buffer.isBuffer(tail) ? [tail] : tail;
  let first = true;
  for await (const chunk of chunks) {
    if (chunk.length === 0) continue;
    if (first && chunk[0] !== SectionType.FULL && chunk[0] !== SectionType.EOF) {
      throw writerError('the device tail must start with a FULL section or EOF');
    }
    first = false;
    yield chunk;
  }
  if (first) throw writerError('the device tail is empty');
}

function writerError(message: string): StreamError {
  return new StreamError('QSNAP_STREAM_FORMAT', message, {
    hint: 'this is a bug in qsnap or a damaged snapshot file',
  });
}

/**
 * Fills one PART section at a time. The first record of a section names its block, as does a
 * record whose block differs from the previous one; the others carry CONTINUE.
 */
class PartSectionBuilder {
  private buf: Buffer | undefined;
  private pos = 0;
  private current: Buffer | undefined;
  private blockIdstr: Buffer | undefined;

  constructor(
    private readonly sectionId: number,
    private readonly footers: boolean,
    private readonly maxBytes: number,
    private readonly pool: SectionPool | undefined,
  ) {}

  /** Make room for one record of block `idstr`; returns a finished section when it had to close one. */
  reserve(idstr: Buffer): Buffer | undefined {
    let full: Buffer | undefined;
    if (
      this.buf &&
      this.pos + MAX_RECORD_HEADER_BYTES + PAGE_SIZE + EOS_BYTES + FOOTER_BYTES > this.maxBytes
    ) {
      full = this.flush();
    }
    if (!this.buf) {
      this.buf = this.pool?.take() ?? Buffer.allocUnsafe(this.maxBytes);
      this.pos = writeSectionHeader(this.buf, 0, { type: SectionType.PART, sectionId: this.sectionId });
      this.current = undefined;
    }
    this.blockIdstr = idstr;
    return full;
  }

  page(offset: number, data: Buffer, dataPos: number): void {
    this.pos = writePageRecord(this.buf!, this.pos, offset, this.nameIfNeeded(), data, dataPos);
  }

  zero(offset: number): void {
    this.pos = writeZeroRecord(this.buf!, this.pos, offset, this.nameIfNeeded());
  }

  /** The current section closed with EOS and footer, or undefined when none is open. */
  flush(): Buffer | undefined {
    const buf = this.buf;
    if (!buf) return undefined;
    let pos = writeEos(buf, this.pos);
    if (this.footers) pos = writeFooter(buf, pos, this.sectionId);
    this.buf = undefined;
    return buf.subarray(0, pos);
  }

  private nameIfNeeded(): Buffer | undefined {
    if (this.current === this.blockIdstr) return undefined;
    this.current = this.blockIdstr;
    return this.blockIdstr;
  }
}
