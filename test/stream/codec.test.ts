import { describe, expect, it } from 'vitest';
import {
  classifyRecord,
  decodeDeviceTailEnd,
  encodeCommand,
  encodeDeviceTailEnd,
  encodeEos,
  encodeFooter,
  encodePrologue,
  encodeRamSection,
  encodeRamSetupSection,
  encodeSectionHeader,
  MigCommand,
  newRecordHeader,
  RamFlag,
  ramFlagNames,
  SectionType,
  StreamError,
  tryDecodeCommand,
  tryDecodeFooter,
  tryDecodePrologue,
  tryDecodeRamSetupSection,
  tryDecodeRecordHeader,
  tryDecodeSectionHeader,
} from '../../src/stream/index.js';
import { streamErrorOf } from './helpers.js';

/** Hex with spaces and comments stripped: `hex('51 45 56 4d // QEVM')`. */
function hex(text: string): Buffer {
  return Buffer.from(
    text
      .replace(/\/\/[^\n]*/g, '')
      .replace(/'([^']*)'/g, (_, s: string) => Buffer.from(s, 'latin1').toString('hex'))
      .replace(/\s+/g, ''),
    'hex',
  );
}

/** Every proper prefix of `bytes` decodes to undefined (needs more). */
function expectIncompleteForEveryPrefix(bytes: Buffer, decode: (b: Buffer) => unknown): void {
  for (let n = 0; n < bytes.length; n++) {
    expect(decode(bytes.subarray(0, n)), `prefix of ${n} bytes`).toBeUndefined();
  }
}

// The header and configuration QEMU 7.2 wrote for `-machine pc` (test/fixtures/stream).
const PROLOGUE_7_2 = hex(`
  'QEVM' 00000003                     // magic, version 3
  07 0000000d 'pc-i440fx-7.2'         // configuration: be32 length, machine name
`);

describe('prologue', () => {
  it('decodes the header and configuration of a 7.2 stream', () => {
    const next = Buffer.concat([PROLOGUE_7_2, hex('01')]);
    expect(tryDecodePrologue(next)).toEqual({
      version: 3,
      machine: 'pc-i440fx-7.2',
      capabilities: [],
      size: 26,
    });
    expect(encodePrologue({ machine: 'pc-i440fx-7.2', capabilities: [] })).toEqual(PROLOGUE_7_2);
  });

  it('needs the byte after the configuration to know no subsection follows', () => {
    expectIncompleteForEveryPrefix(Buffer.concat([PROLOGUE_7_2, hex('01')]), (b) => tryDecodePrologue(b));
  });

  it('decodes the capabilities, uuid and target-page-bits subsections', () => {
    const bytes = hex(`
      'QEVM' 00000003 07 00000002 'pc'
      05 1e 'configuration/target-page-bits' 00000001  0000000c
      05 1a 'configuration/capabilities' 00000001  00000001 0f 'x-ignore-shared'
      05 12 'configuration/uuid' 00000001  00112233445566778899aabbccddeeff
      01`);
    const prologue = tryDecodePrologue(bytes);
    expect(prologue).toEqual({
      version: 3,
      machine: 'pc',
      targetPageBits: 12,
      capabilities: ['x-ignore-shared'],
      uuid: '00112233-4455-6677-8899-aabbccddeeff',
      size: bytes.length - 1,
    });
    const { size: _size, ...fields } = prologue!;
    expect(encodePrologue(fields)).toEqual(bytes.subarray(0, -1));
    expectIncompleteForEveryPrefix(bytes, (b) => tryDecodePrologue(b));
  });

  it('accepts a stream without configuration section (send-configuration=off)', () => {
    expect(tryDecodePrologue(hex(`'QEVM' 00000003 01`))).toEqual({
      version: 3,
      machine: undefined,
      capabilities: [],
      size: 8,
    });
  });

  it('refuses a bad magic as soon as its first byte arrives', () => {
    const err = streamErrorOf(() => tryDecodePrologue(hex('51 45 55')));
    expect(err.code).toBe('QSNAP_STREAM_FORMAT');
    expect(err.offset).toBe(0);
    expect(streamErrorOf(() => tryDecodePrologue(hex('00'), 100)).offset).toBe(100);
  });

  it('refuses other versions', () => {
    const err = streamErrorOf(() => tryDecodePrologue(hex(`'QEVM' 00000002 07`)));
    expect(err.code).toBe('QSNAP_STREAM_FORMAT');
    expect(err.offset).toBe(4);
  });

  it('refuses unknown configuration subsections and versions', () => {
    const unknown = hex(`'QEVM' 00000003 07 00000002 'pc' 05 11 'configuration/new' 00000001 00`);
    expect(streamErrorOf(() => tryDecodePrologue(unknown)).code).toBe('QSNAP_STREAM_UNSUPPORTED');
    const version = hex(`'QEVM' 00000003 07 00000002 'pc' 05 12 'configuration/uuid' 00000002`);
    expect(streamErrorOf(() => tryDecodePrologue(version)).code).toBe('QSNAP_STREAM_UNSUPPORTED');
  });

  it('refuses an implausible machine name length', () => {
    const err = streamErrorOf(() => tryDecodePrologue(hex(`'QEVM' 00000003 07 ffffffff`)));
    expect(err.code).toBe('QSNAP_STREAM_FORMAT');
    expect(err.offset).toBe(9);
  });
});

describe('section headers and footers', () => {
  const START = hex(`01 00000002 03 'ram' 00000000 00000004`);
  const FULL = hex(`04 00000000 05 'timer' 00000000 00000002`);

  it('decodes START and FULL with idstr, instance and version', () => {
    expect(tryDecodeSectionHeader(START, 0)).toEqual({
      type: SectionType.START,
      sectionId: 2,
      idstr: 'ram',
      instanceId: 0,
      versionId: 4,
      size: 17,
    });
    expect(tryDecodeSectionHeader(FULL, 0)).toMatchObject({
      type: 4,
      idstr: 'timer',
      versionId: 2,
      size: 19,
    });
    expect(encodeSectionHeader({ type: 1, sectionId: 2, idstr: 'ram', instanceId: 0, versionId: 4 })).toEqual(
      START,
    );
    expectIncompleteForEveryPrefix(START, (b) => tryDecodeSectionHeader(b, 0));
  });

  it('decodes PART and END as type and section id', () => {
    expect(tryDecodeSectionHeader(hex('02 00000002'), 0)).toEqual({ type: 2, sectionId: 2, size: 5 });
    expect(tryDecodeSectionHeader(hex('ff 03 00000007'), 1)).toEqual({ type: 3, sectionId: 7, size: 5 });
    expect(encodeSectionHeader({ type: 3, sectionId: 7 })).toEqual(hex('03 00000007'));
  });

  it('refuses other bytes where a section header should be', () => {
    const err = streamErrorOf(() => tryDecodeSectionHeader(hex('00 09'), 1, 1000));
    expect(err.code).toBe('QSNAP_STREAM_FORMAT');
    expect(err.offset).toBe(1001);
  });

  it('decodes footers and refuses a wrong marker', () => {
    expect(tryDecodeFooter(hex('7e 00000002'), 0)).toEqual({ sectionId: 2, size: 5 });
    expect(encodeFooter(2)).toEqual(hex('7e 00000002'));
    expect(tryDecodeFooter(hex('7e 0000'), 0)).toBeUndefined();
    expect(streamErrorOf(() => tryDecodeFooter(hex('7f 00000002'), 0, 50)).offset).toBe(50);
  });

  it('decodes and encodes commands', () => {
    const bytes = hex('08 000b 0000');
    expect(tryDecodeCommand(bytes, 0)).toMatchObject({ command: MigCommand.SWITCHOVER_START, size: 5 });
    expect(encodeCommand(MigCommand.SWITCHOVER_START)).toEqual(bytes);
    const ping = hex('08 0002 0004 00000001');
    expect(tryDecodeCommand(ping, 0)?.data).toEqual(hex('00000001'));
    expectIncompleteForEveryPrefix(ping, (b) => tryDecodeCommand(b, 0));
  });
});

describe('RAM START section', () => {
  const SETUP = hex(`
    01 00000002 03 'ram' 00000000 00000004   // START "ram" instance 0 version 4
    00000000 00003004                        // total 0x3000 | MEM_SIZE
    01 'a' 00000000 00001000                 // block "a", used_length 0x1000
    02 'bb' 00000000 00002000                // block "bb", used_length 0x2000
    00000000 00000010                        // EOS
    7e 00000002                              // footer`);

  it('decodes the block list', () => {
    expect(tryDecodeRamSetupSection(SETUP, 0, 0, { ignoreShared: false })).toEqual({
      sectionId: 2,
      blocks: [
        { idstr: 'a', usedLength: 0x1000 },
        { idstr: 'bb', usedLength: 0x2000 },
      ],
      footers: true,
      ignoreShared: false,
      totalBytes: 0x3000,
      skippedRecords: 0,
      size: SETUP.length,
    });
    expectIncompleteForEveryPrefix(SETUP, (b) => tryDecodeRamSetupSection(b, 0, 0, { ignoreShared: false }));
  });

  it('encodes the same bytes', () => {
    const setup = tryDecodeRamSetupSection(SETUP, 0, 0, { ignoreShared: false })!;
    expect(encodeRamSetupSection(setup)).toEqual(SETUP);
  });

  it('reads the memory-region address of every block with x-ignore-shared', () => {
    const bytes = hex(`
      01 00000005 03 'ram' 00000000 00000004
      00000000 00001004
      01 'a' 00000000 00001000 00000001 00000000   // mr->addr 0x100000000
      00000000 00000010
      7e 00000005`);
    const setup = tryDecodeRamSetupSection(bytes, 0, 0, { ignoreShared: true })!;
    expect(setup.blocks).toEqual([{ idstr: 'a', usedLength: 0x1000, mrAddr: 0x1_0000_0000n }]);
    expect(encodeRamSetupSection(setup)).toEqual(bytes);
  });

  it('tells a stream without footers by the byte after EOS', () => {
    const noFooter = Buffer.concat([SETUP.subarray(0, -5), hex('02')]);
    const setup = tryDecodeRamSetupSection(noFooter, 0, 0, { ignoreShared: false })!;
    expect(setup.footers).toBe(false);
    expect(setup.size).toBe(noFooter.length - 1);
    expect(tryDecodeRamSetupSection(noFooter.subarray(0, -1), 0, 0, { ignoreShared: false })).toBeUndefined();
    expect(encodeRamSetupSection(setup)).toEqual(noFooter.subarray(0, -1));
  });

  it('skips MULTIFD_FLUSH before EOS (≥ 8.1)', () => {
    const bytes = Buffer.concat([SETUP.subarray(0, -13), hex('00000000 00000200'), SETUP.subarray(-13)]);
    expect(tryDecodeRamSetupSection(bytes, 0, 0, { ignoreShared: false })?.skippedRecords).toBe(1);
  });

  it('refuses a payload that does not start with MEM_SIZE', () => {
    const bytes = Buffer.from(SETUP);
    bytes[17 + 7] = 0x08;
    const err = streamErrorOf(() => tryDecodeRamSetupSection(bytes, 0, 1000, { ignoreShared: false }));
    expect(err.code).toBe('QSNAP_STREAM_FORMAT');
    expect(err.offset).toBe(1017);
  });

  it('refuses block lengths that do not add up to the total', () => {
    const bytes = Buffer.from(SETUP);
    bytes.writeUInt32BE(0x4000 | 4, 17 + 4); // total 0x4000 but blocks add to 0x3000: EOS read as a block
    expect(streamErrorOf(() => tryDecodeRamSetupSection(bytes, 0, 0, { ignoreShared: false })).code).toBe(
      'QSNAP_STREAM_FORMAT',
    );
    const over = Buffer.from(SETUP);
    over.writeUInt32BE(0x2000 | 4, 17 + 4); // block "bb" longer than what is left of the total
    expect(streamErrorOf(() => tryDecodeRamSetupSection(over, 0, 0, { ignoreShared: false })).offset).toBe(
      35,
    );
  });

  it('refuses a block length that is not a page multiple, and duplicate blocks', () => {
    const odd = Buffer.from(SETUP);
    odd.writeUInt32BE(0x1800, 31); // low word of block "a"'s used_length
    expect(streamErrorOf(() => tryDecodeRamSetupSection(odd, 0, 0, { ignoreShared: false })).code).toBe(
      'QSNAP_STREAM_FORMAT',
    );
    const twice = hex(`01 00000002 03 'ram' 00000000 00000004 00000000 00002004
      01 'a' 00000000 00001000 01 'a' 00000000 00001000 00000000 00000010 7e 00000002`);
    expect(streamErrorOf(() => tryDecodeRamSetupSection(twice, 0, 0, { ignoreShared: false })).code).toBe(
      'QSNAP_STREAM_FORMAT',
    );
  });

  it('refuses a footer for another section', () => {
    const bytes = Buffer.from(SETUP);
    bytes.writeUInt32BE(3, bytes.length - 4);
    const err = streamErrorOf(() => tryDecodeRamSetupSection(bytes, 0, 0, { ignoreShared: false }));
    expect(err.code).toBe('QSNAP_STREAM_FORMAT');
    expect(err.details).toMatchObject({ found: 3, expected: 2 });
  });

  it('refuses RDMA hooks and iterable sections other than RAM', () => {
    const hook = Buffer.concat([SETUP.subarray(0, -13), hex('00000000 00000080'), SETUP.subarray(-13)]);
    expect(streamErrorOf(() => tryDecodeRamSetupSection(hook, 0, 0, { ignoreShared: false })).code).toBe(
      'QSNAP_STREAM_UNSUPPORTED',
    );
    const block = hex(`01 00000003 05 'block' 00000000 00000001 00`);
    const err = streamErrorOf(() => tryDecodeRamSetupSection(block, 0, 0, { ignoreShared: false }));
    expect(err.code).toBe('QSNAP_STREAM_UNSUPPORTED');
    expect(err.hint).toMatch(/block migration/);
    const v3 = hex(`01 00000002 03 'ram' 00000000 00000003 00`);
    expect(streamErrorOf(() => tryDecodeRamSetupSection(v3, 0, 0, { ignoreShared: false })).code).toBe(
      'QSNAP_STREAM_UNSUPPORTED',
    );
  });
});

describe('RAM records', () => {
  it('decodes a page record that names its block', () => {
    const out = newRecordHeader();
    const bytes = hex(`00000001 00003008 06 'pc.ram'`); // offset 0x100003000 | PAGE
    expect(tryDecodeRecordHeader(bytes, 0, 0, out)).toEqual({
      flags: RamFlag.PAGE,
      offset: 0x1_0000_3000,
      idstr: 'pc.ram',
      size: 15,
    });
    expectIncompleteForEveryPrefix(bytes, (b) => tryDecodeRecordHeader(b, 0, 0, newRecordHeader()));
  });

  it('decodes CONTINUE, ZERO and EOS records as 8-byte headers', () => {
    const out = newRecordHeader();
    expect(tryDecodeRecordHeader(hex('00000000 00005028'), 0, 0, out)).toEqual({
      flags: RamFlag.PAGE | RamFlag.CONTINUE,
      offset: 0x5000,
      idstr: undefined,
      size: 8,
    });
    expect(tryDecodeRecordHeader(hex('00000000 00001022'), 0, 0, out)).toMatchObject({
      flags: 0x22,
      size: 8,
    });
    expect(tryDecodeRecordHeader(hex('00000000 00000010'), 0, 0, out)).toMatchObject({
      flags: 0x10,
      size: 8,
    });
  });

  it('refuses offsets past 2^53 instead of rounding them', () => {
    const err = streamErrorOf(() =>
      tryDecodeRecordHeader(hex('ffffffff 00000028'), 0, 64, newRecordHeader()),
    );
    expect(err.code).toBe('QSNAP_STREAM_FORMAT');
    expect(err.offset).toBe(64);
  });

  it('classifies every main flag the way the 7.2 loader does', () => {
    expect(classifyRecord(RamFlag.PAGE, 0, 0)).toBe('page');
    expect(classifyRecord(RamFlag.PAGE | RamFlag.CONTINUE, 0x1000, 0)).toBe('page');
    expect(classifyRecord(RamFlag.ZERO | RamFlag.CONTINUE, 0x1000, 0)).toBe('zero');
    expect(classifyRecord(RamFlag.EOS, 0, 0)).toBe('eos');
    expect(classifyRecord(RamFlag.MULTIFD_FLUSH, 0, 0)).toBe('multifd-flush');
    const unsupported = [RamFlag.XBZRLE, RamFlag.COMPRESS_PAGE | RamFlag.CONTINUE, RamFlag.HOOK];
    for (const flags of unsupported) {
      expect(streamErrorOf(() => classifyRecord(flags, 0, 7)).code, ramFlagNames(flags)).toBe(
        'QSNAP_STREAM_UNSUPPORTED',
      );
    }
    const malformed = [
      RamFlag.MEM_SIZE,
      RamFlag.ZERO | RamFlag.PAGE,
      RamFlag.EOS | RamFlag.CONTINUE,
      RamFlag.FULL,
      0x400,
      0,
      RamFlag.CONTINUE,
    ];
    for (const flags of malformed) {
      const err = streamErrorOf(() => classifyRecord(flags, 0, 7));
      expect(err.code, ramFlagNames(flags)).toBe('QSNAP_STREAM_FORMAT');
      expect(err.offset).toBe(7);
    }
    expect(streamErrorOf(() => classifyRecord(RamFlag.EOS, 0x1000, 7)).code).toBe('QSNAP_STREAM_FORMAT');
  });

  it('names flags for messages', () => {
    expect(ramFlagNames(0x28)).toBe('RAM_SAVE_FLAG_PAGE|RAM_SAVE_FLAG_CONTINUE');
    expect(ramFlagNames(0x800)).toBe('0x800');
  });

  it('encodes a PART section naming the block on the first record and on every change', () => {
    const page = Buffer.alloc(4096, 0xab);
    const section = encodeRamSection(2, [
      { idstr: 'a', offset: 0 },
      { idstr: 'a', offset: 0x1000, data: page },
      { idstr: 'bb', offset: 0x2000 },
      { idstr: 'a', offset: 0x3000 },
    ]);
    expect(section).toEqual(
      hex(`
        02 00000002                                  // PART, section 2
        00000000 00000002 01 'a' 00                  // ZERO @0 names "a", fill 0
        00000000 00001028 ${page.toString('hex')}    // PAGE|CONTINUE @0x1000
        00000000 00002002 02 'bb' 00                 // ZERO @0x2000 names "bb"
        00000000 00003002 01 'a' 00                  // back to "a": named again
        00000000 00000010                            // EOS
        7e 00000002                                  // footer`),
    );
    expect(encodeRamSection(9, [], { type: SectionType.END, footers: false })).toEqual(
      hex('03 00000009 00000000 00000010'),
    );
    expect(encodeEos()).toEqual(hex('00000000 00000010'));
  });
});

describe('device tail end', () => {
  const json = JSON.stringify({ page_size: 4096, devices: [{ name: 'timer', instance_id: 0 }] });

  it('finds EOF and VMDESCRIPTION from the end', () => {
    const tail = Buffer.concat([
      hex('04 00000000 05 74696d6572 00000000 00000002 7e 00000000'),
      encodeDeviceTailEnd(json),
    ]);
    const end = decodeDeviceTailEnd(tail, 0, { requireVmDescription: true });
    expect(end).toEqual({
      eofAt: 24,
      vmDescription: JSON.parse(json),
      vmDescriptionBytes: json.length,
    });
    expect(tail.subarray(24, 30)).toEqual(hex(`00 06 ${json.length.toString(16).padStart(8, '0')}`));
  });

  it('is undefined for every cut before the end', () => {
    const tail = Buffer.concat([
      hex('04 00000000 01 74 00000000 00000001 0006 7e 00000000'),
      encodeDeviceTailEnd(json),
    ]);
    for (let n = 0; n < tail.length; n++) {
      expect(
        decodeDeviceTailEnd(tail.subarray(0, n), 0, { requireVmDescription: true }),
        `cut at ${n}`,
      ).toBeUndefined();
    }
  });

  it('is not fooled by 0x06 or 0x00 bytes in the length field', () => {
    // 0x0600 bytes of JSON: the length field reads 00 00 06 00.
    const big = JSON.stringify({ page_size: 4096, devices: [], pad: 'x'.repeat(0x600 - 40) });
    const padded = big.slice(0, -2).padEnd(0x600 - 2, ' ') + big.slice(-2);
    expect(padded.length).toBe(0x600);
    const tail = Buffer.concat([
      hex('04 00000000 01 74 00000000 00000001 7e 00000000'),
      encodeDeviceTailEnd(padded),
    ]);
    expect(decodeDeviceTailEnd(tail, 0, { requireVmDescription: true })?.vmDescriptionBytes).toBe(0x600);
  });

  it('takes a trailing EOF without VMDESCRIPTION only when told to', () => {
    const tail = hex('04 00000000 01 74 00000000 00000001 7e 00000000 00');
    expect(decodeDeviceTailEnd(tail, 0, { requireVmDescription: true })).toBeUndefined();
    expect(decodeDeviceTailEnd(tail, 0, { requireVmDescription: false })).toEqual({ eofAt: tail.length - 1 });
    expect(decodeDeviceTailEnd(tail.subarray(0, -6), 0, { requireVmDescription: false })).toBeUndefined();
    // Why VMDESCRIPTION is required by default: a cut after the footer's last 0x00 looks complete.
    expect(decodeDeviceTailEnd(tail.subarray(0, -1), 0, { requireVmDescription: false })).toBeDefined();
    expect(decodeDeviceTailEnd(tail.subarray(0, -1), 0, { requireVmDescription: true })).toBeUndefined();
  });

  it('refuses a VMDESCRIPTION that is not the JSON QEMU writes', () => {
    const notJson = encodeDeviceTailEnd('{"page_size": 4096,');
    const err = streamErrorOf(() => decodeDeviceTailEnd(notJson, 500, { requireVmDescription: true }));
    expect(err.code).toBe('QSNAP_STREAM_FORMAT');
    expect(err.offset).toBe(506);
    const wrongShape = encodeDeviceTailEnd({ devices: 'none' });
    expect(streamErrorOf(() => decodeDeviceTailEnd(wrongShape, 0, { requireVmDescription: true })).code).toBe(
      'QSNAP_STREAM_FORMAT',
    );
  });
});

describe('StreamError', () => {
  it('carries code, offset, hint and a JSON form', () => {
    const err = streamErrorOf(() => tryDecodePrologue(hex('00')));
    expect(err).toBeInstanceOf(StreamError);
    expect(err.toJSON()).toMatchObject({ code: 'QSNAP_STREAM_FORMAT', details: { offset: 0 } });
    expect(err.toLine()).toMatch(/bad magic.* — /);
  });
});
