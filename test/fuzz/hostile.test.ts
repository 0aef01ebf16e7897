/**
 * Hostile inputs built on purpose (the fuzzer finds the accidental ones): each size, count and
 * offset is bounded before use, and an input fed in small chunks costs time linear in its size.
 */
import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { closeSync, ftruncateSync, openSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { encodeTrailer, openSnapshot, TRAILER_SIZE } from '../../src/format/index.js';
import {
  encodePrologue,
  encodeRamSetupSection,
  MigrationStreamParser,
  type RamSetupEvent,
  type StreamSink,
} from '../../src/stream/index.js';
import { rewriteManifest } from '../format/helpers.js';
import { failure } from '../support/errors.js';
import { type SnapshotFixture, snapshotFixture } from './fixtures.js';

function setupSink(onSetup: (s: RamSetupEvent) => void): StreamSink {
  return {
    onPrologue: () => {},
    onRamSetup: onSetup,
    onPage: () => {},
    onZeroPage: () => {},
    onRamPart: () => {},
    onEnd: () => {},
  };
}

/** A prologue and a RAM START section listing `count` blocks with 241-byte names: ~1 MiB. */
function bigSetup(count: number): Buffer {
  const blocks = Array.from({ length: count }, (_, i) => ({
    idstr: `${'b'.repeat(240)}${i}`,
    usedLength: 4096,
  }));
  return Buffer.concat([
    encodePrologue({ machine: 'pc-i440fx-7.2', capabilities: [] }),
    encodeRamSetupSection({ sectionId: 2, blocks, footers: true, ignoreShared: false }),
  ]);
}

/** Feeds `input` in chunks of `size`; `cpuMs` is the CPU time it took (a shared machine's wall time is not). */
function feedInChunks(input: Buffer, size: number, limit: number): { cpuMs: number; blocks: number } {
  let blocks = -1;
  const parser = new MigrationStreamParser(
    setupSink((s) => {
      blocks = s.blocks.length;
    }),
    { maxRamSetupBytes: limit },
  );
  const started = process.cpuUsage();
  for (let at = 0; at < input.length; at += size) parser.feed(input.subarray(at, at + size));
  // nothing follows the section: end() decodes what it waited for, then finds no device state
  expect(() => parser.end()).toThrow(expect.objectContaining({ code: 'QSNAP_STREAM_TRUNCATED' }));
  const used = process.cpuUsage(started);
  return { cpuMs: (used.user + used.system) / 1000, blocks };
}

describe('the stream parser on hostile input', () => {
  it('decodes a 1 MiB RAM START section fed in 512-byte chunks in linear time (was 10 s: quadratic)', () => {
    const input = bigSetup(4000);
    expect(input.length).toBeGreaterThan(1_000_000);
    const whole = feedInChunks(input, input.length, 2 * 1024 * 1024);
    const small = feedInChunks(input, 512, 2 * 1024 * 1024);
    expect(whole.blocks).toBe(4000);
    expect(small.blocks).toBe(4000);
    // 2048 chunks: one decode per chunk copied and re-decoded up to 1 MiB each time (~10 s here)
    expect(small.cpuMs).toBeLessThan(1000);
  });

  it('refuses a RAM START section over its limit, however it is chunked, having buffered at most twice it', () => {
    const input = bigSetup(4000);
    for (const size of [input.length, 4096, 333]) {
      const parser = new MigrationStreamParser(
        setupSink(() => {}),
        { maxRamSetupBytes: 256 * 1024 },
      );
      let refusedAt = -1;
      try {
        for (let at = 0; at < input.length; at += size) {
          parser.feed(input.subarray(at, at + size));
          if (parser.bytesFed > 2 * 256 * 1024 + size + 64) break;
        }
      } catch (err) {
        expect((err as { code?: string }).code).toBe('QSNAP_STREAM_LIMIT');
        refusedAt = parser.bytesFed;
      }
      expect(refusedAt, `chunks of ${size}`).toBeGreaterThan(0);
      expect(refusedAt).toBeLessThanOrEqual(Math.max(2 * 256 * 1024, size) + size);
    }
  });

  it('decodes a section deferred for more bytes when the input ends', () => {
    const input = bigSetup(3); // 26 + 783 bytes
    let blocks = 0;
    const parser = new MigrationStreamParser(
      setupSink((s) => {
        blocks = s.blocks.length;
      }),
    );
    parser.feed(input.subarray(0, 500));
    parser.feed(input.subarray(500, input.length));
    expect(blocks, 'the second attempt waits for 1000 bytes').toBe(0);
    // the stream stops there: the section is decoded, then TRUNCATED (no device state)
    expect(() => parser.end()).toThrow(expect.objectContaining({ code: 'QSNAP_STREAM_TRUNCATED' }));
    expect(blocks).toBe(3);
  });
});

describe('a snapshot file from elsewhere', () => {
  let fixture: SnapshotFixture;
  let copies = 0;

  beforeAll(async () => {
    fixture = await snapshotFixture();
  });

  afterAll(() => fixture?.dispose());

  /** A sparse copy of the fixture. */
  function copy(): string {
    const file = join(fixture.dir, `copy-${copies++}.qsnap`);
    execFileSync('cp', ['--sparse=always', fixture.file, file]);
    return file;
  }

  it('claiming a 300 MiB device tail (a sparse file that holds it) is refused at open, before it is read', async () => {
    const file = copy();
    const m = structuredClone(fixture.manifest) as {
      stream: { deviceTail: { offset: number; length: number } };
    };
    const tailLength = 300 * 2 ** 20;
    m.stream.deviceTail.length = tailLength;
    const manifestOffset = m.stream.deviceTail.offset + tailLength;
    const bytes = Buffer.from(`${JSON.stringify(m, null, 2)}\n`);
    const trailer = encodeTrailer({
      manifestOffset,
      manifestLength: bytes.length,
      manifestSha256: createHash('sha256').update(bytes).digest('hex'),
      fileLength: manifestOffset + bytes.length + TRAILER_SIZE,
    });
    const fd = openSync(file, 'r+');
    ftruncateSync(fd, manifestOffset);
    writeSync(fd, Buffer.concat([bytes, trailer]), 0, bytes.length + TRAILER_SIZE, manifestOffset);
    closeSync(fd);
    const err = await failure(openSnapshot(file));
    expect(err).toMatchObject({ code: 'QSNAP_FILE_CORRUPT', details: { deviceTailBytes: tailLength } });
    // Negative control: the same construction with the real length opens.
    const reader = await openSnapshot(fixture.file);
    expect(reader.manifest.stream.deviceTail.length).toBeLessThan(2 ** 20);
    await reader.close();
  });

  it('naming a disk format that carries options (it reaches qemu-img -F) is refused', async () => {
    const file = copy();
    rewriteManifest(file, (m) => {
      m['disks'] = [
        {
          device: 'virtio0',
          nodeName: 'n0',
          format: 'qcow2,file.driver=ssh',
          virtualSize: 1 << 20,
          frozenFile: '/tmp/frozen.qcow2',
          overlayFile: '/tmp/overlay.qcow2',
          overlayNodeName: 'n1',
        },
      ];
    });
    expect(await failure(openSnapshot(file))).toMatchObject({ code: 'QSNAP_FILE_CORRUPT' });
    rewriteManifest(file, (m) => {
      m['disks'][0].format = 'qcow2';
    });
    const reader = await openSnapshot(file);
    expect(reader.manifest.disks[0]!.format).toBe('qcow2');
    await reader.close();
  });

  it('is written 0600: it holds guest RAM', () => {
    const mode = Number.parseInt(execFileSync('stat', ['-c', '%a', fixture.file]).toString().trim(), 8);
    expect(mode).toBe(0o600);
  });
});
