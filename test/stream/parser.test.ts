import { describe, expect, it } from 'vitest';
import {
  encodeCommand,
  encodeDeviceTailEnd,
  encodeFullSection,
  encodePrologue,
  encodeRamSection,
  encodeRamSetupSection,
  MigCommand,
  MigrationStreamParser,
  PAGE_SIZE,
  parseMigrationStream,
  type StreamSink,
} from '../../src/stream/index.js';
import {
  collectingSink,
  continueFirstRecord,
  page,
  parseInChunks,
  randomSizes,
  SYNTH_BLOCKS,
  streamErrorOf,
  synthStream,
  synthTail,
} from './helpers.js';

const CHUNKINGS: Array<[string, number[]]> = [
  ['1 byte', [1]],
  ['7 bytes', [7]],
  ['4095 bytes', [4095]],
  ['4097 bytes', [4097]],
  ['random sizes', randomSizes(500, 9000, 7)],
];

function parse(stream: Buffer) {
  const { sink, result } = collectingSink();
  parseMigrationStream(stream, sink);
  return result;
}

describe('MigrationStreamParser on a synthetic background-snapshot stream', () => {
  const stream = synthStream();

  it('reports prologue, block list, pages in order, the tail and a summary', () => {
    const result = parse(stream);
    const setupAt = encodePrologue({ machine: 'pc-i440fx-7.2', capabilities: [] }).length;
    expect(result.events.map((e) => e.replace(/ [0-9a-f]{12}$/, ''))).toEqual([
      'prologue pc-i440fx-7.2 26',
      'setup 2 pc.ram:65536,/rom@etc/acpi/tables:8192,pc.bios:16384',
      `part 0 @${setupAt + result.ramSetup!.bytes.length}`,
      'page 0 0',
      'zero 0 4096',
      'page 2 12288',
      expect.stringMatching(/^part 1 @\d+$/),
      'zero 2 0', // CONTINUE: pc.bios carried over from the previous section
      'page 0 61440',
      'eof',
    ]);
    expect(result.tail).toEqual(synthTail());
    expect(result.summary).toMatchObject({
      streamBytes: stream.length,
      prologueBytes: 26,
      ramParts: 2,
      ramEnd: false,
      pages: 3,
      zeroPages: 2,
      blocks: [
        { idstr: 'pc.ram', pages: 2, zeroPages: 1 },
        { idstr: '/rom@etc/acpi/tables', pages: 0, zeroPages: 0 },
        { idstr: 'pc.bios', pages: 1, zeroPages: 1 },
      ],
      deviceTailOffset: stream.length - synthTail().length,
      deviceTailBytes: synthTail().length,
      vmDescription: { page_size: 4096, devices: [{ name: 'timer', instance_id: 0 }] },
    });
    expect(stream[result.summary!.eofOffset]).toBe(0);
  });

  it('hands over exact prologue and START bytes', () => {
    const result = parse(stream);
    expect(result.prologue!.bytes).toEqual(encodePrologue({ machine: 'pc-i440fx-7.2', capabilities: [] }));
    expect(result.ramSetup!.bytes).toEqual(
      encodeRamSetupSection({ sectionId: 2, blocks: SYNTH_BLOCKS, footers: true, ignoreShared: false }),
    );
  });

  it.each(CHUNKINGS)('gives identical results fed in chunks of %s', (_, sizes) => {
    const whole = parse(stream);
    const chunked = parseInChunks(stream, sizes);
    expect(chunked.events).toEqual(whole.events);
    expect(chunked.tail).toEqual(whole.tail);
    expect(chunked.summary).toEqual(whole.summary);
  });

  /** Feeds `stream` through one buffer, overwritten with garbage after every call. */
  function parseThroughOneBuffer(borrowed: boolean, sizes: number[]) {
    const { sink, result } = collectingSink();
    const parser = new MigrationStreamParser(sink);
    const reused = Buffer.alloc(9000);
    for (let pos = 0, i = 0; pos < stream.length; i++) {
      const n = Math.min(sizes[i % sizes.length]!, stream.length - pos);
      stream.copy(reused, 0, pos, pos + n);
      const chunk = reused.subarray(0, n);
      if (borrowed) parser.feedBorrowed(chunk);
      else parser.feed(chunk);
      reused.fill(0xa5);
      pos += n;
    }
    parser.end();
    return result;
  }

  it.each(CHUNKINGS)(
    'feedBorrowed gives identical results from one reused buffer, chunks of %s',
    (_, sizes) => {
      const whole = parse(stream);
      const reused = parseThroughOneBuffer(true, sizes);
      expect(reused.events).toEqual(whole.events);
      expect(reused.tail).toEqual(whole.tail);
      expect(reused.summary).toEqual(whole.summary);
    },
  );

  it('feed() from a reused buffer goes wrong (negative control for feedBorrowed)', () => {
    const whole = parse(stream);
    let wrong: unknown;
    try {
      wrong = parseThroughOneBuffer(false, [4097]).events;
    } catch (err) {
      wrong = err;
    }
    expect(wrong).not.toEqual(whole.events);
  });

  it('detects a changed page byte (negative control for the comparisons above)', () => {
    const changed = Buffer.from(stream);
    const at = changed.indexOf(page(3));
    expect(at).toBeGreaterThan(0);
    changed[at + 5]! ^= 1;
    expect(parse(changed).events).not.toEqual(parse(stream).events);
  });

  it('passes pages as views of the input when they lie in one chunk, else in a 4096-byte copy', () => {
    const views: boolean[] = [];
    const { sink } = collectingSink();
    const viewSink: StreamSink = {
      ...sink,
      onPage(_block, _offset, data) {
        views.push(data.buffer === stream.buffer);
        expect(data.length).toBe(PAGE_SIZE);
      },
    };
    parseMigrationStream(stream, viewSink);
    expect(views).toEqual([true, true, true]);
    views.length = 0;
    const parser = new MigrationStreamParser(viewSink);
    for (let pos = 0; pos < stream.length; pos += 1000) parser.feed(stream.subarray(pos, pos + 1000));
    parser.end();
    expect(views).toContain(false);
  });

  it('reports the first PART before it has the whole section (the resume signal comes early)', () => {
    const parts: number[] = [];
    const { sink } = collectingSink();
    const parser = new MigrationStreamParser({ ...sink, onRamPart: (i) => parts.push(i) });
    const firstPartAt =
      26 +
      encodeRamSetupSection({ sectionId: 2, blocks: SYNTH_BLOCKS, footers: true, ignoreShared: false })
        .length;
    parser.feed(stream.subarray(0, firstPartAt + 5));
    expect(parts).toEqual([0]);
    expect(parser.ramPartSeen).toBe(true);
  });

  it('parses streams without section footers (machine types before 2.4)', () => {
    const result = parse(synthStream({ footers: false }));
    expect(result.summary).toMatchObject({ pages: 3, zeroPages: 2, ramParts: 2 });
  });

  it('parses a precopy stream with a RAM END section', () => {
    const end = encodeRamSection(2, [{ idstr: 'pc.ram', offset: 0, data: page(9) }], { type: 3 });
    const { sink, result } = collectingSink();
    parseMigrationStream(synthStream({ end }), sink);
    expect(result.events.slice(-3).map((e) => e.replace(/ [0-9a-f]{12}$/, ''))).toEqual([
      'end',
      'page 0 0',
      'eof',
    ]);
    expect(result.summary).toMatchObject({ ramEnd: true, ramParts: 2, pages: 4 });
  });

  it('skips MULTIFD_FLUSH records and the SWITCHOVER_START command', () => {
    const part = encodeRamSection(2, [{ idstr: 'pc.ram', offset: 0 }]);
    const withFlush = Buffer.concat([
      part.subarray(0, -13),
      Buffer.from('0000000000000200', 'hex'),
      part.subarray(-13),
    ]);
    const result = parse(synthStream({ parts: [withFlush, encodeCommand(MigCommand.SWITCHOVER_START)] }));
    expect(result.summary).toMatchObject({ skippedRecords: 2, zeroPages: 1 });
  });

  it('reads x-ignore-shared block addresses', () => {
    const result = parse(synthStream({ capabilities: ['x-ignore-shared'] }));
    expect(result.prologue!.capabilities).toEqual(['x-ignore-shared']);
    expect(result.ramSetup!.ignoreShared).toBe(true);
    expect(result.ramSetup!.blocks[0]!.mrAddr).toBe(0n);
  });

  it('accepts a tail without VMDESCRIPTION only with requireVmDescription: false', () => {
    const tail = Buffer.concat([
      encodeFullSection({ sectionId: 0, idstr: 'timer', instanceId: 0, versionId: 2 }, Buffer.alloc(3, 1)),
      encodeDeviceTailEnd(),
    ]);
    const s = synthStream({ tail });
    expect(streamErrorOf(() => parse(s)).code).toBe('QSNAP_STREAM_TRUNCATED');
    const { sink } = collectingSink();
    const summary = parseMigrationStream(s, sink, { requireVmDescription: false });
    expect(summary.vmDescription).toBeUndefined();
    expect(summary.eofOffset).toBe(s.length - 1);
  });
});

describe('MigrationStreamParser refuses', () => {
  const code = (stream: Buffer, options?: Parameters<typeof parseMigrationStream>[2]) =>
    streamErrorOf(() => parseMigrationStream(stream, collectingSink().sink, options));

  it('CONTINUE before any record named a block', () => {
    const part = continueFirstRecord(encodeRamSection(2, [{ idstr: 'pc.ram', offset: 0 }]));
    const err = code(synthStream({ parts: [part] }));
    expect(err.code).toBe('QSNAP_STREAM_FORMAT');
    expect(err.offset).toBe(26 + encodeSetupLength() + 5);
  });

  it('a block that is not in the block list', () => {
    const err = code(synthStream({ parts: [encodeRamSection(2, [{ idstr: 'vga.vram', offset: 0 }])] }));
    expect(err.code).toBe('QSNAP_STREAM_FORMAT');
    expect(err.details).toMatchObject({ idstr: 'vga.vram' });
  });

  it('an offset at or past used_length, on both the fast and the slow path', () => {
    const past = encodeRamSection(2, [
      { idstr: 'pc.bios', offset: 0 },
      { idstr: 'pc.bios', offset: 4 * PAGE_SIZE, data: page(1) },
    ]);
    expect(code(synthStream({ parts: [past] })).code).toBe('QSNAP_STREAM_FORMAT');
    const named = encodeRamSection(2, [{ idstr: 'pc.bios', offset: 4 * PAGE_SIZE }]);
    expect(code(synthStream({ parts: [named] })).code).toBe('QSNAP_STREAM_FORMAT');
  });

  it('a footer for another section, a PART of another section, a PART after END', () => {
    const part = encodeRamSection(2, [{ idstr: 'pc.ram', offset: 0 }]);
    const badFooter = Buffer.from(part);
    badFooter.writeUInt32BE(3, badFooter.length - 4);
    expect(code(synthStream({ parts: [badFooter] })).details).toMatchObject({ found: 3, expected: 2 });
    const other = Buffer.from(part);
    other.writeUInt32BE(3, 1);
    expect(code(synthStream({ parts: [other] })).code).toBe('QSNAP_STREAM_FORMAT');
    const end = encodeRamSection(2, [], { type: 3 });
    expect(code(synthStream({ parts: [end, part] })).code).toBe('QSNAP_STREAM_FORMAT');
  });

  it('a ZERO record whose fill byte is not 0', () => {
    const part = encodeRamSection(2, [
      { idstr: 'pc.ram', offset: 0 },
      { idstr: 'pc.ram', offset: PAGE_SIZE },
    ]);
    const first = Buffer.from(part);
    first[5 + 8 + 1 + 6] = 0xff; // fill of the named record (slow path)
    expect(code(synthStream({ parts: [first] })).code).toBe('QSNAP_STREAM_FORMAT');
    const second = Buffer.from(part);
    second[5 + 8 + 1 + 6 + 1 + 8] = 0x01; // fill of the CONTINUE record (fast path falls back)
    expect(code(synthStream({ parts: [second] })).code).toBe('QSNAP_STREAM_FORMAT');
  });

  it('XBZRLE and compressed pages, RDMA hooks', () => {
    for (const flags of [0x40, 0x100, 0x80]) {
      const part = encodeRamSection(2, [{ idstr: 'pc.ram', offset: 0 }]);
      part.writeUInt32BE(flags, 5 + 4);
      expect(code(synthStream({ parts: [part] })).code).toBe('QSNAP_STREAM_UNSUPPORTED');
    }
  });

  it('capabilities that change the format, like mapped-ram', () => {
    const prologue = encodePrologue({ machine: 'pc', capabilities: ['mapped-ram'] });
    const err = code(synthStream({ prologue }));
    expect(err.code).toBe('QSNAP_STREAM_UNSUPPORTED');
    expect(err.hint).toMatch(/disable the mapped-ram migration capability/);
  });

  it('a target page size other than 4096', () => {
    const prologue = encodePrologue({ machine: 'virt', capabilities: [], targetPageBits: 16 });
    expect(code(synthStream({ prologue })).code).toBe('QSNAP_STREAM_UNSUPPORTED');
    const tail = Buffer.concat([encodeDeviceTailEnd({ page_size: 65536, devices: [] })]);
    expect(code(synthStream({ tail })).code).toBe('QSNAP_STREAM_UNSUPPORTED');
  });

  it('a device saved before RAM START (early setup, ≥ 8.0)', () => {
    const early = encodeFullSection(
      { sectionId: 9, idstr: 'virtio-mem', instanceId: 0, versionId: 1 },
      Buffer.alloc(0),
    );
    const prologue = encodePrologue({ machine: 'pc', capabilities: [] });
    const err = code(Buffer.concat([prologue, early]));
    expect(err.code).toBe('QSNAP_STREAM_UNSUPPORTED');
    expect(err.details).toMatchObject({ idstr: 'virtio-mem', offset: prologue.length });
  });

  it('iterable sections other than RAM', () => {
    const prologue = encodePrologue({ machine: 'pc', capabilities: [] });
    const dirty = Buffer.from('01000000030c64697274792d6269746d61700000000000000001', 'hex');
    const err = code(Buffer.concat([prologue, dirty]));
    expect(err.code).toBe('QSNAP_STREAM_UNSUPPORTED');
    expect(err.hint).toMatch(/dirty-bitmaps/);
  });

  it('commands: postcopy advise before RAM, and any other command', () => {
    const prologue = encodePrologue({ machine: 'pc', capabilities: [] });
    const advise = encodeCommand(MigCommand.POSTCOPY_ADVISE, Buffer.alloc(16));
    const err = code(Buffer.concat([prologue, advise]));
    expect(err.code).toBe('QSNAP_STREAM_UNSUPPORTED');
    expect(err.hint).toMatch(/postcopy/);
    const ping = encodeCommand(MigCommand.PING, Buffer.alloc(4));
    expect(code(synthStream({ parts: [ping] })).code).toBe('QSNAP_STREAM_UNSUPPORTED');
    const early = encodeCommand(MigCommand.SWITCHOVER_START);
    expect(code(Buffer.concat([prologue, early])).code).toBe('QSNAP_STREAM_UNSUPPORTED');
  });

  it('a second RAM START, an EOF without RAM, unknown section types', () => {
    const setup = encodeRamSetupSection({
      sectionId: 2,
      blocks: SYNTH_BLOCKS,
      footers: true,
      ignoreShared: false,
    });
    expect(code(synthStream({ parts: [setup] })).code).toBe('QSNAP_STREAM_FORMAT');
    const prologue = encodePrologue({ machine: 'pc', capabilities: [] });
    expect(code(Buffer.concat([prologue, encodeDeviceTailEnd()])).code).toBe('QSNAP_STREAM_FORMAT');
    for (const type of [0x05, 0x06, 0x07, 0x7e, 0x09, 0xff]) {
      const err = code(synthStream({ parts: [Buffer.of(type)] }));
      expect(err.code, `type ${type}`).toBe('QSNAP_STREAM_FORMAT');
      expect(err.offset).toBe(26 + encodeSetupLength());
    }
  });

  it('buffered items over their limits', () => {
    const stream = synthStream();
    expect(code(stream, { maxPrologueBytes: 20 }).code).toBe('QSNAP_STREAM_LIMIT');
    expect(code(stream, { maxRamSetupBytes: 40 }).code).toBe('QSNAP_STREAM_LIMIT');
    const err = code(stream, { maxDeviceTailBytes: 30 });
    expect(err.code).toBe('QSNAP_STREAM_LIMIT');
    expect(err.details).toMatchObject({ limit: 30 });
    expect(
      parseMigrationStream(stream, collectingSink().sink, { maxDeviceTailBytes: synthTail().length }).pages,
    ).toBe(3);
  });

  it('an end inside a record, a section or the tail', () => {
    const stream = synthStream();
    for (const cut of [0, 5, 26, 40, 26 + encodeSetupLength() + 3, stream.length - 200, stream.length - 1]) {
      const parser = new MigrationStreamParser(collectingSink().sink);
      parser.feed(stream.subarray(0, cut));
      const err = streamErrorOf(() => parser.end());
      expect(err.code, `cut at ${cut}`).toBe('QSNAP_STREAM_TRUNCATED');
      expect(err.offset).toBe(cut);
    }
  });
});

describe('MigrationStreamParser lifecycle', () => {
  it('rethrows its first error and refuses use after end', () => {
    const parser = new MigrationStreamParser(collectingSink().sink);
    const first = streamErrorOf(() => parser.feed(Buffer.from('nope')));
    expect(streamErrorOf(() => parser.feed(synthStream()))).toBe(first);
    expect(streamErrorOf(() => parser.end())).toBe(first);

    const done = new MigrationStreamParser(collectingSink().sink);
    done.feed(synthStream());
    done.end();
    expect(streamErrorOf(() => done.feed(Buffer.of(0))).code).toBe('QSNAP_STREAM_FORMAT');
  });

  it('lets a sink error out of feed() and stays failed', () => {
    const { sink } = collectingSink();
    const boom = new Error('disk full');
    const parser = new MigrationStreamParser({
      ...sink,
      onPage: () => {
        throw boom;
      },
    });
    expect(() => parser.feed(synthStream())).toThrow(boom);
    expect(() => parser.end()).toThrow(boom);
  });

  it('counts bytes fed, through the tail', () => {
    const stream = synthStream();
    const parser = new MigrationStreamParser(collectingSink().sink);
    parser.feed(stream.subarray(0, 100));
    expect(parser.bytesFed).toBe(100);
    parser.feed(stream.subarray(100));
    expect(parser.bytesFed).toBe(stream.length);
    expect(parser.end().streamBytes).toBe(stream.length);
  });
});

function encodeSetupLength(): number {
  return encodeRamSetupSection({ sectionId: 2, blocks: SYNTH_BLOCKS, footers: true, ignoreShared: false })
    .length;
}
