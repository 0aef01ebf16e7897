import { describe, expect, it } from 'vitest';
import { type Manifest, parseManifest, serializeManifest } from '../../src/format/manifest.js';
import type { Json } from './helpers.js';

const SHA = 'ab'.repeat(32);

function valid(): Json {
  return {
    format: 'qsnap-snapshot',
    version: 1,
    id: '1b4e28ba-2fa1-4d2e-883f-0016d3cca427',
    createdAt: '2025-01-02T03:04:05.678Z',
    qemu: {
      version: { major: 7, minor: 2, micro: 22 },
      package: 'Debian 1:7.2+dfsg-7',
      machine: 'pc-i440fx-7.2',
    },
    vm: { ramBytes: 536870912, runStateBefore: 'running' },
    strategy: 'background-snapshot',
    pointInTime: { wallClock: '2025-01-02T03:04:05.000+01:00' },
    ram: {
      pageSize: 4096,
      blocks: [
        {
          name: 'pc.ram',
          usedLength: 536870912,
          fileOffset: 0,
          fileLength: 536870912,
          dataPages: 10,
          zeroPages: 131062,
        },
      ],
      pageTable: { offset: 536870912, length: 524288, sha256: SHA },
    },
    stream: {
      prologue: { offset: 537395200, length: 100, sha256: SHA },
      deviceTail: { offset: 537395300, length: 200, sha256: SHA },
      streamVersion: 3,
      ramSectionId: 2,
    },
    disks: [],
    skippedDisks: [],
    timings: { downtimeMs: 3, totalMs: 900, streamMs: 850, fsyncMs: 12.5 },
    counts: { pagesWritten: 10, zeroPages: 131062, streamBytes: 123456 },
  };
}

const bytes = (o: unknown) => Buffer.from(JSON.stringify(o));

describe('parseManifest', () => {
  it('accepts a minimal v1 manifest and fills defaults', () => {
    const r = parseManifest(bytes(valid()));
    expect(r.ok).toBe(true);
    const m = (r as { manifest: Manifest }).manifest;
    expect(m.ram.blocks[0]!.zeroCrcDataPages).toEqual([]);
    expect(m.ram.blocks[0]!.missingPages).toBe(0);
    expect(m.counts.duplicatePages).toBe(0);
    expect(m.timings['fsyncMs']).toBe(12.5);
  });

  it('keeps unknown fields (a newer minor version may add them)', () => {
    const o = valid();
    o.newTopLevel = [1, 2];
    o.qemu.newField = 'x';
    o.ram.blocks[0].hugepages = false;
    const r = parseManifest(bytes(o));
    expect(r.ok).toBe(true);
    const m = (r as { manifest: Json }).manifest;
    expect(m.newTopLevel).toEqual([1, 2]);
    expect(m.qemu.newField).toBe('x');
    expect(m.ram.blocks[0].hugepages).toBe(false);
  });

  it('serializes to JSON that parses back to the same manifest', () => {
    const r = parseManifest(bytes(valid()));
    if (!r.ok) throw new Error('invalid');
    const again = parseManifest(serializeManifest(r.manifest));
    expect(again).toEqual(r);
  });

  it('names a newer version before validating anything else', () => {
    expect(parseManifest(bytes({ format: 'qsnap-snapshot', version: 3, whatever: true }))).toEqual({
      ok: false,
      problem: 'newer-version',
      version: 3,
    });
  });

  it('refuses bytes that are not JSON or not UTF-8', () => {
    expect(parseManifest(Buffer.from('{"format":'))).toMatchObject({ ok: false, problem: 'not-json' });
    expect(parseManifest(Buffer.from([0x7b, 0xff, 0x7d]))).toMatchObject({ ok: false, problem: 'not-json' });
  });

  it('refuses JSON that is not a qsnap manifest', () => {
    expect(parseManifest(bytes([1, 2]))).toMatchObject({ ok: false, problem: 'not-manifest' });
    expect(parseManifest(bytes({ ...valid(), format: 'other' }))).toMatchObject({
      ok: false,
      problem: 'not-manifest',
    });
  });

  const invalid: [string, (o: Json) => void][] = [
    ['version 0', (o) => (o.version = 0)],
    ['a non-uuid id', (o) => (o.id = 'snap-1')],
    ['a date without time zone', (o) => (o.createdAt = '2025-01-02 03:04')],
    ['a negative ram size', (o) => (o.vm.ramBytes = -1)],
    ['an upper-case run state', (o) => (o.vm.runStateBefore = 'Running')],
    ['another strategy', (o) => (o.strategy = 'stop-and-copy')],
    ['a page size of 64 KiB', (o) => (o.ram.pageSize = 65536)],
    ['no blocks', (o) => (o.ram.blocks = [])],
    ['a fractional offset', (o) => (o.ram.pageTable.offset = 1.5)],
    ['an upper-case sha256', (o) => (o.stream.prologue.sha256 = 'AB'.repeat(32))],
    [
      'a relative overlay path',
      (o) =>
        o.disks.push({
          device: 'd',
          nodeName: 'n',
          format: 'qcow2',
          virtualSize: 1,
          frozenFile: '/a',
          overlayFile: 'b',
          overlayNodeName: 'o',
        }),
    ],
    ['a non-numeric timing', (o) => (o.timings.extraMs = 'fast')],
    ['a missing counts field', (o) => delete o.counts.streamBytes],
  ];
  for (const [name, mutate] of invalid) {
    it(`refuses ${name}`, () => {
      const o = valid();
      mutate(o);
      const r = parseManifest(bytes(o));
      expect(r).toMatchObject({ ok: false, problem: 'invalid' });
    });
  }
});
