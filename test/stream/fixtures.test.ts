/**
 * Streams QEMU 7.2 wrote (test/fixtures/stream/README.md): parsed whole and in odd chunks with
 * identical results, cut short at many points, and corrupted at section and footer bytes.
 */
import { describe, expect, it } from 'vitest';
import { MigrationStreamParser, parseMigrationStream } from '../../src/stream/index.js';
import {
  BACKGROUND_FIXTURE,
  collectingSink,
  loadFixture,
  PRECOPY_FIXTURE,
  parseInChunks,
  randomSizes,
  streamErrorOf,
} from './helpers.js';

const BLOCKS_7_2_128M = [
  { idstr: 'pc.ram', usedLength: 0x8000000 },
  { idstr: '/rom@etc/acpi/tables', usedLength: 0x20000 },
  { idstr: 'pc.bios', usedLength: 0x40000 },
  { idstr: 'pc.rom', usedLength: 0x20000 },
  { idstr: '/rom@etc/table-loader', usedLength: 0x1000 },
  { idstr: '/rom@etc/acpi/rsdp', usedLength: 0x1000 },
];

const CHUNKINGS: Array<[string, number[]]> = [
  ['1 byte', [1]],
  ['7 bytes', [7]],
  ['4095 bytes', [4095]],
  ['4097 bytes', [4097]],
  ['64 KiB', [65536]],
  ['random sizes', randomSizes(1000, 20000, 42)],
];

describe.each([
  [BACKGROUND_FIXTURE, 'background'],
  [PRECOPY_FIXTURE, 'precopy'],
] as const)('%s', (name, mode) => {
  const stream = loadFixture(name);
  let reference: ReturnType<typeof parseInChunks> | undefined;
  const whole = () => {
    reference ??= parseInChunks(stream, 'whole');
    return reference;
  };

  it('parses as the stream QEMU 7.2 wrote', () => {
    const result = whole();
    expect(result.prologue).toMatchObject({ version: 3, machine: 'pc-i440fx-7.2', capabilities: [] });
    expect(result.prologue!.bytes).toEqual(stream.subarray(0, 26));
    expect(result.ramSetup).toMatchObject({
      sectionId: 2,
      footers: true,
      ignoreShared: false,
      blocks: BLOCKS_7_2_128M,
    });
    expect(result.ramSetup!.bytes).toEqual(stream.subarray(26, 26 + result.ramSetup!.bytes.length));
    const summary = result.summary!;
    // Every page of every block exactly once (the guest only ran SeaBIOS: no page was resent).
    for (const [i, block] of summary.blocks.entries()) {
      const pages = BLOCKS_7_2_128M[i]!.usedLength / 4096;
      if (mode === 'background') expect(block.pages + block.zeroPages).toBe(pages);
      else expect(block.pages + block.zeroPages).toBeGreaterThanOrEqual(pages);
    }
    expect(summary.ramEnd).toBe(mode === 'precopy');
    expect(result.events.includes('end')).toBe(mode === 'precopy');
    expect(summary.ramParts).toBeGreaterThanOrEqual(1);
    // The first PART follows the START section directly.
    expect(result.events[2]).toBe(`part 0 @${26 + result.ramSetup!.bytes.length}`);
    expect(summary.streamBytes).toBe(stream.length);
    expect(summary.deviceTailOffset + summary.deviceTailBytes).toBe(stream.length);
    expect(result.tail).toEqual(stream.subarray(summary.deviceTailOffset));
    expect(stream[summary.deviceTailOffset]).toBe(0x04); // FULL
    expect(summary.vmDescription!.page_size).toBe(4096);
    expect(summary.vmDescription!.devices.map((d) => d.name)).toContain('globalstate');
    expect(summary.eofOffset + 1 + 5 + summary.vmDescriptionBytes!).toBe(stream.length);
  });

  it.each(CHUNKINGS)('gives identical results fed in chunks of %s', (_, sizes) => {
    const reference = whole();
    expect(reference.events.length).toBeGreaterThan(30000);
    const chunked = parseInChunks(stream, sizes);
    expect(chunked.events).toEqual(reference.events);
    expect(chunked.tail).toEqual(reference.tail);
    expect(chunked.summary).toEqual(reference.summary);
    expect(chunked.prologue!.bytes).toEqual(reference.prologue!.bytes);
    expect(chunked.ramSetup!.bytes).toEqual(reference.ramSetup!.bytes);
  });

  it('is TRUNCATED when cut anywhere before its last byte', () => {
    const reference = whole().summary!;
    const cuts = new Set<number>([0, 1, 4, 8, 9, 25, 26, 27, 100, 195, 196, 197, 201, 210, 4000]);
    for (let i = 1; i < 200; i++) cuts.add(Math.floor((stream.length * i) / 200));
    for (const at of [reference.deviceTailOffset, reference.eofOffset]) {
      for (let d = -6; d <= 6; d++) cuts.add(at + d);
    }
    for (let d = 1; d <= 8; d++) cuts.add(stream.length - d);
    for (const cut of cuts) {
      const parser = new MigrationStreamParser(collectingSink().sink);
      parser.feed(stream.subarray(0, cut));
      const err = streamErrorOf(() => parser.end());
      expect(err.code, `cut at ${cut}`).toBe('QSNAP_STREAM_TRUNCATED');
    }
  });

  it('is FORMAT when a section type, footer or record flag byte is flipped', () => {
    const reference = whole();
    const firstPart = Number(/@(\d+)/.exec(reference.events[2]!)![1]);
    const startFooter = 26 + reference.ramSetup!.bytes.length - 5;
    const corrupt = (at: number, value: number) => {
      const copy = Buffer.from(stream);
      copy[at] = value;
      return streamErrorOf(() => parseMigrationStream(copy, collectingSink().sink));
    };
    const cases: Array<[string, number, number]> = [
      ['magic', 0, 0x52],
      ['configuration marker', 8, 0x09],
      ['PART type', firstPart, 0x09],
      ['PART section id', firstPart + 4, 0x07],
      ['START footer marker', startFooter, 0x7f],
      ['START footer id', startFooter + 4, 0x03],
      ['first record flags', firstPart + 5 + 7, 0x0c],
      ['first record offset', firstPart + 5 + 3, 0xff],
      ['device tail type', reference.summary!.deviceTailOffset, 0x05],
      ['VMDESCRIPTION JSON', reference.summary!.eofOffset + 6, 0x5b],
    ];
    for (const [what, at, value] of cases) {
      expect(stream[at], what).not.toBe(value);
      const err = corrupt(at, value);
      expect(err.code, what).toBe('QSNAP_STREAM_FORMAT');
      expect(err.offset, what).toBeGreaterThanOrEqual(0);
    }
  });

  it('finds the end of a section footer flipped in the last PART', () => {
    // The footer of the section before the device tail, found from the tail's offset.
    const { summary } = whole();
    const footerAt = summary!.deviceTailOffset - 5;
    expect(stream[footerAt]).toBe(0x7e);
    const copy = Buffer.from(stream);
    copy[footerAt] = 0x7d;
    const err = streamErrorOf(() => parseMigrationStream(copy, collectingSink().sink));
    expect(err.code).toBe('QSNAP_STREAM_FORMAT');
    expect(err.offset).toBe(footerAt);
  });
});

describe('fixture sections', () => {
  it('the background stream has several PART sections continuing the previous block, and no END', () => {
    const stream = loadFixture(BACKGROUND_FIXTURE);
    const { events, summary } = parseInChunks(stream, 'whole');
    const parts = events.filter((e) => e.startsWith('part ')).map((e) => Number(e.split('@')[1]));
    expect(parts.length).toBe(summary!.ramParts);
    expect(parts.length).toBeGreaterThan(1);
    const continued = parts.filter((at) => (stream.readUInt32BE(at + 5 + 4) & 0x20) !== 0);
    expect(continued.length).toBeGreaterThan(0);
    expect(summary!.ramEnd).toBe(false);
  });
});
