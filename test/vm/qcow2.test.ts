/**
 * qcow2 headers read without qemu-img: the codec fed byte literals, then real images made by
 * qemu-img (v2 and v3, relative and absolute backing names, a raw base), and the chain walk
 * compared with `qemu-img info --backing-chain`.
 */
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { readChain, readImage } from '../../src/vm/image-chain.js';
import {
  decodeBackingName,
  decodeQcow2Header,
  encodeOverlay,
  isQcow2,
  Qcow2FormatError,
} from '../../src/vm/qcow2.js';
import { hasQemuImg } from '../support/env.js';

/** A v2 header (72 bytes) + backing format extension + name, as qemu-img -o compat=0.10 writes it. */
function v2Header(backing: string, format = 'qcow2'): Buffer {
  const head = Buffer.alloc(512);
  head.writeUInt32BE(0x514649fb, 0);
  head.writeUInt32BE(2, 4);
  head.writeBigUInt64BE(0x60n, 8);
  head.writeUInt32BE(Buffer.byteLength(backing), 16);
  head.writeUInt32BE(16, 20);
  head.writeBigUInt64BE(16n * 2n ** 20n, 24);
  head.writeUInt32BE(0xe2792aca, 72);
  head.writeUInt32BE(format.length, 76);
  head.write(format, 80);
  head.write(backing, 0x60);
  return head;
}

describe('qcow2 header codec', () => {
  it('reads version, size, backing name and format of a v2 header', () => {
    const head = v2Header('t1.qcow2');
    const header = decodeQcow2Header(head);
    expect(header).toMatchObject({
      version: 2,
      virtualSize: 16 * 2 ** 20,
      clusterBits: 16,
      backingFormat: 'qcow2',
    });
    expect(decodeBackingName(head, header)).toBe('t1.qcow2');
  });

  it('refuses what is not a sound qcow2 header', () => {
    expect(isQcow2(Buffer.from('not an image'))).toBe(false);
    expect(() => decodeQcow2Header(Buffer.alloc(512))).toThrow(Qcow2FormatError);
    const badVersion = v2Header('x');
    badVersion.writeUInt32BE(4, 4);
    expect(() => decodeQcow2Header(badVersion)).toThrow(/version 4/);
    const longName = v2Header('x');
    longName.writeUInt32BE(5000, 16);
    expect(() => decodeQcow2Header(longName)).toThrow(/5000 bytes/);
    const beyond = v2Header('x');
    beyond.writeBigUInt64BE(10_000n, 8);
    expect(() => decodeBackingName(beyond, decodeQcow2Header(beyond))).toThrow(/beyond the header/);
    const badExtension = v2Header('x');
    badExtension.writeUInt32BE(100_000, 76);
    expect(() => decodeQcow2Header(badExtension)).toThrow(/extension/);
  });
});

describe.skipIf(!hasQemuImg)('backing chains of real images', () => {
  const dir = mkdtempSync(join(tmpdir(), 'qsnap-qcow2-'));
  afterAll(() => rmSync(dir, { recursive: true, force: true }));
  const img = (...args: string[]) => execFileSync('qemu-img', ['create', '-q', ...args], { cwd: dir });

  it('follows relative and absolute names down to a raw base, as qemu-img does', async () => {
    img('-f', 'raw', 'base.raw', '8M');
    img('-f', 'qcow2', '-b', 'base.raw', '-F', 'raw', 'a.qcow2');
    img('-f', 'qcow2', '-o', 'compat=0.10', '-b', join(dir, 'a.qcow2'), '-F', 'qcow2', 'b.qcow2');
    img('-f', 'qcow2', '-b', 'b.qcow2', '-F', 'qcow2', 'c.qcow2');
    const chain = await readChain(join(dir, 'c.qcow2'));
    const info = JSON.parse(
      execFileSync('qemu-img', ['info', '--backing-chain', '--output=json', join(dir, 'c.qcow2')], {
        encoding: 'utf8',
      }),
    ) as { filename: string }[];
    expect(chain.map((i) => i.path)).toEqual(
      ['c.qcow2', 'b.qcow2', 'a.qcow2', 'base.raw'].map((f) => join(dir, f)),
    );
    expect(info.map((i) => join(dir, i.filename.replace(`${dir}/`, '')))).toEqual(chain.map((i) => i.path));
    expect(chain.map((i) => i.format)).toEqual(['qcow2', 'qcow2', 'qcow2', 'raw']);
    expect(chain.every((i) => i.problem === undefined)).toBe(true);
  });

  it('marks where a chain breaks: a backing file moved away', async () => {
    img('-f', 'qcow2', '-b', 'gone.qcow2', '-F', 'qcow2', '-u', 'orphan.qcow2', '8M');
    const chain = await readChain(join(dir, 'orphan.qcow2'));
    expect(chain).toHaveLength(1);
    expect(chain[0]!.backing).toBe(join(dir, 'gone.qcow2'));
    expect(chain[0]!.problem).toMatch(/gone\.qcow2: ENOENT/);
  });

  it('takes a file without the qcow2 magic as raw, and a missing top as an error', async () => {
    writeFileSync(join(dir, 'plain.img'), Buffer.alloc(4096, 1));
    expect(await readImage(join(dir, 'plain.img'))).toEqual({
      path: join(dir, 'plain.img'),
      format: 'raw',
      backing: undefined,
    });
    await expect(readChain(join(dir, 'nothing.qcow2'))).rejects.toMatchObject({ code: 'ENOENT' });
  });
});

describe.skipIf(!hasQemuImg)('encodeOverlay: the overlay qemu-img would write', () => {
  const dir = mkdtempSync(join(tmpdir(), 'qsnap-qcow2-encode-'));
  afterAll(() => rmSync(dir, { recursive: true, force: true }));
  const version = hasQemuImg ? execFileSync('qemu-img', ['--version'], { encoding: 'utf8' }) : '';
  // Backing images that exist (qemu-img check opens them), and names of ones that need not.
  const cases: [string, string, number, boolean][] = [
    ['base.qcow2', 'qcow2', 80 * 2 ** 20, true],
    ['b.raw', 'raw', 100 * 2 ** 30, true],
    ['/var/lib/images/some base,with comma.qcow2', 'qcow2', 2 ** 40 + 512, false],
    ['x'.repeat(1023), 'qcow2', 512, false],
  ];

  it.each(cases)(
    'backing %s (%s, %d bytes): read back by qemu-img (and checked when the backing exists); byte-identical to qemu-img 7.2',
    (backing, format, size, exists) => {
      const ours = encodeOverlay({ backing, backingFormat: format, virtualSize: size });
      expect(ours).toBeDefined();
      const mine = join(dir, 'ours.qcow2');
      const theirs = join(dir, 'theirs.qcow2');
      rmSync(theirs, { force: true });
      writeFileSync(mine, ours!);
      if (exists) {
        if (format === 'raw') writeFileSync(join(dir, backing), '');
        else execFileSync('qemu-img', ['create', '-q', '-f', format, join(dir, backing), String(size)]);
        execFileSync('qemu-img', ['check', '-q', mine]);
      }
      const info = JSON.parse(
        execFileSync('qemu-img', ['info', '--output=json', mine], { encoding: 'utf8' }),
      );
      expect(info).toMatchObject({
        format: 'qcow2',
        'virtual-size': size,
        'backing-filename': backing,
        'backing-filename-format': format,
        'format-specific': { data: { compat: '1.1', 'refcount-bits': 16, corrupt: false } },
      });
      execFileSync('qemu-img', [
        'create',
        '-q',
        '-f',
        'qcow2',
        '-u',
        '-b',
        backing,
        '-F',
        format,
        theirs,
        String(size),
      ]);
      if (/version 7\.2\./.test(version)) expect(ours!.equals(readFileSync(theirs))).toBe(true);
    },
  );

  it('declines what it does not encode: past 4 TiB, a size not of whole sectors, an empty or too long name', () => {
    expect(
      encodeOverlay({ backing: 'b', backingFormat: 'qcow2', virtualSize: 4 * 2 ** 40 + 2 ** 29 }),
    ).toBeUndefined();
    expect(encodeOverlay({ backing: 'b', backingFormat: 'qcow2', virtualSize: 1000 })).toBeUndefined();
    expect(encodeOverlay({ backing: '', backingFormat: 'qcow2', virtualSize: 512 })).toBeUndefined();
    expect(
      encodeOverlay({ backing: 'x'.repeat(1024), backingFormat: 'qcow2', virtualSize: 512 }),
    ).toBeUndefined();
  });
});
