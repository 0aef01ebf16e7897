/**
 * Mutations of real fixtures, as fast-check arbitraries (so a failure shrinks to the fewest,
 * smallest mutations): bit flips, byte writes, truncations, deletions, inserted bytes, repeated
 * sections, and huge lengths, counts and offsets written over a field. Positions are either
 * anywhere in the input or near an anchor: a structural offset of the fixture (a section start,
 * a length field), where a mutation is most likely to reach past the first check.
 *
 * A mutation list is plain JSON, so a failure is kept as a regression (regressions/*.json) and
 * replayed without fast-check.
 */
import fc from 'fast-check';

/** Where a mutation applies: `delta` bytes from anchor `near` (mod the anchor count), or a fraction of the input. */
export type Position = { near: number; delta: number } | { fraction: number };

/** Values written over a field: all ones, the sign bit, just below it, zero, or one of the generator's own. */
export type HugeValue = 'max' | 'sign' | 'below-sign' | 'zero' | { value: number };

export type Mutation =
  | { kind: 'flip'; at: Position; bit: number }
  | { kind: 'byte'; at: Position; value: number }
  | { kind: 'truncate'; at: Position }
  | { kind: 'delete'; at: Position; length: number }
  | { kind: 'insert'; at: Position; bytes: number[] }
  /** The bytes from anchor `section` to the next anchor, inserted `times` times at `at`. */
  | { kind: 'repeat'; section: number; at: Position; times: number }
  | { kind: 'huge'; at: Position; width: 1 | 2 | 4 | 8; endian: 'be' | 'le'; value: HugeValue };

const position: fc.Arbitrary<Position> = fc.oneof(
  { weight: 3, arbitrary: fc.record({ near: fc.nat(), delta: fc.integer({ min: -16, max: 16 }) }) },
  {
    weight: 1,
    arbitrary: fc.record({ fraction: fc.double({ min: 0, max: 1, maxExcluded: true, noNaN: true }) }),
  },
);

const huge: fc.Arbitrary<HugeValue> = fc.oneof(
  fc.constantFrom<HugeValue>('max', 'sign', 'below-sign', 'zero'),
  fc.record({ value: fc.nat() }),
);

export const mutation: fc.Arbitrary<Mutation> = fc.oneof(
  {
    weight: 4,
    arbitrary: fc.record({ kind: fc.constant('flip'), at: position, bit: fc.integer({ min: 0, max: 7 }) }),
  },
  {
    weight: 2,
    arbitrary: fc.record({
      kind: fc.constant('byte'),
      at: position,
      value: fc.integer({ min: 0, max: 255 }),
    }),
  },
  { weight: 1, arbitrary: fc.record({ kind: fc.constant('truncate'), at: position }) },
  {
    weight: 1,
    arbitrary: fc.record({
      kind: fc.constant('delete'),
      at: position,
      length: fc.integer({ min: 1, max: 4096 }),
    }),
  },
  {
    weight: 1,
    arbitrary: fc.record({
      kind: fc.constant('insert'),
      at: position,
      bytes: fc.array(fc.integer({ min: 0, max: 255 }), { minLength: 1, maxLength: 64 }),
    }),
  },
  {
    weight: 2,
    arbitrary: fc.record({
      kind: fc.constant('repeat'),
      section: fc.nat(),
      at: position,
      times: fc.integer({ min: 1, max: 8 }),
    }),
  },
  {
    weight: 3,
    arbitrary: fc.record({
      kind: fc.constant('huge'),
      at: position,
      width: fc.constantFrom<1 | 2 | 4 | 8>(1, 2, 4, 8),
      endian: fc.constantFrom<'be' | 'le'>('be', 'le'),
      value: huge,
    }),
  },
);

export const mutations: fc.Arbitrary<Mutation[]> = fc.array(mutation, { minLength: 1, maxLength: 4 });

/** The input after every mutation in turn (the original is never modified). */
export function applyMutations(input: Buffer, anchors: readonly number[], list: readonly Mutation[]): Buffer {
  let out = input;
  for (const m of list) out = applyMutation(out, anchors, m);
  return out;
}

function resolve(at: Position, length: number, anchors: readonly number[]): number {
  if (length === 0) return 0;
  const raw =
    'fraction' in at ? Math.floor(at.fraction * length) : anchors[at.near % anchors.length]! + at.delta;
  return Math.min(Math.max(raw, 0), length - 1);
}

function applyMutation(input: Buffer, anchors: readonly number[], m: Mutation): Buffer {
  const at = resolve(m.at, input.length, anchors);
  switch (m.kind) {
    case 'flip':
    case 'byte': {
      if (input.length === 0) return input;
      const out = Buffer.from(input);
      out[at] = m.kind === 'flip' ? out[at]! ^ (1 << m.bit) : m.value;
      return out;
    }
    case 'truncate':
      return input.subarray(0, at);
    case 'delete':
      return Buffer.concat([input.subarray(0, at), input.subarray(at + m.length)]);
    case 'insert':
      return Buffer.concat([input.subarray(0, at), Buffer.from(m.bytes), input.subarray(at)]);
    case 'repeat': {
      const section = sectionBytes(input, anchors, m.section);
      const copies = Array.from({ length: m.times }, () => section);
      return Buffer.concat([input.subarray(0, at), ...copies, input.subarray(at)]);
    }
    case 'huge': {
      const out = Buffer.from(input);
      writeHuge(out, at, m.width, m.endian, m.value);
      return out;
    }
  }
}

/** The bytes from one anchor to the next (at most 64 KiB, so a repeat stays cheap). */
function sectionBytes(input: Buffer, anchors: readonly number[], index: number): Buffer {
  if (anchors.length === 0) return input.subarray(0, 0);
  const sorted = [...anchors].sort((a, b) => a - b);
  const i = index % sorted.length;
  const start = Math.min(sorted[i]!, input.length);
  const end = Math.min(sorted[i + 1] ?? input.length, input.length, start + 65536);
  return input.subarray(start, end);
}

function writeHuge(out: Buffer, at: number, width: number, endian: 'be' | 'le', value: HugeValue): void {
  const bits = BigInt(width * 8);
  const all = (1n << bits) - 1n;
  const v =
    value === 'max'
      ? all
      : value === 'sign'
        ? 1n << (bits - 1n)
        : value === 'below-sign'
          ? (1n << (bits - 1n)) - 1n
          : value === 'zero'
            ? 0n
            : BigInt(value.value) & all;
  for (let i = 0; i < width && at + i < out.length; i++) {
    const shift = BigInt(endian === 'be' ? width - 1 - i : i) * 8n;
    out[at + i] = Number((v >> shift) & 0xffn);
  }
}

/** A chunking of the input: the first `smallBytes` in chunks cycling through `sizes`, the rest in 64 KiB chunks. */
export interface Chunking {
  smallBytes: number;
  sizes: number[];
}

export const chunking: fc.Arbitrary<Chunking | 'whole'> = fc.oneof(
  fc.constant<'whole'>('whole'),
  fc.record({
    smallBytes: fc.integer({ min: 0, max: 65536 }),
    sizes: fc.array(fc.integer({ min: 1, max: 5000 }), { minLength: 1, maxLength: 4 }),
  }),
);

export function* chunksOf(input: Buffer, how: Chunking | 'whole'): Generator<Buffer> {
  if (how === 'whole') {
    yield input;
    return;
  }
  let at = 0;
  let i = 0;
  while (at < input.length) {
    const size = at < how.smallBytes ? how.sizes[i++ % how.sizes.length]! : 65536;
    yield input.subarray(at, at + size);
    at += size;
  }
}
