/**
 * A push-based, synchronous, I/O-free parser of QEMU migration streams (precopy and
 * background-snapshot). Feed it chunks as they arrive; it calls a StreamSink for the prologue,
 * the RAM block list, every page, and the device tail, which it passes on verbatim.
 *
 * A state machine over a buffer list, one method per state that returns false while it lacks
 * bytes (websockets/ws lib/receiver.js). The format facts live in codec.ts.
 *
 * What is refused, and why, is listed in errors.ts. In short: anything QEMU's loader would
 * refuse is QSNAP_STREAM_FORMAT, anything valid that qsnap cannot represent page by page is
 * QSNAP_STREAM_UNSUPPORTED, and an input that stops before the device tail's EOF and
 * VMDESCRIPTION is QSNAP_STREAM_TRUNCATED.
 */
import { BufferList } from './buffer-list.js';
import {
  checkRamSectionHeader,
  classifyRecord,
  type DeviceTailEnd,
  decodeDeviceTailEnd,
  FOOTER_BYTES,
  footerMismatch,
  MAX_RECORD_HEADER_BYTES,
  MAX_SECTION_HEADER_BYTES,
  MIG_COMMAND_NAMES,
  MigCommand,
  newRecordHeader,
  PAGE_BITS,
  PAGE_SIZE,
  RamFlag,
  type RecordHeader,
  SECTION_TYPE_NAMES,
  SectionType,
  SUPPORTED_CAPABILITIES,
  tryDecodeCommand,
  tryDecodeFooter,
  tryDecodePrologue,
  tryDecodeRamSetupSection,
  tryDecodeRecordHeader,
  tryDecodeSectionHeader,
} from './codec.js';
import { formatError, limitError, StreamError, truncatedError, unsupportedError } from './errors.js';
import type { RamBlock, StreamSink, StreamSummary } from './types.js';

export interface ParserOptions {
  /** Largest header + configuration accepted (default 64 KiB). */
  maxPrologueBytes?: number;
  /** Largest RAM START section accepted (default 1 MiB). */
  maxRamSetupBytes?: number;
  /** Largest device tail accepted (default 256 MiB); the parser keeps it to find its end. */
  maxDeviceTailBytes?: number;
  /**
   * Require the VMDESCRIPTION after EOF (default true). QEMU sends it except for machines with
   * suppress-vmdesc and in postcopy; without it, a tail cut short at a 0x00 byte inside a device
   * section looks complete.
   */
  requireVmDescription?: boolean;
}

const S_PROLOGUE = 0;
const S_SECTION = 1;
const S_RECORDS = 2;
const S_FOOTER = 3;
const S_TAIL = 4;
const S_DONE = 5;
const S_FAILED = 6;

/** Where the input stopped, by state, for TRUNCATED messages. */
const STATE_NAMES = [
  'the header and configuration',
  'the RAM sections, before any device state',
  'a RAM section',
  'a section footer',
];

const TWO_32 = 0x1_0000_0000;
const PAGE_CONTINUE = RamFlag.PAGE | RamFlag.CONTINUE;
const ZERO_CONTINUE = RamFlag.ZERO | RamFlag.CONTINUE;

export class MigrationStreamParser {
  private readonly list = new BufferList();
  private readonly sink: StreamSink;
  private readonly maxPrologueBytes: number;
  private readonly maxRamSetupBytes: number;
  private readonly maxDeviceTailBytes: number;
  private readonly requireVmDescription: boolean;

  private state = S_PROLOGUE;
  private failure: unknown;

  private ignoreShared = false;
  private prologueBytes = 0;
  private ramSectionId = -1;
  private footers = true;
  private blocks: RamBlock[] = [];
  private blockIndexByName = new Map<string, number>();
  /** Used lengths by block index, and the current block (-1: none named yet). */
  private blockLengths: number[] = [];
  private block = -1;
  private blockLength = 0;
  private ramEnded = false;

  private ramParts = 0;
  private pages = 0;
  private zeroPages = 0;
  private pagesPerBlock: number[] = [];
  private zeroPagesPerBlock: number[] = [];
  private skippedRecords = 0;

  private tailOffset = -1;
  private tailBytes = 0;
  private tailChunks: Buffer[] = [];

  private readonly header = newRecordHeader();
  /** Stream offset of a record whose header is decoded but whose payload is incomplete, and its size. */
  private waitingAt = -1;
  private waitingFor = 0;
  private readonly scratch = Buffer.allocUnsafe(PAGE_SIZE);
  /**
   * Bytes to buffer before decoding a variable-size item again (prologue, RAM START, command)
   * after an attempt found it incomplete: twice what that attempt had, so an item that arrives
   * in small chunks is decoded O(log n) times, not once per chunk (linear, not quadratic, in
   * its size). end() tries once more whatever is buffered.
   */
  private retryAt = 0;

  constructor(sink: StreamSink, options: ParserOptions = {}) {
    this.sink = sink;
    this.maxPrologueBytes = options.maxPrologueBytes ?? 64 * 1024;
    this.maxRamSetupBytes = options.maxRamSetupBytes ?? 1024 * 1024;
    this.maxDeviceTailBytes = options.maxDeviceTailBytes ?? 256 * 1024 * 1024;
    this.requireVmDescription = options.requireVmDescription ?? true;
  }

  /** Absolute stream offset of the next byte to be fed. */
  get bytesFed(): number {
    return this.state === S_TAIL || this.state === S_DONE
      ? this.tailOffset + this.tailBytes
      : this.list.consumed + this.list.length;
  }

  /** Whether the first RAM PART section has been seen (the background-snapshot resume signal). */
  get ramPartSeen(): boolean {
    return this.ramParts > 0;
  }

  /** The parser keeps views of `chunk` until later bytes complete what it holds: don't reuse it. */
  feed(chunk: Buffer): void {
    this.checkUsable();
    try {
      if (this.state === S_TAIL) {
        this.passTail(chunk);
        return;
      }
      this.list.push(chunk);
      this.run();
    } catch (err) {
      this.fail(err);
    }
  }

  /**
   * Like feed(), but `chunk` may be overwritten once this returns (a reused read buffer): the
   * bytes of an incomplete record are copied. Pages reach the sink as views of `chunk`, valid
   * only during the sink call, as with feed().
   */
  feedBorrowed(chunk: Buffer): void {
    this.feed(chunk);
    if (this.state !== S_FAILED) this.list.detach();
  }

  /** The input ended: check the stream is complete and report the summary. */
  end(): StreamSummary {
    this.checkUsable();
    try {
      return this.finish();
    } catch (err) {
      this.fail(err);
    }
  }

  private checkUsable(): void {
    if (this.state === S_FAILED) throw this.failure;
    if (this.state === S_DONE) {
      throw new StreamError('QSNAP_STREAM_FORMAT', 'the parser has already ended', {
        hint: 'this is a bug in qsnap: feed() or end() after end()',
      });
    }
  }

  private fail(err: unknown): never {
    this.state = S_FAILED;
    this.failure = err;
    throw err;
  }

  private run(): void {
    for (;;) {
      let progressed: boolean;
      switch (this.state) {
        case S_PROLOGUE:
          progressed = this.readPrologue();
          break;
        case S_SECTION:
          progressed = this.readSection();
          break;
        case S_RECORDS:
          progressed = this.readRecords();
          break;
        case S_FOOTER:
          progressed = this.readFooter();
          break;
        default:
          return;
      }
      if (!progressed) return;
    }
  }

  /** The attempt just made lacked bytes: the next waits for twice as many, or for the item's limit. */
  private deferRetry(limit: number): void {
    this.retryAt = Math.min(this.list.length * 2, limit);
  }

  // --- states --------------------------------------------------------------------------------

  private readPrologue(): boolean {
    if (this.list.length < this.retryAt) return false;
    const buf = this.list.peekUpTo(this.maxPrologueBytes);
    const prologue = tryDecodePrologue(buf, this.list.consumed);
    if (!prologue) {
      this.deferRetry(this.maxPrologueBytes);
      if (buf.length >= this.maxPrologueBytes) {
        throw limitError(
          'stream header and configuration are too long',
          0,
          this.maxPrologueBytes,
          'maxPrologueBytes',
        );
      }
      return false;
    }
    for (const cap of prologue.capabilities) {
      if (!SUPPORTED_CAPABILITIES.has(cap)) {
        throw unsupportedError(
          `the stream was written with migration capability ${cap}, which changes its format`,
          `disable the ${cap} migration capability`,
          0,
          { capability: cap },
        );
      }
    }
    if (prologue.targetPageBits !== undefined && prologue.targetPageBits !== PAGE_BITS) {
      throw unsupportedError(
        `target page size ${2 ** prologue.targetPageBits}: qsnap handles 4096-byte pages`,
        'qsnap snapshots x86 guests (4 KiB target pages)',
        0,
      );
    }
    this.retryAt = 0;
    this.ignoreShared = prologue.capabilities.includes('x-ignore-shared');
    const { size, ...rest } = prologue;
    const bytes = Buffer.from(buf.subarray(0, size));
    this.list.skip(size);
    this.prologueBytes = size;
    this.state = S_SECTION;
    this.sink.onPrologue({ ...rest, bytes });
    return true;
  }

  private readSection(): boolean {
    const list = this.list;
    if (list.length === 0) return false;
    const type = list.byteAt(0);
    switch (type) {
      case SectionType.START:
        return this.readRamStart();
      case SectionType.PART:
      case SectionType.END:
        return this.readRamPartOrEnd(type);
      case SectionType.FULL:
      case SectionType.EOF:
        return this.readTailStart(type);
      case SectionType.COMMAND:
        return this.readCommand();
      default:
        throw formatError(
          `unexpected ${SECTION_TYPE_NAMES[type] ?? `section type 0x${type.toString(16)}`} where a section starts`,
          list.consumed,
          { type },
        );
    }
  }

  /** A PART or END header of the RAM section; its records follow. */
  private readRamPartOrEnd(type: number): boolean {
    const list = this.list;
    const at = list.consumed;
    const header = tryDecodeSectionHeader(list.peekUpTo(5), 0, at);
    if (!header) return false;
    this.checkRamContinuation(type, header.sectionId, at);
    list.skip(header.size);
    this.state = S_RECORDS;
    if (type === SectionType.END) {
      this.ramEnded = true;
      this.sink.onRamEnd?.();
    } else {
      this.sink.onRamPart(this.ramParts++, at);
    }
    return true;
  }

  /** PART and END continue the one RAM section START opened, and nothing follows its END. */
  private checkRamContinuation(type: number, sectionId: number, at: number): void {
    if (this.ramSectionId < 0) {
      throw formatError(`${SECTION_TYPE_NAMES[type]} section ${sectionId} before any START`, at);
    }
    if (sectionId !== this.ramSectionId) {
      throw formatError(
        `${SECTION_TYPE_NAMES[type]} for section ${sectionId}, but the only iterable section is RAM (${this.ramSectionId})`,
        at,
      );
    }
    if (this.ramEnded) throw formatError('RAM section after its END section', at);
  }

  /** FULL or EOF: the device tail starts here, once RAM has come first. */
  private readTailStart(type: number): boolean {
    if (this.ramSectionId < 0) return this.refuseTailBeforeRam(type);
    this.startTail();
    return false;
  }

  /** Throws, naming the device of a FULL section once its header is there; false until then. */
  private refuseTailBeforeRam(type: number): boolean {
    const at = this.list.consumed;
    if (type === SectionType.FULL) {
      const header = tryDecodeSectionHeader(this.list.peekUpTo(MAX_SECTION_HEADER_BYTES), 0, at);
      if (!header) return false;
      throw unsupportedError(
        `device ${JSON.stringify(header.idstr)} is saved before RAM (early-setup device, QEMU ≥ 8.0)`,
        'remove the device (e.g. virtio-mem) from the VM; qsnap needs RAM to come first',
        at,
        { idstr: header.idstr },
      );
    }
    throw formatError('the stream ends (EOF) without a RAM section', at);
  }

  private readRamStart(): boolean {
    const list = this.list;
    const at = list.consumed;
    const head = tryDecodeSectionHeader(list.peekUpTo(MAX_SECTION_HEADER_BYTES), 0, at);
    if (!head) return false;
    checkRamSectionHeader(head, at);
    if (this.ramSectionId >= 0) throw formatError('a second RAM START section', at);
    if (list.length < this.retryAt) return false;

    const buf = list.peekUpTo(this.maxRamSetupBytes);
    const setup = tryDecodeRamSetupSection(buf, 0, at, { ignoreShared: this.ignoreShared });
    if (!setup) {
      this.deferRetry(this.maxRamSetupBytes);
      if (buf.length >= this.maxRamSetupBytes) {
        throw limitError('RAM START section is too long', at, this.maxRamSetupBytes, 'maxRamSetupBytes');
      }
      return false;
    }
    this.retryAt = 0;
    const bytes = Buffer.from(buf.subarray(0, setup.size));
    list.skip(setup.size);
    this.ramSectionId = setup.sectionId;
    this.footers = setup.footers;
    this.blocks = setup.blocks;
    this.blockLengths = setup.blocks.map((b) => b.usedLength);
    this.blockIndexByName = new Map(setup.blocks.map((b, i) => [b.idstr, i]));
    this.pagesPerBlock = setup.blocks.map(() => 0);
    this.zeroPagesPerBlock = setup.blocks.map(() => 0);
    this.skippedRecords += setup.skippedRecords;
    this.state = S_SECTION;
    this.sink.onRamSetup({
      sectionId: setup.sectionId,
      blocks: setup.blocks,
      footers: setup.footers,
      ignoreShared: setup.ignoreShared,
      bytes,
    });
    return true;
  }

  /** Only SWITCHOVER_START (QEMU ≥ 10.0, no payload, before the final RAM pass) is harmless. */
  private readCommand(): boolean {
    const at = this.list.consumed;
    if (this.list.length < this.retryAt) return false;
    const command = tryDecodeCommand(this.list.peekUpTo(5 + 0xffff), 0, at);
    if (!command) {
      this.deferRetry(5 + 0xffff);
      return false;
    }
    this.retryAt = 0;
    if (
      command.command === MigCommand.SWITCHOVER_START &&
      command.data.length === 0 &&
      this.ramSectionId >= 0
    ) {
      this.list.skip(command.size);
      this.skippedRecords++;
      return true;
    }
    const name = MIG_COMMAND_NAMES[command.command] ?? `command ${command.command}`;
    const postcopy = name.includes('POSTCOPY');
    throw unsupportedError(
      `migration stream command ${name}${postcopy ? ' (postcopy)' : ''}`,
      postcopy
        ? 'disable the postcopy-ram capability'
        : 'disable the migration capabilities beyond background-snapshot (return-path, postcopy, colo)',
      at,
      { command: command.command },
    );
  }

  private readFooter(): boolean {
    const at = this.list.consumed;
    const footer = tryDecodeFooter(this.list.peekUpTo(FOOTER_BYTES), 0, at);
    if (!footer) return false;
    if (footer.sectionId !== this.ramSectionId) throw footerMismatch(footer.sectionId, this.ramSectionId, at);
    this.list.skip(FOOTER_BYTES);
    this.state = S_SECTION;
    return true;
  }

  /**
   * Page records until EOS. The loop reads PAGE|CONTINUE and ZERO|CONTINUE records straight from
   * the head chunk when they lie in it; everything else, and records split across chunks, goes
   * through readRecord.
   */
  private readRecords(): boolean {
    const list = this.list;
    const sink = this.sink;
    while (list.length > 0) {
      const chunk = list.headChunk()!;
      const pos = list.headPos;
      if (this.block >= 0 && chunk.length - pos >= 9) {
        const hi = chunk.readUInt32BE(pos);
        const lo = chunk.readUInt32BE(pos + 4);
        const flags = lo & 0xfff;
        const offset = hi * TWO_32 + (lo - flags);
        if (flags === PAGE_CONTINUE && offset < this.blockLength && chunk.length - pos >= 8 + PAGE_SIZE) {
          list.skip(8 + PAGE_SIZE);
          this.pages++;
          this.pagesPerBlock[this.block]!++;
          sink.onPage(this.block, offset, chunk.subarray(pos + 8, pos + 8 + PAGE_SIZE));
          continue;
        }
        if (flags === ZERO_CONTINUE && offset < this.blockLength && chunk[pos + 8] === 0) {
          list.skip(9);
          this.zeroPages++;
          this.zeroPagesPerBlock[this.block]!++;
          sink.onZeroPage(this.block, offset);
          continue;
        }
      }
      if (!this.readRecord()) return false;
      if (this.state !== S_RECORDS) return true;
    }
    return false;
  }

  /** One record of any kind, wherever it lies; false while it is incomplete. */
  private readRecord(): boolean {
    const list = this.list;
    const at = list.consumed;
    // A record decoded before and still waiting for its payload: don't decode it again per chunk.
    if (at === this.waitingAt && list.length < this.waitingFor) return false;
    const header = this.header;
    if (!tryDecodeRecordHeaderFromList(list, at, header)) return false;
    const kind = classifyRecord(header.flags, header.offset, at);
    if (kind === 'eos' || kind === 'multifd-flush') {
      this.skipMarkerRecord(kind);
      return true;
    }
    const block = this.blockOfRecord(header, at);
    const recordBytes = header.size + (kind === 'page' ? PAGE_SIZE : 1);
    if (list.length < recordBytes) {
      this.waitingAt = at;
      this.waitingFor = recordBytes;
      return false;
    }

    this.block = block;
    this.blockLength = this.blockLengths[block]!;
    list.skip(header.size);
    if (kind === 'zero') this.readZeroPayload(block, header.offset, at);
    else this.readPagePayload(block, header.offset);
    return true;
  }

  /** EOS ends the section's records; MULTIFD_FLUSH is skipped. */
  private skipMarkerRecord(kind: 'eos' | 'multifd-flush'): void {
    this.list.skip(this.header.size);
    if (kind === 'eos') {
      this.state = this.footers ? S_FOOTER : S_SECTION;
    } else {
      // 8.1.0–8.1.2 write it even without multifd; it carries nothing (ram.c, ram_save_iterate)
      this.skippedRecords++;
    }
  }

  /** The block a page record is in: the one it names, else the current one; its offset must lie within it. */
  private blockOfRecord(header: RecordHeader, at: number): number {
    let block = this.block;
    if (header.idstr !== undefined) {
      const named = this.blockIndexByName.get(header.idstr);
      if (named === undefined) {
        throw formatError(
          `RAM record names block ${JSON.stringify(header.idstr)}, not in the block list`,
          at,
          {
            idstr: header.idstr,
          },
        );
      }
      block = named;
    } else if (block < 0) {
      throw formatError('RAM record with RAM_SAVE_FLAG_CONTINUE before any record named its block', at);
    }
    const length = this.blockLengths[block]!;
    if (header.offset >= length) {
      throw formatError(
        `RAM record offset 0x${header.offset.toString(16)} is past the end of block ${this.blocks[block]!.idstr} (0x${length.toString(16)})`,
        at,
      );
    }
    return block;
  }

  /** The fill byte of a ZERO record whose header was skipped. */
  private readZeroPayload(block: number, offset: number, at: number): void {
    // ram.c, save_zero_page_to_file writes fill byte 0; the loader would memset any other value
    const fill = this.list.byteAt(0);
    if (fill !== 0) throw formatError(`ZERO page record with fill byte 0x${fill.toString(16)}`, at);
    this.list.skip(1);
    this.zeroPages++;
    this.zeroPagesPerBlock[block]!++;
    this.sink.onZeroPage(block, offset);
  }

  /** The 4096 bytes of a PAGE record whose header was skipped. */
  private readPagePayload(block: number, offset: number): void {
    const data = this.list.shiftInto(PAGE_SIZE, this.scratch);
    this.pages++;
    this.pagesPerBlock[block]!++;
    this.sink.onPage(block, offset, data);
  }

  /** Everything from the first section that is not RAM is the device tail, kept verbatim. */
  private startTail(): void {
    const list = this.list;
    this.tailOffset = list.consumed;
    this.state = S_TAIL;
    this.sink.onDeviceTailStart?.(this.tailOffset);
    while (list.length > 0) this.passTail(list.shiftChunk(list.length));
  }

  private passTail(chunk: Buffer): void {
    if (chunk.length === 0) return;
    this.tailBytes += chunk.length;
    if (this.tailBytes > this.maxDeviceTailBytes) {
      throw limitError(
        'device state is too long',
        this.tailOffset,
        this.maxDeviceTailBytes,
        'maxDeviceTailBytes',
      );
    }
    this.tailChunks.push(Buffer.from(chunk));
  }

  private finish(): StreamSummary {
    if (this.state !== S_TAIL && this.retryAt > 0) {
      // an item deferred for more bytes gets its last try with what came
      this.retryAt = 0;
      this.run();
    }
    if (this.state !== S_TAIL) throw this.truncatedBeforeTail();
    const tail = this.tailChunks.length === 1 ? this.tailChunks[0]! : Buffer.concat(this.tailChunks);
    this.tailChunks = [];
    const tailEnd = this.decodeTailEnd(tail);
    this.state = S_DONE;
    const summary = this.summarize(tailEnd);
    this.sink.onEnd(summary, tail);
    return summary;
  }

  private truncatedBeforeTail(): StreamError {
    const end = this.list.consumed + this.list.length;
    return truncatedError(`the stream ended inside ${STATE_NAMES[this.state]} at byte ${end}`, end, {
      ramParts: this.ramParts,
    });
  }

  /** EOF [and VMDESCRIPTION] at the end of the whole tail, or TRUNCATED; 4096-byte pages only. */
  private decodeTailEnd(tail: Buffer): DeviceTailEnd {
    const tailEnd = decodeDeviceTailEnd(tail, this.tailOffset, {
      requireVmDescription: this.requireVmDescription,
    });
    if (!tailEnd) {
      throw truncatedError(
        `the device state (${this.tailBytes} bytes from byte ${this.tailOffset}) does not end with EOF${this.requireVmDescription ? ' and VMDESCRIPTION' : ''}`,
        this.tailOffset + this.tailBytes,
      );
    }
    if (tailEnd.vmDescription && tailEnd.vmDescription.page_size !== PAGE_SIZE) {
      throw unsupportedError(
        `target page size ${tailEnd.vmDescription.page_size}: qsnap handles 4096-byte pages`,
        'qsnap snapshots x86 guests (4 KiB target pages)',
        this.tailOffset + tailEnd.eofAt + 1,
      );
    }
    return tailEnd;
  }

  private summarize(tailEnd: DeviceTailEnd): StreamSummary {
    return {
      streamBytes: this.tailOffset + this.tailBytes,
      prologueBytes: this.prologueBytes,
      ramParts: this.ramParts,
      ramEnd: this.ramEnded,
      pages: this.pages,
      zeroPages: this.zeroPages,
      blocks: this.blocks.map((b, i) => ({
        idstr: b.idstr,
        pages: this.pagesPerBlock[i]!,
        zeroPages: this.zeroPagesPerBlock[i]!,
      })),
      skippedRecords: this.skippedRecords,
      deviceTailOffset: this.tailOffset,
      deviceTailBytes: this.tailBytes,
      eofOffset: this.tailOffset + tailEnd.eofAt,
      ...(tailEnd.vmDescription
        ? { vmDescription: tailEnd.vmDescription, vmDescriptionBytes: tailEnd.vmDescriptionBytes! }
        : {}),
    };
  }
}

/** A record header that may span chunks (at most MAX_RECORD_HEADER_BYTES, so the copy is small). */
function tryDecodeRecordHeaderFromList(list: BufferList, at: number, out: RecordHeader): boolean {
  return tryDecodeRecordHeader(list.peekUpTo(MAX_RECORD_HEADER_BYTES), 0, at, out) !== undefined;
}

/** Parse a whole stream held in memory (tests, tools). */
export function parseMigrationStream(
  stream: Buffer,
  sink: StreamSink,
  options?: ParserOptions,
): StreamSummary {
  const parser = new MigrationStreamParser(sink, options);
  parser.feed(stream);
  return parser.end();
}
