/** Test data shared by the format tests and the benchmark (no vitest imports here). */
import { crc32 } from 'node:zlib';
import type { BlockSpec } from '../../src/format/layout.js';
import type { SnapshotInfo } from '../../src/format/writer.js';
import { MiB } from '../support/files.js';

// biome-ignore lint/suspicious/noExplicitAny: tests edit manifests as free-form JSON
export type Json = Record<string, any>;

export const PAGE = 4096;
export { MiB };

export const BLOCKS: BlockSpec[] = [
  { name: 'pc.ram', usedLength: 8 * MiB },
  { name: 'vga.vram', usedLength: 1 * MiB },
  { name: 'pc.bios', usedLength: 256 * 1024 },
  // A used length that is not a page multiple: its last page is padded in the file.
  { name: '/rom@etc/acpi/tables', usedLength: 5000 },
];

export const PROLOGUE = Buffer.from('QEVM\0\0\0\x03\x07\0\0\0\x0dpc-i440fx-7.2 prologue-bytes', 'latin1');
export const DEVICE_TAIL = Buffer.from(
  `\x04device-state\0${'x'.repeat(3000)}\0\x06{"page_size":4096,"devices":[]}`,
  'latin1',
);

export function sampleInfo(overrides: Partial<SnapshotInfo> = {}): SnapshotInfo {
  return {
    qemu: {
      version: { major: 7, minor: 2, micro: 22 },
      package: 'Debian 1:7.2+dfsg-7+deb12u18',
      machine: 'pc-i440fx-7.2',
      accel: 'tcg',
      commandLine: ['qemu-system-x86_64', '-m', '8M'],
    },
    vm: { ramBytes: 8 * MiB, runStateBefore: 'running', name: 'test-vm' },
    pointInTime: { wallClock: '2025-01-02T03:04:05.678Z', qemuTimestampUs: 1735787045678000 },
    stream: { streamVersion: 3, ramSectionId: 2, devices: ['timer', 'cpu_common', 'cpu'] },
    disks: [
      {
        device: 'virtio0',
        nodeName: 'disk0-frozen',
        format: 'qcow2',
        virtualSize: 1 << 30,
        frozenFile: '/var/lib/qsnap/disk0.qcow2',
        overlayFile: '/var/lib/qsnap/disk0.overlay-1.qcow2',
        overlayNodeName: 'disk0-overlay-1',
      },
    ],
    skippedDisks: [{ device: 'cd0', reason: 'read-only' }],
    timings: { downtimeMs: 3.2, totalMs: 812, streamMs: 790 },
    counts: { streamBytes: 12345678 },
    ...overrides,
  };
}

/** Deterministic PRNG (mulberry32). */
export function rng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** Non-zero page contents determined by (block, page, version). */
export function pageData(blockIndex: number, pageIndex: number, version = 0): Buffer {
  const b = Buffer.allocUnsafe(PAGE);
  let x = (blockIndex * 0x9e3779b1 + pageIndex * 0x85ebca6b + version * 0xc2b2ae35 + 1) >>> 0;
  for (let i = 0; i < PAGE; i += 4) {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    b.writeUInt32LE(x, i);
  }
  return b;
}

/**
 * A non-zero page whose CRC-32 equals the zero page's: CRC is affine over GF(2), so the last 4
 * bytes are solved for with a 32×32 linear system.
 */
export function forgeZeroCrcPage(): Buffer {
  const target = crc32(Buffer.alloc(PAGE));
  const page = Buffer.alloc(PAGE);
  page[0] = 0x51;
  page.writeUInt32LE(0, PAGE - 4);
  const base = crc32(page);
  const cols: number[] = [];
  for (let bit = 0; bit < 32; bit++) {
    page.writeUInt32LE((1 << bit) >>> 0, PAGE - 4);
    cols.push((crc32(page) ^ base) >>> 0);
  }
  // Find x with XOR of cols[i] over the set bits i of x == target ^ base: Gaussian elimination
  // over GF(2), pivots keyed by their highest bit.
  const pivots = new Map<number, { v: number; x: number }>();
  const reduce = (v: number, x: number): { v: number; x: number } => {
    for (let bit = 31; bit >= 0; bit--) {
      if (((v >>> bit) & 1) === 0) continue;
      const p = pivots.get(bit);
      if (!p) break;
      v = (v ^ p.v) >>> 0;
      x = (x ^ p.x) >>> 0;
    }
    return { v, x };
  };
  for (const [i, c] of cols.entries()) {
    const r = reduce(c, (1 << i) >>> 0);
    if (r.v !== 0) pivots.set(31 - Math.clz32(r.v), r);
  }
  const { v, x } = reduce((target ^ base) >>> 0, 0);
  if (v !== 0) throw new Error('no solution');
  page.writeUInt32LE(x, PAGE - 4);
  if (crc32(page) !== target) throw new Error('forgery failed');
  return page;
}
