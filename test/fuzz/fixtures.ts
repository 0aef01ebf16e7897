/**
 * Real inputs for the fuzzer: the migration streams QEMU 7.2 wrote (test/fixtures/stream), the
 * snapshot file qsnap's own writer makes from one of them, a qcow2 header qemu-img wrote, and
 * a bundle holding a snapshot file and that image. Each comes with its anchors: the offsets
 * where its sections and fields start.
 */
import { execFileSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { openSnapshot, SnapshotWriter, TRAILER_SIZE } from '../../src/format/index.js';
import { encodeHeader, encodeTrailer } from '../../src/store/bundle-format.js';
import {
  type PrologueEvent,
  parseMigrationStream,
  type RamSetupEvent,
  type StreamSink,
  type StreamSummary,
} from '../../src/stream/index.js';
import { BACKGROUND_FIXTURE, loadFixture, PRECOPY_FIXTURE } from '../stream/helpers.js';

export interface Fixture {
  name: string;
  bytes: Buffer;
  anchors: number[];
}

/** A stream's section starts, the fields of its prologue and RAM START section, its tail's end. */
function streamAnchors(stream: Buffer): number[] {
  const anchors: number[] = [];
  let setupEnd = 0;
  let prologueBytes = 0;
  const sink: StreamSink = {
    onPrologue: (p: PrologueEvent) => {
      prologueBytes = p.bytes.length;
    },
    onRamSetup: (s: RamSetupEvent) => {
      setupEnd = prologueBytes + s.bytes.length;
    },
    onPage: () => {},
    onZeroPage: () => {},
    onRamPart: (_i, at) => anchors.push(at, at + 5, at + 13),
    onDeviceTailStart: (at) => anchors.push(at),
    onEnd: () => {},
  };
  const summary: StreamSummary = parseMigrationStream(stream, sink);
  for (let at = 0; at < setupEnd; at += 2) anchors.push(at);
  anchors.push(summary.eofOffset, summary.eofOffset + 1, summary.eofOffset + 2, stream.length - 1);
  return anchors;
}

export function streamFixtures(): Fixture[] {
  return [BACKGROUND_FIXTURE, PRECOPY_FIXTURE].map((name) => {
    const bytes = loadFixture(name);
    return { name, bytes, anchors: streamAnchors(bytes) };
  });
}

export interface SnapshotFixture {
  dir: string;
  file: string;
  /** The file's bytes from the end of RAM: page table, prologue, device tail, manifest, trailer. */
  meta: Buffer;
  ramEnd: number;
  metaAnchors: number[];
  /** File offsets of data pages (RAM the stream carried). */
  dataPages: number[];
  manifest: Record<string, unknown>;
  dispose(): Promise<void>;
}

/** The background stream written into a snapshot file by SnapshotWriter, as a snapshot would be. */
export async function snapshotFixture(): Promise<SnapshotFixture> {
  const stream = loadFixture(BACKGROUND_FIXTURE);
  const dir = await mkdtemp(join(tmpdir(), 'qsnap-fuzz-'));
  const file = join(dir, 'fixture.qsnap');
  const pages: { block: number; offset: number; data: Buffer }[] = [];
  const zeros: { block: number; offset: number }[] = [];
  let prologue!: PrologueEvent;
  let setup!: RamSetupEvent;
  let tail!: Buffer;
  let summary!: StreamSummary;
  parseMigrationStream(stream, {
    onPrologue: (p) => {
      prologue = p;
    },
    onRamSetup: (s) => {
      setup = s;
    },
    onPage: (block, offset, data) => pages.push({ block, offset, data: Buffer.from(data) }),
    onZeroPage: (block, offset) => zeros.push({ block, offset }),
    onRamPart: () => {},
    onEnd: (s, t) => {
      summary = s;
      tail = t;
    },
  });
  const blocks = setup.blocks.map((b) => ({ name: b.idstr, usedLength: b.usedLength }));
  const writer = await SnapshotWriter.create(file, { blocks });
  for (const p of pages) {
    writer.writePage(p.block, p.offset, p.data);
    if (writer.needsDrain) await writer.onceDrained();
  }
  for (const z of zeros) writer.writeZeroPage(z.block, z.offset);
  const manifest = await writer.finish({
    prologue: Buffer.concat([prologue.bytes, setup.bytes]),
    deviceTail: tail,
    info: {
      qemu: {
        version: { major: 7, minor: 2, micro: 22 },
        package: 'Debian',
        machine: prologue.machine ?? 'pc',
      },
      vm: { ramBytes: setup.blocks[0]!.usedLength, runStateBefore: 'running' },
      pointInTime: { wallClock: new Date(0).toISOString() },
      stream: { streamVersion: 3, ramSectionId: setup.sectionId },
      timings: { downtimeMs: 1, totalMs: 1, streamMs: 1 },
      counts: { streamBytes: summary.streamBytes },
    },
  });
  const reader = await openSnapshot(file);
  const L = reader.layout;
  const dataPages = pages.map((p) => L.blocks[p.block]!.fileOffset + p.offset);
  await reader.close();
  const whole = readFileSync(file);
  const meta = Buffer.from(whole.subarray(L.ramEnd));
  const rel = (at: number) => at - L.ramEnd;
  const trailerAt = rel(L.trailer.offset);
  const metaAnchors = [
    rel(L.pageTable.offset),
    rel(L.prologue.offset),
    rel(L.deviceTail.offset),
    rel(L.manifest.offset),
    ...Array.from({ length: TRAILER_SIZE / 4 }, (_, i) => trailerAt + 4 * i),
  ];
  return {
    dir,
    file,
    meta,
    ramEnd: L.ramEnd,
    metaAnchors,
    dataPages,
    manifest: manifest as unknown as Record<string, unknown>,
    dispose: () => rm(dir, { recursive: true, force: true }),
  };
}

/** The first 64 KiB of a qcow2 image qemu-img made over a raw backing file (header, backing name, extensions). */
export function qcow2Fixture(dir: string): Fixture {
  const backing = join(dir, 'base.raw');
  const image = join(dir, 'top.qcow2');
  execFileSync('qemu-img', ['create', '-q', '-f', 'raw', backing, '1M']);
  execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', backing, '-F', 'raw', image, '1M']);
  const bytes = readFileSync(image).subarray(0, 64 * 1024);
  // header fields (docs/interop/qcow2.txt), the extensions after the v3 header, the backing name
  const anchors = [0, 4, 8, 16, 20, 24, 72, 80, 96, 100, 104, 112, bytes.readUInt32BE(100)];
  anchors.push(Number(bytes.readBigUInt64BE(8)));
  return { name: 'qcow2', bytes: Buffer.from(bytes), anchors };
}

/** A bundle as exportBundle lays it out: header, the snapshot file, one qcow2 disk, the index, the trailer. */
export function bundleFixture(snapshot: Buffer, disk: Buffer): Fixture {
  const header = encodeHeader();
  const snapshotAt = header.length;
  const diskAt = snapshotAt + snapshot.length;
  const index = Buffer.from(
    JSON.stringify({
      format: 'qsnap-bundle',
      version: 1,
      name: 'fuzz',
      snapshotId: '8a6f1d2e-3b4c-4d5e-8f60-718293a4b5c6',
      createdAt: new Date(0).toISOString(),
      cmdline: ['qemu-system-x86_64', '-m', '128'],
      snapshot: { offset: snapshotAt, length: snapshot.length, sha256: '0'.repeat(64) },
      disks: [
        {
          device: 'virtio0',
          offset: diskAt,
          length: disk.length,
          sha256: '0'.repeat(64),
          virtualSize: 1 << 20,
        },
      ],
    }),
  );
  const indexAt = diskAt + disk.length;
  const bytes = Buffer.concat([header, snapshot, disk, index, encodeTrailer(indexAt, index.length)]);
  const anchors = [0, 8, snapshotAt, diskAt, indexAt, indexAt + index.indexOf('"offset"'), bytes.length - 24];
  anchors.push(bytes.length - 16, bytes.length - 8);
  return { name: 'bundle', bytes, anchors };
}
