import { createHash } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { gunzipSync } from 'node:zlib';
import { expect } from 'vitest';
import {
  encodeDeviceTailEnd,
  encodeFullSection,
  encodePrologue,
  encodeRamSection,
  encodeRamSetupSection,
  MigrationStreamParser,
  PAGE_SIZE,
  type PageRecord,
  type ParserOptions,
  type PrologueEvent,
  type RamBlock,
  type RamPageRun,
  type RamSetupEvent,
  type StreamError,
  type StreamSink,
  type StreamSummary,
} from '../../src/stream/index.js';

export const FIXTURES = join(dirname(fileURLToPath(import.meta.url)), '..', 'fixtures', 'stream');
export const BACKGROUND_FIXTURE = 'qemu-7.2-background-128m.bin.gz';
export const PRECOPY_FIXTURE = 'qemu-7.2-precopy-128m.bin.gz';

const fixtureCache = new Map<string, Buffer>();
export function loadFixture(name: string): Buffer {
  let data = fixtureCache.get(name);
  if (!data) {
    data = gunzipSync(readFileSync(join(FIXTURES, name)));
    fixtureCache.set(name, data);
  }
  return data;
}

/** Everything a parser reported, in a form two runs can be compared by. */
export interface Collected {
  prologue?: PrologueEvent;
  ramSetup?: RamSetupEvent;
  /** One line per event, in order; pages carry a hash of their data. */
  events: string[];
  tail: Buffer;
  summary?: StreamSummary;
  /** Per block: its bytes as the stream left them, and which pages came as data/zero (1/2). */
  images?: Array<{ data: Buffer; kinds: Uint8Array }>;
}

export function collectingSink(options: { images?: boolean } = {}): { sink: StreamSink; result: Collected } {
  const result: Collected = { events: [], tail: Buffer.alloc(0) };
  const sink: StreamSink = {
    onPrologue(p) {
      result.prologue = p;
      result.events.push(`prologue ${p.machine} ${p.bytes.length}`);
    },
    onRamSetup(r) {
      result.ramSetup = r;
      result.events.push(
        `setup ${r.sectionId} ${r.blocks.map((b) => `${b.idstr}:${b.usedLength}`).join(',')}`,
      );
      if (options.images) {
        result.images = r.blocks.map((b) => ({
          data: Buffer.alloc(b.usedLength),
          kinds: new Uint8Array(b.usedLength / PAGE_SIZE),
        }));
      }
    },
    onPage(block, offset, data) {
      expect(data.length).toBe(PAGE_SIZE);
      result.events.push(
        `page ${block} ${offset} ${createHash('sha1').update(data).digest('hex').slice(0, 12)}`,
      );
      if (result.images) {
        const image = result.images[block]!;
        data.copy(image.data, offset);
        image.kinds[offset / PAGE_SIZE] = 1;
      }
    },
    onZeroPage(block, offset) {
      result.events.push(`zero ${block} ${offset}`);
      if (result.images) {
        const image = result.images[block]!;
        image.data.fill(0, offset, offset + PAGE_SIZE);
        image.kinds[offset / PAGE_SIZE] = 2;
      }
    },
    onRamPart(index, streamOffset) {
      result.events.push(`part ${index} @${streamOffset}`);
    },
    onRamEnd() {
      result.events.push('end');
    },
    onEnd(summary, deviceTail) {
      result.tail = deviceTail;
      result.summary = summary;
      result.events.push('eof');
    },
  };
  return { sink, result };
}

/** Feed `stream` in chunks of the given sizes (cycled), then end. */
export function parseInChunks(stream: Buffer, sizes: number[] | 'whole', options?: ParserOptions): Collected {
  const { sink, result } = collectingSink();
  const parser = new MigrationStreamParser(sink, options);
  feedInChunks(parser, stream, sizes);
  parser.end();
  return result;
}

export function feedInChunks(parser: MigrationStreamParser, stream: Buffer, sizes: number[] | 'whole'): void {
  if (sizes === 'whole') {
    parser.feed(stream);
    return;
  }
  let i = 0;
  for (let pos = 0; pos < stream.length; i++) {
    const n = sizes[i % sizes.length]!;
    parser.feed(stream.subarray(pos, pos + n));
    pos += n;
  }
}

/** Deterministic pseudo-random chunk sizes in [1, max]. */
export function randomSizes(count: number, max: number, seed = 1): number[] {
  let x = seed;
  const out: number[] = [];
  for (let i = 0; i < count; i++) {
    x = (Math.imul(x, 1103515245) + 12345) >>> 0;
    out.push(1 + (x % max));
  }
  return out;
}

/** The error `fn` throws, which must be a StreamError. */
export function streamErrorOf(fn: () => unknown): StreamError {
  try {
    fn();
  } catch (err) {
    expect((err as StreamError).name).toBe('StreamError');
    return err as StreamError;
  }
  throw new Error('expected a StreamError, nothing was thrown');
}

export async function asyncStreamErrorOf(fn: () => Promise<unknown>): Promise<StreamError> {
  try {
    await fn();
  } catch (err) {
    expect((err as StreamError).name).toBe('StreamError');
    return err as StreamError;
  }
  throw new Error('expected a StreamError, nothing was thrown');
}

export function page(fill: number): Buffer {
  const data = Buffer.alloc(PAGE_SIZE, fill);
  data.writeUInt32BE((0xdeadbeef ^ fill) >>> 0, 100);
  return data;
}

export const SYNTH_BLOCKS: RamBlock[] = [
  { idstr: 'pc.ram', usedLength: 16 * PAGE_SIZE },
  { idstr: '/rom@etc/acpi/tables', usedLength: 2 * PAGE_SIZE },
  { idstr: 'pc.bios', usedLength: 4 * PAGE_SIZE },
];

export const SYNTH_VMDESC = { page_size: 4096, devices: [{ name: 'timer', instance_id: 0 }] };

/** A FULL "timer" section, EOF and VMDESCRIPTION: a small but well-formed device tail. */
export function synthTail(footers = true): Buffer {
  return Buffer.concat([
    encodeFullSection(
      { sectionId: 0, idstr: 'timer', instanceId: 0, versionId: 2 },
      Buffer.alloc(24, 0x11),
      footers,
    ),
    encodeDeviceTailEnd(SYNTH_VMDESC),
  ]);
}

/**
 * A small background-snapshot-shaped stream: prologue, START (section 2), PART sections with
 * the given records, then the device tail. `parts` defaults to two sections where the second
 * starts with CONTINUE on the block the first ended with.
 */
export function synthStream(
  options: {
    parts?: Buffer[];
    end?: Buffer;
    tail?: Buffer;
    capabilities?: string[];
    blocks?: RamBlock[];
    footers?: boolean;
    prologue?: Buffer;
  } = {},
): Buffer {
  const footers = options.footers ?? true;
  const blocks = options.blocks ?? SYNTH_BLOCKS;
  const capabilities = options.capabilities ?? [];
  return Buffer.concat([
    options.prologue ?? encodePrologue({ machine: 'pc-i440fx-7.2', capabilities }),
    encodeRamSetupSection({
      sectionId: 2,
      blocks,
      footers,
      ignoreShared: capabilities.includes('x-ignore-shared'),
    }),
    ...(options.parts ?? defaultParts(footers)),
    ...(options.end ? [options.end] : []),
    options.tail ?? synthTail(footers),
  ]);
}

export const DEFAULT_RECORDS: PageRecord[][] = [
  [
    { idstr: 'pc.ram', offset: 0, data: page(1) },
    { idstr: 'pc.ram', offset: PAGE_SIZE },
    { idstr: 'pc.bios', offset: 3 * PAGE_SIZE, data: page(2) },
  ],
  [
    { idstr: 'pc.bios', offset: 0 },
    { idstr: 'pc.ram', offset: 15 * PAGE_SIZE, data: page(3) },
  ],
];

function defaultParts(footers: boolean): Buffer[] {
  const first = encodeRamSection(2, DEFAULT_RECORDS[0]!, { footers });
  // The second section continues pc.bios without naming it, as QEMU does across sections.
  const second = encodeRamSection(2, DEFAULT_RECORDS[1]!, { footers });
  return [first, continueFirstRecord(second)];
}

/**
 * A PART section whose first record names its block, rewritten with CONTINUE and without the
 * name (the shape QEMU writes when a section continues the previous section's block).
 */
export function continueFirstRecord(section: Buffer): Buffer {
  const recordAt = 5;
  const idLength = section[recordAt + 8]!;
  const out = Buffer.concat([section.subarray(0, recordAt + 8), section.subarray(recordAt + 9 + idLength)]);
  out[recordAt + 7] = out[recordAt + 7]! | 0x20;
  return out;
}

/** Runs of pages for the writer, from an image collected by `collectingSink({ images: true })`. */
export function* runsFromImage(image: { data: Buffer; kinds: Uint8Array }): Generator<RamPageRun> {
  const { data, kinds } = image;
  let i = 0;
  while (i < kinds.length) {
    const kind = kinds[i]!;
    let j = i + 1;
    while (j < kinds.length && kinds[j] === kind) j++;
    if (kind === 1) yield { offset: i * PAGE_SIZE, data: data.subarray(i * PAGE_SIZE, j * PAGE_SIZE) };
    else if (kind === 2) yield { offset: i * PAGE_SIZE, zeroPages: j - i };
    i = j;
  }
}

export async function collectAsync(gen: AsyncIterable<Buffer>): Promise<Buffer[]> {
  const out: Buffer[] = [];
  for await (const chunk of gen) out.push(chunk);
  return out;
}
