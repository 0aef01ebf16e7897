/**
 * What the fuzzer runs on mutated input, and what it accepts: a target either succeeds or
 * fails with one of the coded errors it documents. Anything else (a TypeError, a RangeError,
 * an uncoded Error, a page handed out beyond its block, a run that takes seconds) is a finding.
 */

import { createHash } from 'node:crypto';
import { open, truncate } from 'node:fs/promises';
import fc from 'fast-check';
import { snapshotStream } from '../../src/engine/restore/file-stream.js';
import { QsnapError } from '../../src/errors.js';
import { encodeTrailer, openSnapshot, parseManifest, TRAILER_SIZE } from '../../src/format/index.js';
import {
  BundleFormatError,
  checkHeader,
  decodeIndex,
  decodeTrailer,
  HEADER_BYTES,
  TRAILER_BYTES,
} from '../../src/store/bundle-format.js';
import { MigrationStreamParser, PAGE_SIZE, type RamBlock, StreamError } from '../../src/stream/index.js';
import { decodeBackingName, decodeQcow2Header, Qcow2FormatError } from '../../src/vm/qcow2.js';
import type { Fixture, SnapshotFixture } from './fixtures.js';
import {
  applyMutations,
  type Chunking,
  chunking,
  chunksOf,
  type Mutation,
  mutation,
  mutations,
} from './mutate.js';

/** What one execution ended with: 'ok' or the code of the error it was refused with. */
export type Outcome = string;

export interface FuzzTarget<I> {
  name: string;
  input: fc.Arbitrary<I>;
  /** Runs one input; throws (a finding) for anything but success or an accepted coded error. */
  run(input: I): Promise<Outcome>;
}

/** A finding: not a coded error, or a coded one the target does not document. */
export class Finding extends Error {}

function codedOutcome(err: unknown, prefixes: readonly string[]): Outcome {
  if (err instanceof QsnapError && prefixes.some((p) => err.code.startsWith(p))) return err.code;
  throw new Finding(
    `uncoded failure: ${err instanceof Error ? `${err.name}: ${err.message}` : String(err)}`,
    {
      cause: err,
    },
  );
}

// --- the migration stream parser ----------------------------------------------------------

export interface StreamInput {
  fixture: number;
  mutations: Mutation[];
  chunking: Chunking | 'whole';
}

/** Limits low enough that inserted and repeated sections reach them. */
const STREAM_LIMITS = { maxDeviceTailBytes: 1024 * 1024, maxRamSetupBytes: 64 * 1024 };

export function streamTarget(fixtures: Fixture[]): FuzzTarget<StreamInput> {
  return {
    name: 'stream',
    input: fc.record({
      fixture: fc.integer({ min: 0, max: fixtures.length - 1 }),
      mutations,
      chunking,
    }),
    async run({ fixture, mutations: list, chunking: how }) {
      const f = fixtures[fixture]!;
      const input = applyMutations(f.bytes, f.anchors, list);
      let blocks: RamBlock[] = [];
      let tailBytes = 0;
      const parser = new MigrationStreamParser(
        {
          onPrologue: () => {},
          onRamSetup: (s) => {
            blocks = s.blocks;
          },
          onPage: (block, offset, data) => checkPage(blocks, block, offset, data.length),
          onZeroPage: (block, offset) => checkPage(blocks, block, offset, PAGE_SIZE),
          onRamPart: () => {},
          onEnd: (_s, tail) => {
            tailBytes = tail.length;
          },
        },
        STREAM_LIMITS,
      );
      try {
        for (const chunk of chunksOf(input, how)) parser.feed(chunk);
        parser.end();
      } catch (err) {
        if (err instanceof Finding) throw err;
        return codedOutcome(err, ['QSNAP_STREAM_']);
      }
      if (tailBytes > STREAM_LIMITS.maxDeviceTailBytes)
        throw new Finding(`a device tail of ${tailBytes} bytes`);
      return 'ok';
    },
  };
}

/** A page handed to the sink lies inside its block, page-aligned, 4096 bytes. */
function checkPage(blocks: RamBlock[], block: number, offset: number, length: number): void {
  const b = blocks[block];
  if (
    !b ||
    offset % PAGE_SIZE !== 0 ||
    offset < 0 ||
    offset + PAGE_SIZE > b.usedLength ||
    length !== PAGE_SIZE
  )
    throw new Finding(
      `page at ${offset} of block ${block} (${b?.idstr}, ${b?.usedLength} bytes), ${length} bytes`,
    );
}

// --- the snapshot file reader, and the manifest inside it ---------------------------------

/** A hostile value for a manifest field. */
const hostileValue: fc.Arbitrary<unknown> = fc.oneof(
  fc.constantFrom(
    -1,
    0,
    1,
    0.5,
    4096,
    2 ** 31,
    2 ** 32,
    2 ** 52,
    Number.MAX_SAFE_INTEGER,
    2 ** 53 + 2,
    1e308,
    '',
    '/etc/passwd',
    '../../../etc/passwd',
    'x'.repeat(70000),
    null,
    true,
    [],
    {},
  ),
  fc.integer(),
  fc.string({ maxLength: 20 }),
  fc.array(fc.nat(), { maxLength: 5 }),
);

export type ManifestEdit =
  | { kind: 'set'; path: number; value: unknown }
  | { kind: 'delete'; path: number }
  /** A number moved a little (off by one, by a page) or multiplied: near-valid manifests. */
  | { kind: 'nudge'; path: number; by: number; times: number }
  /** The array at `path` (or the one holding it) grows by `times` copies of its first element. */
  | { kind: 'grow'; path: number; times: number };

const manifestEdit: fc.Arbitrary<ManifestEdit> = fc.oneof(
  { weight: 4, arbitrary: fc.record({ kind: fc.constant('set'), path: fc.nat(), value: hostileValue }) },
  { weight: 1, arbitrary: fc.record({ kind: fc.constant('delete'), path: fc.nat() }) },
  {
    weight: 3,
    arbitrary: fc.record({
      kind: fc.constant('nudge'),
      path: fc.nat(),
      by: fc.constantFrom(-4096, -1, 1, 4096, 8192),
      times: fc.constantFrom(1, 1, 1, 2, 0),
    }),
  },
  {
    weight: 1,
    arbitrary: fc.record({
      kind: fc.constant('grow'),
      path: fc.nat(),
      times: fc.integer({ min: 1, max: 5000 }),
    }),
  },
);

export type FileInput =
  /** Raw mutations of everything after RAM (caught by checksums, mostly). */
  | { kind: 'meta'; mutations: Mutation[]; verify: boolean }
  /** A manifest edited field by field and sealed again with a valid trailer: past every checksum. */
  | { kind: 'manifest'; edits: ManifestEdit[]; verify: boolean }
  /** Damage to the RAM pages themselves. */
  | { kind: 'ram'; mutations: Mutation[]; verify: boolean };

type JsonPath = (string | number)[];

function leafPaths(value: unknown, at: JsonPath = [], out: JsonPath[] = []): JsonPath[] {
  out.push(at);
  if (Array.isArray(value)) for (const [i, v] of value.entries()) leafPaths(v, [...at, i], out);
  else if (value && typeof value === 'object')
    for (const [k, v] of Object.entries(value)) leafPaths(v, [...at, k], out);
  return out;
}

function editManifest(manifest: unknown, paths: JsonPath[], edits: ManifestEdit[]): unknown {
  const m = structuredClone(manifest) as Record<string, unknown>;
  for (const edit of edits) {
    const path = paths[edit.path % paths.length]!;
    if (path.length === 0) continue;
    const parent = path
      .slice(0, -1)
      .reduce<unknown>((o, k) => (o as Record<string, unknown> | undefined)?.[k as string], m);
    if (!parent || typeof parent !== 'object') continue;
    const key = path[path.length - 1]!;
    // an earlier edit may have turned an object into an array (or back): edit what is there
    if (Array.isArray(parent) !== (typeof key === 'number')) continue;
    const holder = parent as Record<string | number, unknown>;
    // a copy: fast-check hands the same constant object to many runs, and later edits change it
    if (edit.kind === 'set') holder[key] = structuredClone(edit.value);
    else if (edit.kind === 'nudge') {
      if (typeof holder[key] === 'number') holder[key] = (holder[key] as number) * edit.times + edit.by;
    } else if (edit.kind === 'delete') delete holder[key];
    else {
      const array = Array.isArray(holder[key])
        ? (holder[key] as unknown[])
        : Array.isArray(parent)
          ? parent
          : undefined;
      if (array?.length) for (let i = 0; i < edit.times; i++) array.push(structuredClone(array[0]));
    }
  }
  return m;
}

/** Manifest bytes sealed with a trailer that matches them, as the writer would seal them. */
function sealManifest(meta: Buffer, manifestAt: number, ramEnd: number, manifest: unknown): Buffer {
  const bytes = Buffer.from(`${JSON.stringify(manifest, null, 2)}\n`, 'utf8');
  const manifestOffset = ramEnd + manifestAt;
  const trailer = encodeTrailer({
    manifestOffset,
    manifestLength: bytes.length,
    manifestSha256: createHash('sha256').update(bytes).digest('hex'),
    fileLength: manifestOffset + bytes.length + TRAILER_SIZE,
  });
  return Buffer.concat([meta.subarray(0, manifestAt), bytes, trailer]);
}

export function fileTarget(f: SnapshotFixture): FuzzTarget<FileInput> {
  const paths = leafPaths(f.manifest);
  const manifestAt = f.metaAnchors[3]!;
  const ramAnchors = f.dataPages.flatMap((at) => [at, at + 2048]);
  const verify = fc.boolean();
  return {
    name: 'snapshot-file',
    input: fc.oneof(
      fc.record({ kind: fc.constant<'meta'>('meta'), mutations, verify }),
      {
        weight: 2,
        arbitrary: fc.record({
          kind: fc.constant<'manifest'>('manifest'),
          edits: fc.array(manifestEdit, { minLength: 1, maxLength: 3 }),
          verify,
        }),
      },
      fc.record({
        kind: fc.constant<'ram'>('ram'),
        mutations: fc.array(
          fc.record({
            kind: fc.constant<'flip'>('flip'),
            at: fc.record({ near: fc.nat(), delta: fc.integer({ min: -64, max: 64 }) }),
            bit: fc.integer({ min: 0, max: 7 }),
          }),
          { minLength: 1, maxLength: 3 },
        ),
        verify,
      }),
    ),
    async run(input) {
      const restoreRam: { at: number; byte: Buffer }[] = [];
      try {
        if (input.kind === 'ram') {
          const fd = await open(f.file, 'r+');
          try {
            for (const m of input.mutations) {
              if (m.kind !== 'flip' || !('near' in m.at)) continue;
              const at = Math.max(0, ramAnchors[m.at.near % ramAnchors.length]! + m.at.delta);
              const byte = Buffer.alloc(1);
              await fd.read(byte, 0, 1, at);
              restoreRam.push({ at, byte: Buffer.from(byte) });
              byte[0] = byte[0]! ^ (1 << m.bit);
              await fd.write(byte, 0, 1, at);
            }
          } finally {
            await fd.close();
          }
        } else {
          const meta =
            input.kind === 'meta'
              ? applyMutations(f.meta, f.metaAnchors, input.mutations)
              : sealManifest(f.meta, manifestAt, f.ramEnd, editManifest(f.manifest, paths, input.edits));
          await writeMeta(f, meta);
        }
        return await readWhole(f.file, input.verify || input.kind === 'ram');
      } finally {
        if (input.kind === 'ram') {
          const fd = await open(f.file, 'r+');
          for (const r of restoreRam.reverse()) await fd.write(r.byte, 0, 1, r.at);
          await fd.close();
        } else await writeMeta(f, f.meta);
      }
    },
  };
}

async function writeMeta(f: SnapshotFixture, meta: Buffer): Promise<void> {
  await truncate(f.file, f.ramEnd);
  const fd = await open(f.file, 'r+');
  try {
    await fd.write(meta, 0, meta.length, f.ramEnd);
  } finally {
    await fd.close();
  }
}

/**
 * What a restore reads: the head, then the migration stream it sends QEMU (prologue, every
 * block's pages checked, device tail: restore/file-stream.ts), which qsnap's own parser must
 * accept whole, pages inside their blocks; optionally verify() of every byte.
 */
async function readWhole(file: string, fullVerify: boolean): Promise<Outcome> {
  let reader: Awaited<ReturnType<typeof openSnapshot>> | undefined;
  try {
    reader = await openSnapshot(file);
    let blocks: RamBlock[] = [];
    const parser = new MigrationStreamParser({
      onPrologue: () => {},
      onRamSetup: (s) => {
        blocks = s.blocks;
      },
      onPage: (block, offset, data) => checkPage(blocks, block, offset, data.length),
      onZeroPage: (block, offset) => checkPage(blocks, block, offset, PAGE_SIZE),
      onRamPart: () => {},
      onEnd: () => {},
    });
    for await (const chunk of snapshotStream(reader, { skipMainBlock: false, verify: 'data' }))
      parser.feed(chunk);
    parser.end();
    if (fullVerify) await reader.verify();
    return 'ok';
  } catch (err) {
    if (err instanceof Finding) throw err;
    if (err instanceof StreamError) {
      throw new Finding(
        `the stream a restore would send QEMU is refused by qsnap's parser: ${err.code} ${err.message}`,
      );
    }
    return codedOutcome(err, ['QSNAP_FILE_', 'QSNAP_RESTORE_']);
  } finally {
    await reader?.close();
  }
}

// --- the manifest parser on its own (bytes in, a verdict out) -----------------------------

export interface ManifestInput {
  edits: ManifestEdit[];
  mutations: Mutation[];
}

export function manifestTarget(manifest: unknown): FuzzTarget<ManifestInput> {
  const paths = leafPaths(manifest);
  const text = Buffer.from(`${JSON.stringify(manifest, null, 2)}\n`);
  const anchors = [...text.toString('latin1').matchAll(/[:[{,]/g)].map((m) => m.index! + 1);
  return {
    name: 'manifest',
    input: fc.record({
      edits: fc.array(manifestEdit, { maxLength: 3 }),
      mutations: fc.array(mutation, { maxLength: 2 }),
    }),
    async run({ edits, mutations: list }) {
      const edited = Buffer.from(`${JSON.stringify(editManifest(manifest, paths, edits), null, 2)}\n`);
      const bytes = applyMutations(edited, anchors, list);
      const parsed = parseManifest(bytes);
      return parsed.ok ? 'ok' : `manifest-${parsed.problem}`;
    },
  };
}

// --- the bundle container and the qcow2 header of a disk inside it ------------------------

export interface BytesInput {
  mutations: Mutation[];
}

export function bundleTarget(f: Fixture): FuzzTarget<BytesInput> {
  return {
    name: 'bundle',
    input: fc.record({ mutations }),
    async run({ mutations: list }) {
      const bytes = applyMutations(f.bytes, f.anchors, list);
      try {
        if (bytes.length < HEADER_BYTES + TRAILER_BYTES) return 'too-short';
        checkHeader(bytes.subarray(0, HEADER_BYTES));
        const where = decodeTrailer(bytes.subarray(bytes.length - TRAILER_BYTES), bytes.length);
        const index = decodeIndex(bytes.subarray(where.offset, where.offset + where.length), where.offset);
        for (const disk of index.disks) {
          const head = bytes.subarray(disk.offset, disk.offset + Math.min(disk.length, 64 * 1024));
          const header = decodeQcow2Header(Buffer.from(head));
          decodeBackingName(Buffer.from(head), header);
        }
        return 'ok';
      } catch (err) {
        if (err instanceof BundleFormatError) return 'bundle-format';
        if (err instanceof Qcow2FormatError) return 'qcow2-format';
        throw new Finding(`uncoded failure: ${String(err)}`, { cause: err });
      }
    },
  };
}

export function qcow2Target(f: Fixture): FuzzTarget<BytesInput> {
  return {
    name: 'qcow2',
    input: fc.record({ mutations }),
    async run({ mutations: list }) {
      const bytes = applyMutations(f.bytes, f.anchors, list);
      try {
        decodeBackingName(bytes, decodeQcow2Header(bytes));
        return 'ok';
      } catch (err) {
        if (err instanceof Qcow2FormatError) return 'qcow2-format';
        throw new Finding(`uncoded failure: ${String(err)}`, { cause: err });
      }
    },
  };
}
