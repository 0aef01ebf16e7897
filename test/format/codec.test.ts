import { randomBytes } from 'node:crypto';
import { crc32 } from 'node:zlib';
import { describe, expect, it } from 'vitest';
import {
  combinedPageCrc,
  decodePageTable,
  decodeTrailer,
  encodePageTable,
  encodeTrailer,
  isZeroPage,
  PAGE_SIZE,
  pageCrc,
  sha256Hex,
  TRAILER_MAGIC,
  TRAILER_SIZE,
  ZERO_PAGE_CRC,
} from '../../src/format/codec.js';

const hex = (s: string) => Buffer.from(s.replace(/\s+/g, ''), 'hex');
const EMPTY_SHA = 'e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855';

/** The v1 trailer of a file whose 672-byte manifest starts at 0x12345 (docs/format.md "Trailer"). */
const TRAILER = hex(`
  45 23 01 00 00 00 00 00   a0 02 00 00 00 00 00 00
  e3 b0 c4 42 98 fc 1c 14   9a fb f4 c8 99 6f b9 24
  27 ae 41 e4 64 9b 93 4c   a4 95 99 1b 78 52 b8 55
  35 26 01 00 00 00 00 00   00 00 00 00 01 00 00 00
  50 00 00 00 ad 88 df 7f   51 53 4e 41 50 45 4e 44
`);

/** Recomputes the trailer CRC after a deliberate edit (for "intact but different" trailers). */
function reseal(t: Buffer): Buffer {
  t.writeUInt32LE(crc32(t.subarray(0, t.length - 12)), t.length - 12);
  return t;
}

describe('constants', () => {
  it('ZERO_PAGE_CRC is the CRC-32 of 4096 zero bytes', () => {
    expect(ZERO_PAGE_CRC).toBe(0xc71c0011);
    expect(pageCrc(Buffer.alloc(4096))).toBe(ZERO_PAGE_CRC);
    expect(pageCrc(Buffer.from('123456789'))).toBe(0xcbf43926); // the CRC-32/ISO-HDLC check value
  });

  it('magic is "QSNAPEND" and the v1 trailer is 80 bytes', () => {
    expect(TRAILER_MAGIC.toString('latin1')).toBe('QSNAPEND');
    expect(TRAILER_SIZE).toBe(80);
  });

  it('isZeroPage', () => {
    expect(isZeroPage(Buffer.alloc(4096))).toBe(true);
    const p = Buffer.alloc(4096);
    p[4095] = 1;
    expect(isZeroPage(p)).toBe(false);
  });

  it('sha256Hex hashes the concatenation of its parts', () => {
    expect(sha256Hex()).toBe(EMPTY_SHA);
    expect(sha256Hex(Buffer.from('ab'), Buffer.from('c'))).toBe(sha256Hex(Buffer.from('abc')));
  });
});

describe('trailer', () => {
  it('encodes to the documented bytes', () => {
    const t = encodeTrailer({
      manifestOffset: 0x12345,
      manifestLength: 0x2a0,
      manifestSha256: EMPTY_SHA,
      fileLength: 0x12345 + 0x2a0 + 80,
      versionMajor: 1,
    });
    expect(t.toString('hex')).toBe(TRAILER.toString('hex'));
  });

  it('decodes the documented bytes', () => {
    expect(decodeTrailer(TRAILER)).toEqual({
      ok: true,
      trailer: {
        versionMajor: 1,
        versionMinor: 0,
        trailerLength: 80,
        manifestOffset: 0x12345,
        manifestLength: 0x2a0,
        manifestSha256: EMPTY_SHA,
        fileLength: 0x12635,
        flags: 0,
      },
    });
  });

  it('decodes from the end of a longer buffer (the last 4 KiB of a file)', () => {
    const tail = Buffer.concat([Buffer.alloc(4016, 0xaa), TRAILER]);
    const d = decodeTrailer(tail);
    expect(d.ok && d.trailer.manifestOffset).toBe(0x12345);
  });

  it('no magic: short, empty, or other last bytes', () => {
    expect(decodeTrailer(Buffer.alloc(0))).toEqual({ ok: false, problem: 'no-magic' });
    expect(decodeTrailer(TRAILER.subarray(0, 79))).toEqual({ ok: false, problem: 'no-magic' });
    expect(decodeTrailer(TRAILER.subarray(70))).toEqual({ ok: false, problem: 'no-magic' });
    const t = Buffer.from(TRAILER);
    t[79] = 0x45; // "QSNAPENE"
    expect(decodeTrailer(t)).toEqual({ ok: false, problem: 'no-magic' });
  });

  it('bad CRC: any payload byte flipped', () => {
    for (let i = 0; i < 72; i++) {
      const t = Buffer.from(TRAILER);
      t[i] = t[i]! ^ 0x01;
      const d = decodeTrailer(t);
      expect(d.ok, `byte ${i}`).toBe(false);
      expect(d.ok === false && d.problem, `byte ${i}`).toMatch(
        i >= 64 && i < 68 ? /bad-length|bad-crc/ : /bad-crc/,
      );
    }
  });

  it('bad length: longer than the bytes given, or too short for the fixed fields', () => {
    const t = Buffer.from(TRAILER);
    t.writeUInt32LE(81, 64);
    expect(decodeTrailer(t)).toEqual({ ok: false, problem: 'bad-length', trailerLength: 81 });
    t.writeUInt32LE(19, 64);
    expect(decodeTrailer(t)).toEqual({ ok: false, problem: 'bad-length', trailerLength: 19 });
    // Intact (resealed) trailer claiming v1 with fewer than 80 bytes.
    const short = Buffer.from(TRAILER.subarray(20));
    short.writeUInt32LE(60, 60 - 16);
    expect(decodeTrailer(reseal(short))).toMatchObject({
      ok: false,
      problem: 'bad-length',
      trailerLength: 60,
    });
  });

  it('version 2 (the current) decodes as well as 1', () => {
    const t = Buffer.from(TRAILER);
    t.writeUInt16LE(2, 60);
    expect(decodeTrailer(reseal(t))).toMatchObject({ ok: true, trailer: { versionMajor: 2 } });
  });

  it('a newer major version, intact → newer-version; tampered → bad-crc', () => {
    const t = Buffer.from(TRAILER);
    t.writeUInt16LE(3, 60);
    expect(decodeTrailer(t)).toMatchObject({ ok: false, problem: 'bad-crc' });
    expect(decodeTrailer(reseal(t))).toEqual({
      ok: false,
      problem: 'newer-version',
      versionMajor: 3,
      versionMinor: 0,
    });
  });

  it('a newer version with a longer trailer is still recognised as newer', () => {
    const v2 = Buffer.concat([Buffer.alloc(40, 0x77), TRAILER]);
    v2.writeUInt16LE(4, v2.length - 20);
    v2.writeUInt16LE(1, v2.length - 18);
    v2.writeUInt32LE(v2.length, v2.length - 16);
    expect(decodeTrailer(reseal(v2))).toEqual({
      ok: false,
      problem: 'newer-version',
      versionMajor: 4,
      versionMinor: 1,
    });
  });

  it('version 0 → bad-version', () => {
    const t = Buffer.from(TRAILER);
    t.writeUInt16LE(0, 60);
    expect(decodeTrailer(reseal(t))).toEqual({
      ok: false,
      problem: 'bad-version',
      versionMajor: 0,
      versionMinor: 0,
    });
  });

  it('a newer minor version decodes', () => {
    const t = Buffer.from(TRAILER);
    t.writeUInt16LE(3, 62);
    expect(decodeTrailer(reseal(t))).toMatchObject({
      ok: true,
      trailer: { versionMajor: 1, versionMinor: 3 },
    });
  });

  it('refuses a malformed sha256', () => {
    expect(() =>
      encodeTrailer({ manifestOffset: 0, manifestLength: 0, manifestSha256: 'abc', fileLength: 80 }),
    ).toThrow(RangeError);
  });
});

describe('page table', () => {
  it('encodes one u32 LE per page', () => {
    expect(encodePageTable(new Uint32Array([0xc71c0011, 0x01020304, 0])).toString('hex')).toBe(
      '11001cc7' + '04030201' + '00000000',
    );
  });

  it('decodes the same bytes', () => {
    expect(Array.from(decodePageTable(hex('11001cc7 04030201 00000000')))).toEqual([
      0xc71c0011, 0x01020304, 0,
    ]);
  });

  it('decodes from an unaligned buffer offset', () => {
    const b = hex('ff 11001cc7 04030201').subarray(1);
    expect(Array.from(decodePageTable(b))).toEqual([0xc71c0011, 0x01020304]);
  });

  it('refuses a length that is not a multiple of 4', () => {
    expect(() => decodePageTable(hex('010203'))).toThrow(RangeError);
  });
});

describe('combinedPageCrc', () => {
  it('equals the CRC-32 of the pages laid end to end, for every run length, and differs after a flipped bit', () => {
    const pages = randomBytes(PAGE_SIZE * 9);
    const table = new Uint32Array(9);
    for (let i = 0; i < 9; i++) table[i] = pageCrc(pages.subarray(i * PAGE_SIZE, (i + 1) * PAGE_SIZE));
    for (let first = 0; first < 9; first++) {
      for (let count = 1; first + count <= 9; count++) {
        const run = pages.subarray(first * PAGE_SIZE, (first + count) * PAGE_SIZE);
        expect(combinedPageCrc(table, first, count)).toBe(crc32(run));
      }
    }
    const damaged = Buffer.from(pages);
    damaged[5 * PAGE_SIZE + 17]! ^= 0x04;
    expect(crc32(damaged)).not.toBe(combinedPageCrc(table, 0, 9));
  });

  it('of zero pages is the CRC of a zero run', () => {
    const table = new Uint32Array(4).fill(ZERO_PAGE_CRC);
    expect(combinedPageCrc(table, 0, 4)).toBe(crc32(Buffer.alloc(4 * PAGE_SIZE)));
  });
});
