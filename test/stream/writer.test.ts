/** Writer → parser round trips (tar-stream test/dual.js style) and the writer's own checks. */
import { Readable, Writable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { describe, expect, it } from 'vitest';
import {
  encodeRamSetupSection,
  type MigrationStreamInput,
  MigrationStreamParser,
  PAGE_SIZE,
  type RamPageRun,
  SectionPool,
  writeMigrationStream,
} from '../../src/stream/index.js';
import {
  asyncStreamErrorOf,
  BACKGROUND_FIXTURE,
  type Collected,
  collectAsync,
  collectingSink,
  feedInChunks,
  loadFixture,
  parseInChunks,
  randomSizes,
  runsFromImage,
  synthStream,
} from './helpers.js';

function parseWithImages(stream: Buffer, sizes: number[] | 'whole' = 'whole'): Collected {
  const { sink, result } = collectingSink({ images: true });
  const parser = new MigrationStreamParser(sink);
  feedInChunks(parser, stream, sizes);
  parser.end();
  return result;
}

/** Writer input that re-sends everything `source` carried. */
function inputFrom(source: Collected, overrides: Partial<MigrationStreamInput> = {}): MigrationStreamInput {
  return {
    prologue: source.prologue!.bytes,
    ramSetup: { bytes: source.ramSetup!.bytes },
    pages: (_block, index) => runsFromImage(source.images![index]!),
    deviceTail: source.tail,
    ...overrides,
  };
}

function expectSameRam(a: Collected, b: Collected, skip: number[] = []): void {
  expect(b.images!.length).toBe(a.images!.length);
  for (const [i, image] of a.images!.entries()) {
    if (skip.includes(i)) continue;
    expect(Buffer.compare(b.images![i]!.data, image.data), `block ${i} data`).toBe(0);
    expect(Buffer.from(b.images![i]!.kinds).equals(Buffer.from(image.kinds)), `block ${i} page kinds`).toBe(
      true,
    );
  }
}

describe('writeMigrationStream round trips', () => {
  it('re-synthesizes a synthetic stream with the same pages, prologue, START and tail', async () => {
    const original = parseWithImages(synthStream());
    const out = Buffer.concat(await collectAsync(writeMigrationStream(inputFrom(original))));
    const again = parseWithImages(out);
    expectSameRam(original, again);
    expect(again.prologue!.bytes).toEqual(original.prologue!.bytes);
    expect(again.ramSetup!.bytes).toEqual(original.ramSetup!.bytes);
    expect(again.tail).toEqual(original.tail);
    expect(again.summary).toMatchObject({ pages: 3, zeroPages: 2, ramParts: 1 });
  });

  describe('the QEMU 7.2 background-snapshot fixture', () => {
    const stream = loadFixture(BACKGROUND_FIXTURE);
    const original = parseWithImages(stream);

    it('round-trips every page in sections of at most maxSectionBytes', async () => {
      const maxSectionBytes = 64 * 1024;
      const chunks = await collectAsync(writeMigrationStream(inputFrom(original, { maxSectionBytes })));
      const parts = chunks.slice(2, -1);
      expect(parts.length).toBeGreaterThan(5);
      for (const part of parts) {
        expect(part.length).toBeLessThanOrEqual(maxSectionBytes);
        expect(part[0]).toBe(0x02);
        // Each section names its block in its first record: no CONTINUE flag.
        expect(part.readUInt32BE(5 + 4) & 0x20).toBe(0);
      }
      const out = Buffer.concat(chunks);
      const again = parseWithImages(out, randomSizes(300, 70000, 3));
      expectSameRam(original, again);
      expect(again.summary).toMatchObject({
        pages: original.summary!.pages,
        zeroPages: original.summary!.zeroPages,
        blocks: original.summary!.blocks,
        ramParts: parts.length,
      });
      expect(again.tail).toEqual(original.tail);
      expect(out.subarray(out.length - original.tail.length)).toEqual(original.tail);
    });

    it('detects a changed page in the round trip (negative control)', async () => {
      const altered = {
        ...original,
        images: original.images!.map((im) => ({ data: Buffer.from(im.data), kinds: im.kinds })),
      };
      const dataPage = altered.images![0]!.kinds.indexOf(1);
      altered.images![0]!.data[dataPage * PAGE_SIZE + 17]! ^= 0xff;
      const again = parseWithImages(
        Buffer.concat(await collectAsync(writeMigrationStream(inputFrom(altered)))),
      );
      expect(() => expectSameRam(original, again)).toThrow();
    });

    it('skips a block entirely, leaving the others intact', async () => {
      const out = Buffer.concat(
        await collectAsync(
          writeMigrationStream(
            inputFrom(original, {
              pages: (block, index) =>
                block.idstr === 'pc.ram' ? 'skip' : runsFromImage(original.images![index]!),
            }),
          ),
        ),
      );
      const again = parseWithImages(out);
      expect(again.summary!.blocks[0]).toEqual({ idstr: 'pc.ram', pages: 0, zeroPages: 0 });
      expect(again.summary!.blocks.slice(1)).toEqual(original.summary!.blocks.slice(1));
      expectSameRam(original, again, [0]);
      expect(again.ramSetup!.blocks).toEqual(original.ramSetup!.blocks);
    });

    it('re-encodes the START section byte for byte from the block list', async () => {
      const { bytes: _bytes, ...setup } = original.ramSetup!;
      expect(encodeRamSetupSection(setup)).toEqual(original.ramSetup!.bytes);
      const chunks = await collectAsync(writeMigrationStream(inputFrom(original, { ramSetup: setup })));
      expect(chunks[1]).toEqual(original.ramSetup!.bytes);
    });

    it('sends nothing but prologue, START and tail when every block is skipped', async () => {
      const chunks = await collectAsync(writeMigrationStream(inputFrom(original, { pages: () => 'skip' })));
      expect(chunks).toEqual([original.prologue!.bytes, original.ramSetup!.bytes, original.tail]);
      const again = parseInChunks(Buffer.concat(chunks), 'whole');
      expect(again.summary).toMatchObject({ pages: 0, zeroPages: 0, ramParts: 0 });
    });
  });
});

describe('writeMigrationStream with a SectionPool', () => {
  const original = parseWithImages(loadFixture(BACKGROUND_FIXTURE));
  const maxSectionBytes = 64 * 1024;

  it('gives the same bytes when the consumer hands each section back, and reuses their memory', async () => {
    const plain = Buffer.concat(
      await collectAsync(writeMigrationStream(inputFrom(original, { maxSectionBytes }))),
    );
    const pool = new SectionPool(maxSectionBytes);
    const copies: Buffer[] = [];
    const memories = new Set<ArrayBufferLike>();
    let held: Buffer | undefined;
    for await (const chunk of writeMigrationStream(inputFrom(original, { sections: pool }))) {
      copies.push(Buffer.from(chunk));
      memories.add(chunk.buffer);
      // As a socket does: the previous chunk is done once the next one is handed over.
      if (held) pool.give(held);
      held = chunk;
    }
    expect(Buffer.concat(copies).equals(plain)).toBe(true);
    const parts = copies.filter((c) => c[0] === 0x02).length;
    expect(parts).toBeGreaterThan(5);
    // Two section buffers in turn (plus the prologue, START and tail that are not the pool's).
    expect(memories.size).toBeLessThan(parts);
  });

  it('ignores chunks it did not hand out, and a section given back twice is reused once', () => {
    const pool = new SectionPool(4096 * 4);
    const a = pool.take();
    pool.give(Buffer.alloc(10));
    pool.give(a.subarray(0, 100));
    pool.give(a.subarray(0, 100));
    const b = pool.take();
    expect(b.buffer).toBe(a.buffer);
    expect(b.length).toBe(4096 * 4);
    expect(pool.take().buffer).not.toBe(a.buffer);
  });
});

describe('writeMigrationStream as a Node stream', () => {
  it('pulls pages only as the consumer reads (backpressure)', async () => {
    const original = parseWithImages(synthStream());
    let pulled = 0;
    async function* manyPages(): AsyncGenerator<RamPageRun> {
      for (let i = 0; i < 16; i++) {
        pulled++;
        yield { offset: i * PAGE_SIZE, data: Buffer.alloc(PAGE_SIZE, i) };
      }
    }
    const gen = writeMigrationStream(
      inputFrom(original, {
        pages: (block) => (block.idstr === 'pc.ram' ? manyPages() : 'skip'),
        maxSectionBytes: 3 * (PAGE_SIZE + 300),
      }),
    );
    await gen.next(); // prologue
    await gen.next(); // START
    expect(pulled).toBe(0);
    await gen.next(); // first PART: at most the pages one section holds, plus one
    expect(pulled).toBeLessThanOrEqual(4);
    const rest = await collectAsync(gen);
    expect(pulled).toBe(16);
    expect(rest.length).toBeGreaterThan(4);
  });

  it('pipes through Readable.from into a writable', async () => {
    const original = parseWithImages(synthStream());
    const received: Buffer[] = [];
    await pipeline(
      Readable.from(writeMigrationStream(inputFrom(original))),
      new Writable({
        highWaterMark: 1,
        write(chunk: Buffer, _enc, cb) {
          received.push(chunk);
          setImmediate(cb);
        },
      }),
    );
    expectSameRam(original, parseWithImages(Buffer.concat(received)));
  });

  it('takes the device tail as an async iterable of chunks', async () => {
    const original = parseWithImages(synthStream());
    async function* tail() {
      yield original.tail.subarray(0, 10);
      yield original.tail.subarray(10);
    }
    const out = Buffer.concat(
      await collectAsync(writeMigrationStream(inputFrom(original, { deviceTail: tail() }))),
    );
    expect(parseWithImages(out).tail).toEqual(original.tail);
  });
});

describe('writeMigrationStream refuses', () => {
  const original = parseWithImages(synthStream());
  const run = (overrides: Partial<MigrationStreamInput>) =>
    asyncStreamErrorOf(() => collectAsync(writeMigrationStream(inputFrom(original, overrides))));

  it('page runs that are misaligned, partial or past the block', async () => {
    const runs: RamPageRun[] = [
      { offset: 100, zeroPages: 1 },
      { offset: 0, data: Buffer.alloc(100) },
      { offset: 15 * PAGE_SIZE, zeroPages: 2 },
      { offset: -PAGE_SIZE, zeroPages: 1 },
    ];
    for (const r of runs) {
      const err = await run({ pages: () => [r] });
      expect(err.code).toBe('QSNAP_STREAM_FORMAT');
    }
  });

  it('prologue or START bytes that are not exactly what they claim', async () => {
    expect((await run({ prologue: original.prologue!.bytes.subarray(0, 20) })).code).toBe(
      'QSNAP_STREAM_FORMAT',
    );
    const extra = Buffer.concat([original.ramSetup!.bytes, Buffer.of(0x02)]);
    expect((await run({ ramSetup: { bytes: extra } })).code).toBe('QSNAP_STREAM_FORMAT');
    const { bytes: _b, ...setup } = original.ramSetup!;
    expect((await run({ ramSetup: { ...setup, ignoreShared: true } })).code).toBe('QSNAP_STREAM_FORMAT');
  });

  it('a device tail that does not start with a device section or EOF, or is empty', async () => {
    expect((await run({ deviceTail: Buffer.from('hello') })).code).toBe('QSNAP_STREAM_FORMAT');
    expect((await run({ deviceTail: Buffer.alloc(0) })).code).toBe('QSNAP_STREAM_FORMAT');
  });

  it('sections too small for one page', async () => {
    await expect(
      collectAsync(writeMigrationStream(inputFrom(original, { maxSectionBytes: 4096 }))),
    ).rejects.toThrow(RangeError);
  });
});
