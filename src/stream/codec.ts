/**
 * The QEMU migration stream format, bytes ⇄ objects, with no I/O.
 *
 * Everything is big-endian (migration/qemu-file.c, qemu_put_be32/qemu_put_be64). A stream is
 *
 *   "QEVM" be32(3)                                  savevm.c, qemu_savevm_state_header
 *   0x07 configuration [0x05 subsection]…           savevm.c, vmstate_configuration
 *   0x01 START "ram" payload [footer]               savevm.c, save_section_header
 *   0x02 PART payload [footer] …                    (ram.c, ram_save_iterate)
 *   [0x03 END payload [footer]]                     precopy only (ram.c, ram_save_complete)
 *   0x04 FULL device … 0x00 EOF                     savevm.c, qemu_savevm_state_complete_precopy_non_iterable
 *   [0x06 VMDESCRIPTION be32 len JSON]
 *
 * Decoders take a Buffer, a position in it and `base`, the absolute stream offset of buf[0],
 * so that their errors name the stream offset. `try*` decoders return undefined while the
 * bytes are not all there yet, and throw a StreamError when the bytes that are there are wrong.
 * `write*` encoders write into a caller's Buffer and return the position after what they wrote;
 * `encode*` encoders return a new Buffer.
 */
import { z } from 'zod';
import { formatError, limitError, unsupportedError } from './errors.js';
import type { RamBlock, RamSetup, StreamPrologue, VmDescription } from './types.js';

/** "QEVM" (migration/savevm.c, QEMU_VM_FILE_MAGIC). */
export const QEMU_VM_FILE_MAGIC = 0x5145564d;
/** The only version QEMU writes since 1.3 (migration/savevm.c, QEMU_VM_FILE_VERSION). */
export const QEMU_VM_FILE_VERSION = 3;

/** Section and marker bytes (migration/savevm.c, QEMU_VM_*). */
export const SectionType = {
  EOF: 0x00,
  START: 0x01,
  PART: 0x02,
  END: 0x03,
  FULL: 0x04,
  SUBSECTION: 0x05,
  VMDESCRIPTION: 0x06,
  CONFIGURATION: 0x07,
  COMMAND: 0x08,
  FOOTER: 0x7e,
} as const;

export const SECTION_TYPE_NAMES: Readonly<Record<number, string>> = Object.fromEntries(
  Object.entries(SectionType).map(([name, value]) => [
    value,
    ['START', 'PART', 'END', 'FULL', 'FOOTER'].includes(name) ? `QEMU_VM_SECTION_${name}` : `QEMU_VM_${name}`,
  ]),
);

/**
 * Flags in the low bits of a RAM record's be64 (migration/ram.c, RAM_SAVE_FLAG_*). The high
 * bits are the page's offset in its block, so with 4096-byte pages the flags fit in 12 bits.
 */
export const RamFlag = {
  /** Historically FULL; unused since QEMU 1.x (ram.c keeps the value reserved). */
  FULL: 0x01,
  ZERO: 0x02,
  MEM_SIZE: 0x04,
  PAGE: 0x08,
  EOS: 0x10,
  CONTINUE: 0x20,
  XBZRLE: 0x40,
  HOOK: 0x80,
  COMPRESS_PAGE: 0x100,
  MULTIFD_FLUSH: 0x200,
} as const;

export const RAM_FLAG_NAMES: Readonly<Record<number, string>> = Object.fromEntries(
  Object.entries(RamFlag).map(([name, value]) => [value, `RAM_SAVE_FLAG_${name}`]),
);

/** QEMU_VM_COMMAND numbers (migration/savevm.h, enum qemu_vm_cmd). */
export const MigCommand = {
  OPEN_RETURN_PATH: 1,
  PING: 2,
  POSTCOPY_ADVISE: 3,
  POSTCOPY_LISTEN: 4,
  POSTCOPY_RUN: 5,
  POSTCOPY_RAM_DISCARD: 6,
  POSTCOPY_RESUME: 7,
  PACKAGED: 8,
  RECV_BITMAP: 9,
  ENABLE_COLO: 10,
  SWITCHOVER_START: 11,
} as const;

export const MIG_COMMAND_NAMES: Readonly<Record<number, string>> = Object.fromEntries(
  Object.entries(MigCommand).map(([name, value]) => [value, `MIG_CMD_${name}`]),
);

export const PAGE_SIZE = 4096;
export const PAGE_BITS = 12;
const FLAGS_MASK = PAGE_SIZE - 1;
const TWO_32 = 0x1_0000_0000;

/** The RAM section's identity (migration/ram.c, ram_mig_init: register_savevm_live("ram", 0, 4)). */
export const RAM_SECTION_IDSTR = 'ram';
export const RAM_SECTION_INSTANCE_ID = 0;
export const RAM_SECTION_VERSION_ID = 4;

/** Configuration capabilities whose stream effect qsnap parses (savevm.c, vmstate_capabilites). */
export const SUPPORTED_CAPABILITIES: ReadonlySet<string> = new Set(['x-ignore-shared']);

/** Record header max: be64 + u8 length + 255-byte idstr. */
export const MAX_RECORD_HEADER_BYTES = 8 + 1 + 255;
/** Section header max: type + be32 id + u8 length + 255-byte idstr + be32 instance + be32 version. */
export const MAX_SECTION_HEADER_BYTES = 1 + 4 + 1 + 255 + 4 + 4;
export const FOOTER_BYTES = 5;
export const EOS_BYTES = 8;
/** A PAGE record with CONTINUE, the common case. */
export const PAGE_RECORD_BYTES = 8 + PAGE_SIZE;

// ---------------------------------------------------------------------------------------------
// Small readers

/** A be64 as a number; stream values past 2^53 are errors, not silently rounded. */
function readU64(buf: Buffer, pos: number, base: number, what: string): number {
  const hi = buf.readUInt32BE(pos);
  if (hi > 0x1f_ffff) {
    throw formatError(`${what} 0x${buf.readBigUInt64BE(pos).toString(16)} is out of range`, base + pos);
  }
  return hi * TWO_32 + buf.readUInt32BE(pos + 4);
}

function hex(n: number): string {
  return `0x${n.toString(16)}`;
}

/** Names of the flag bits set in `flags`, for messages. */
export function ramFlagNames(flags: number): string {
  const names: string[] = [];
  for (let bit = 1; bit <= FLAGS_MASK; bit <<= 1) {
    if (flags & bit) names.push(RAM_FLAG_NAMES[bit] ?? hex(bit));
  }
  return names.length ? names.join('|') : '0';
}

// ---------------------------------------------------------------------------------------------
// Header and configuration

export interface Decoded {
  /** Bytes the decoded item takes in the stream. */
  size: number;
}

/**
 * The file header, the configuration section and its subsections, up to the first section.
 * Needs one byte past the configuration to know the subsections ended (the loader peeks for
 * QEMU_VM_SUBSECTION the same way: migration/vmstate.c, vmstate_subsection_load).
 */
export function tryDecodePrologue(buf: Buffer, base = 0): (StreamPrologue & Decoded) | undefined {
  const magicBytes = Math.min(buf.length, 4);
  for (let i = 0; i < magicBytes; i++) {
    if (buf[i] !== ((QEMU_VM_FILE_MAGIC >>> (24 - 8 * i)) & 0xff)) {
      throw formatError('not a QEMU migration stream: bad magic (expected "QEVM")', base, {
        found: buf.subarray(0, magicBytes).toString('hex'),
      });
    }
  }
  if (buf.length < 9) return undefined;
  const version = buf.readUInt32BE(4);
  if (version !== QEMU_VM_FILE_VERSION) {
    throw formatError(`unsupported migration stream version ${version} (expected 3)`, base + 4);
  }
  const prologue: StreamPrologue & Decoded = { version, machine: undefined, capabilities: [], size: 8 };
  if (buf[8] !== SectionType.CONFIGURATION) return prologue; // send-configuration=off (machine types ≤ 2.8)

  let pos = 9;
  if (buf.length < pos + 4) return undefined;
  const nameLength = buf.readUInt32BE(pos);
  if (nameLength > 1024) throw formatError(`machine name length ${nameLength} is implausible`, base + pos);
  pos += 4;
  if (buf.length < pos + nameLength) return undefined;
  prologue.machine = buf.toString('latin1', pos, pos + nameLength);
  pos += nameLength;

  for (;;) {
    if (buf.length < pos + 1) return undefined;
    if (buf[pos] !== SectionType.SUBSECTION) break;
    const end = tryDecodeConfigurationSubsection(buf, pos, base, prologue);
    if (end === undefined) return undefined;
    pos = end;
  }
  prologue.size = pos;
  return prologue;
}

/** One `configuration/…` subsection: 0x05, u8 len, name, be32 version, payload (vmstate.c, vmstate_subsection_save). */
function tryDecodeConfigurationSubsection(
  buf: Buffer,
  start: number,
  base: number,
  into: StreamPrologue,
): number | undefined {
  const header = tryDecodeSubsectionHeader(buf, start, base);
  if (!header) return undefined;
  const pos = start + header.size;
  switch (header.name) {
    case 'configuration/target-page-bits': {
      if (buf.length < pos + 4) return undefined;
      into.targetPageBits = buf.readUInt32BE(pos);
      return pos + 4;
    }
    case 'configuration/capabilities':
      return tryDecodeCapabilities(buf, pos, base, into);
    case 'configuration/uuid': {
      // savevm.c, vmstate_uuid: the 16 raw bytes of the source's UUID
      if (buf.length < pos + 16) return undefined;
      into.uuid = formatUuid(buf.subarray(pos, pos + 16));
      return pos + 16;
    }
    default:
      throw unsupportedError(
        `unknown configuration subsection ${JSON.stringify(header.name)}`,
        'this QEMU writes a stream feature qsnap does not know; use a QEMU version qsnap supports',
        base + start,
      );
  }
}

/** 0x05, u8 len, name, be32 version; every configuration subsection is version 1. */
function tryDecodeSubsectionHeader(
  buf: Buffer,
  start: number,
  base: number,
): ({ name: string } & Decoded) | undefined {
  let pos = start + 1;
  if (buf.length < pos + 1) return undefined;
  const nameLength = buf[pos]!;
  pos += 1;
  if (buf.length < pos + nameLength + 4) return undefined;
  const name = buf.toString('latin1', pos, pos + nameLength);
  pos += nameLength;
  const version = buf.readUInt32BE(pos);
  if (version !== 1) {
    throw unsupportedError(
      `configuration subsection ${name} has version ${version}, qsnap knows version 1`,
      'use a QEMU version qsnap supports (7.2 … 10.x)',
      base + start,
    );
  }
  return { name, size: pos + 4 - start };
}

/** Sets `into.capabilities` once the whole list is there; returns the position after it. */
function tryDecodeCapabilities(
  buf: Buffer,
  start: number,
  base: number,
  into: StreamPrologue,
): number | undefined {
  // savevm.c, vmstate_capabilites: be32 count, then count × (u8 len, name) (get_capability)
  let pos = start;
  if (buf.length < pos + 4) return undefined;
  const count = buf.readUInt32BE(pos);
  if (count > 256) throw formatError(`capability count ${count} is implausible`, base + pos);
  pos += 4;
  const capabilities: string[] = [];
  for (let i = 0; i < count; i++) {
    if (buf.length < pos + 1) return undefined;
    const length = buf[pos]!;
    if (buf.length < pos + 1 + length) return undefined;
    capabilities.push(buf.toString('latin1', pos + 1, pos + 1 + length));
    pos += 1 + length;
  }
  into.capabilities = capabilities;
  return pos;
}

function formatUuid(bytes: Buffer): string {
  const h = bytes.toString('hex');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

/** Header, configuration and subsections, in the order QEMU 7.2 lists them. */
export function encodePrologue(prologue: Omit<StreamPrologue, 'version'> & { version?: number }): Buffer {
  const parts: Buffer[] = [];
  const header = Buffer.alloc(8);
  header.writeUInt32BE(QEMU_VM_FILE_MAGIC, 0);
  header.writeUInt32BE(prologue.version ?? QEMU_VM_FILE_VERSION, 4);
  parts.push(header);
  if (prologue.machine !== undefined) {
    const name = Buffer.from(prologue.machine, 'latin1');
    const config = Buffer.alloc(5);
    config[0] = SectionType.CONFIGURATION;
    config.writeUInt32BE(name.length, 1);
    parts.push(config, name);
    if (prologue.targetPageBits !== undefined) {
      const bits = Buffer.alloc(4);
      bits.writeUInt32BE(prologue.targetPageBits);
      parts.push(encodeSubsectionHeader('configuration/target-page-bits'), bits);
    }
    if (prologue.capabilities.length) {
      const count = Buffer.alloc(4);
      count.writeUInt32BE(prologue.capabilities.length);
      parts.push(encodeSubsectionHeader('configuration/capabilities'), count);
      for (const cap of prologue.capabilities) parts.push(encodeShortString(cap));
    }
    if (prologue.uuid !== undefined) {
      parts.push(
        encodeSubsectionHeader('configuration/uuid'),
        Buffer.from(prologue.uuid.replace(/-/g, ''), 'hex'),
      );
    }
  } else if (prologue.capabilities.length || prologue.uuid !== undefined) {
    throw new TypeError('capabilities and uuid need a configuration section (a machine name)');
  }
  return Buffer.concat(parts);
}

function encodeSubsectionHeader(name: string): Buffer {
  const nameBytes = encodeShortString(name);
  const out = Buffer.alloc(1 + nameBytes.length + 4);
  out[0] = SectionType.SUBSECTION;
  nameBytes.copy(out, 1);
  out.writeUInt32BE(1, 1 + nameBytes.length);
  return out;
}

/** u8 length + bytes, as QEMU writes idstrs and capability names. */
function encodeShortString(text: string): Buffer {
  const bytes = Buffer.from(text, 'latin1');
  if (bytes.length > 255) throw new RangeError(`${JSON.stringify(text)} is longer than 255 bytes`);
  return Buffer.concat([Buffer.of(bytes.length), bytes]);
}

// ---------------------------------------------------------------------------------------------
// Section headers and footers

export interface SectionHeader {
  type: number;
  sectionId: number;
  /** START and FULL only. */
  idstr?: string;
  instanceId?: number;
  versionId?: number;
}

/** START/FULL: type, be32 id, u8 len + idstr, be32 instance, be32 version; PART/END: type, be32 id (savevm.c, save_section_header). */
export function tryDecodeSectionHeader(
  buf: Buffer,
  pos: number,
  base = 0,
): (SectionHeader & Decoded) | undefined {
  if (buf.length < pos + 1) return undefined;
  const type = buf[pos]!;
  if (type === SectionType.PART || type === SectionType.END) {
    if (buf.length < pos + 5) return undefined;
    return { type, sectionId: buf.readUInt32BE(pos + 1), size: 5 };
  }
  if (type !== SectionType.START && type !== SectionType.FULL) {
    throw formatError(`expected a section header, found byte ${hex(type)}`, base + pos);
  }
  if (buf.length < pos + 6) return undefined;
  const idLength = buf[pos + 5]!;
  if (buf.length < pos + 6 + idLength + 8) return undefined;
  const at = pos + 6 + idLength;
  return {
    type,
    sectionId: buf.readUInt32BE(pos + 1),
    idstr: buf.toString('latin1', pos + 6, at),
    instanceId: buf.readUInt32BE(at),
    versionId: buf.readUInt32BE(at + 4),
    size: 6 + idLength + 8,
  };
}

export function writeSectionHeader(target: Buffer, pos: number, header: SectionHeader): number {
  target[pos] = header.type;
  target.writeUInt32BE(header.sectionId, pos + 1);
  if (header.type === SectionType.PART || header.type === SectionType.END) return pos + 5;
  const id = encodeShortString(header.idstr ?? '');
  id.copy(target, pos + 5);
  let at = pos + 5 + id.length;
  at = target.writeUInt32BE(header.instanceId ?? 0, at);
  return target.writeUInt32BE(header.versionId ?? 0, at);
}

export function encodeSectionHeader(header: SectionHeader): Buffer {
  const out = Buffer.alloc(MAX_SECTION_HEADER_BYTES);
  return out.subarray(0, writeSectionHeader(out, 0, header));
}

/** 0x7E, be32 section id (savevm.c, save_section_footer / check_section_footer). */
export function tryDecodeFooter(
  buf: Buffer,
  pos: number,
  base = 0,
): (Decoded & { sectionId: number }) | undefined {
  if (buf.length < pos + 1) return undefined;
  if (buf[pos] !== SectionType.FOOTER) {
    throw formatError(`expected a section footer (0x7e), found byte ${hex(buf[pos]!)}`, base + pos);
  }
  if (buf.length < pos + FOOTER_BYTES) return undefined;
  return { sectionId: buf.readUInt32BE(pos + 1), size: FOOTER_BYTES };
}

export function writeFooter(target: Buffer, pos: number, sectionId: number): number {
  target[pos] = SectionType.FOOTER;
  return target.writeUInt32BE(sectionId, pos + 1);
}

export function encodeFooter(sectionId: number): Buffer {
  const out = Buffer.alloc(FOOTER_BYTES);
  writeFooter(out, 0, sectionId);
  return out;
}

/** A FULL device section with an opaque payload (tests and synthetic tails). */
export function encodeFullSection(
  header: { sectionId: number; idstr: string; instanceId: number; versionId: number },
  payload: Buffer,
  footers = true,
): Buffer {
  return Buffer.concat([
    encodeSectionHeader({ type: SectionType.FULL, ...header }),
    payload,
    ...(footers ? [encodeFooter(header.sectionId)] : []),
  ]);
}

/** 0x08, be16 command, be16 length, data (savevm.c, qemu_savevm_command_send). */
export function tryDecodeCommand(
  buf: Buffer,
  pos: number,
  base = 0,
): (Decoded & { command: number; data: Buffer }) | undefined {
  if (buf.length < pos + 5) return undefined;
  if (buf[pos] !== SectionType.COMMAND) {
    throw formatError(`expected a command (0x08), found byte ${hex(buf[pos]!)}`, base + pos);
  }
  const command = buf.readUInt16BE(pos + 1);
  const length = buf.readUInt16BE(pos + 3);
  if (buf.length < pos + 5 + length) return undefined;
  return { command, data: buf.subarray(pos + 5, pos + 5 + length), size: 5 + length };
}

export function encodeCommand(command: number, data: Buffer = Buffer.alloc(0)): Buffer {
  const out = Buffer.alloc(5 + data.length);
  out[0] = SectionType.COMMAND;
  out.writeUInt16BE(command, 1);
  out.writeUInt16BE(data.length, 3);
  data.copy(out, 5);
  return out;
}

// ---------------------------------------------------------------------------------------------
// The RAM START section

export interface RamSetupSection extends RamSetup, Decoded {
  /** The MEM_SIZE total: the sum of the blocks' used lengths. */
  totalBytes: number;
  /** No-op records between the block list and EOS (MULTIFD_FLUSH, ≥ 8.1 with multifd). */
  skippedRecords: number;
}

/** Refuse blocks lists past this many entries: a pc guest has about ten. */
export const MAX_RAM_BLOCKS = 4096;

/**
 * The whole RAM START section from `pos`: header (idstr "ram", instance 0, version 4), payload
 * (ram.c, ram_save_setup: be64 total|MEM_SIZE; per block u8 len, idstr, be64 used_length
 * [, be64 mr->addr with x-ignore-shared]; be64 EOS), and its footer when the stream has
 * footers. Needs one byte past EOS when there is no footer, to tell.
 *
 * The page-size field that ram_save_setup writes with postcopy-ram (when a block's page size
 * differs from the host's) cannot be told apart without knowing the block, so postcopy streams
 * are refused before they get here (their POSTCOPY_ADVISE command comes first).
 */
export function tryDecodeRamSetupSection(
  buf: Buffer,
  pos: number,
  base: number,
  options: { ignoreShared: boolean },
): RamSetupSection | undefined {
  const header = tryDecodeRamStartHeader(buf, pos, base);
  if (!header) return undefined;
  let at = pos + header.size;
  const totalBytes = tryDecodeMemSizeTotal(buf, at, base);
  if (totalBytes === undefined) return undefined;
  at += 8;
  const blockList = tryDecodeRamBlockList(buf, at, base, totalBytes, options.ignoreShared);
  if (!blockList) return undefined;
  at += blockList.size;
  const eos = tryDecodeRecordsThroughEos(buf, at, base);
  if (!eos) return undefined;
  at += eos.size;
  const footer = tryDecodeOptionalFooter(buf, at, base, header.sectionId);
  if (!footer) return undefined;
  at += footer.size;
  return {
    sectionId: header.sectionId,
    blocks: blockList.blocks,
    footers: footer.footers,
    ignoreShared: options.ignoreShared,
    totalBytes,
    skippedRecords: eos.skippedRecords,
    size: at - pos,
  };
}

/** A START header for idstr "ram", instance 0, version 4; anything else is refused. */
function tryDecodeRamStartHeader(
  buf: Buffer,
  pos: number,
  base: number,
): (SectionHeader & Decoded) | undefined {
  const header = tryDecodeSectionHeader(buf, pos, base);
  if (!header) return undefined;
  if (header.type !== SectionType.START) {
    throw formatError('expected the RAM START section', base + pos);
  }
  checkRamSectionHeader(header, base + pos);
  return header;
}

/** The payload's first be64, total | MEM_SIZE; returns the total (8 bytes). */
function tryDecodeMemSizeTotal(buf: Buffer, pos: number, base: number): number | undefined {
  if (buf.length < pos + 8) return undefined;
  const first = buf.readUInt32BE(pos + 4) & FLAGS_MASK;
  if (first !== RamFlag.MEM_SIZE) {
    throw formatError(
      `RAM START payload must begin with RAM_SAVE_FLAG_MEM_SIZE, found ${ramFlagNames(first)}`,
      base + pos,
    );
  }
  return readU64(buf, pos, base, 'RAM total') - first;
}

/** Blocks until their used lengths add up to `totalBytes`: each a page multiple, each idstr once. */
function tryDecodeRamBlockList(
  buf: Buffer,
  start: number,
  base: number,
  totalBytes: number,
  ignoreShared: boolean,
): ({ blocks: RamBlock[] } & Decoded) | undefined {
  const blocks: RamBlock[] = [];
  const names = new Set<string>();
  let pos = start;
  let remaining = totalBytes;
  while (remaining > 0) {
    if (blocks.length >= MAX_RAM_BLOCKS)
      throw limitError('RAM block list is too long', base + pos, MAX_RAM_BLOCKS);
    const entry = tryDecodeRamBlock(buf, pos, base, ignoreShared);
    if (!entry) return undefined;
    const { idstr, usedLength } = entry.block;
    if (usedLength === 0 || usedLength % PAGE_SIZE !== 0 || usedLength > remaining) {
      throw formatError(
        `RAM block ${idstr}: used_length ${hex(usedLength)} is not a page multiple within the total ${hex(totalBytes)}`,
        base + pos,
      );
    }
    if (names.has(idstr)) throw formatError(`RAM block ${idstr} is listed twice`, base + pos);
    names.add(idstr);
    blocks.push(entry.block);
    remaining -= usedLength;
    pos += entry.size;
  }
  return { blocks, size: pos - start };
}

/** One block-list entry: u8 len, idstr, be64 used_length [, be64 mr->addr with x-ignore-shared]. */
function tryDecodeRamBlock(
  buf: Buffer,
  pos: number,
  base: number,
  ignoreShared: boolean,
): ({ block: RamBlock } & Decoded) | undefined {
  if (buf.length < pos + 1) return undefined;
  const idLength = buf[pos]!;
  const size = 1 + idLength + 8 + (ignoreShared ? 8 : 0);
  if (buf.length < pos + size) return undefined;
  if (idLength === 0) throw formatError('RAM block with an empty idstr', base + pos);
  const idstr = buf.toString('latin1', pos + 1, pos + 1 + idLength);
  const usedAt = pos + 1 + idLength;
  const usedLength = readU64(buf, usedAt, base, `used_length of RAM block ${idstr}`);
  const block: RamBlock = { idstr, usedLength };
  if (ignoreShared) block.mrAddr = buf.readBigUInt64BE(usedAt + 8);
  return { block, size };
}

/** The records after the block list, through EOS: MULTIFD_FLUSH records are skipped, others refused. */
function tryDecodeRecordsThroughEos(
  buf: Buffer,
  start: number,
  base: number,
): ({ skippedRecords: number } & Decoded) | undefined {
  let pos = start;
  let skippedRecords = 0;
  for (;;) {
    if (buf.length < pos + 8) return undefined;
    const flags = buf.readUInt32BE(pos + 4) & FLAGS_MASK;
    const isZeroAddress = buf.readUInt32BE(pos) === 0 && buf.readUInt32BE(pos + 4) === flags;
    if (flags === RamFlag.EOS && isZeroAddress) break;
    if (flags === RamFlag.MULTIFD_FLUSH && isZeroAddress) {
      skippedRecords++;
      pos += 8;
      continue;
    }
    if (flags === RamFlag.HOOK) throw hookUnsupported(base + pos);
    throw formatError(
      `RAM START payload: expected RAM_SAVE_FLAG_EOS after the block list, found ${ramFlagNames(flags)}`,
      base + pos,
    );
  }
  return { skippedRecords, size: pos + EOS_BYTES - start };
}

/** The section footer when the stream has footers; the byte at `pos` tells whether it has. */
function tryDecodeOptionalFooter(
  buf: Buffer,
  pos: number,
  base: number,
  sectionId: number,
): ({ footers: boolean } & Decoded) | undefined {
  if (buf.length < pos + 1) return undefined;
  if (buf[pos] !== SectionType.FOOTER) return { footers: false, size: 0 };
  const footer = tryDecodeFooter(buf, pos, base);
  if (!footer) return undefined;
  if (footer.sectionId !== sectionId) throw footerMismatch(footer.sectionId, sectionId, base + pos);
  return { footers: true, size: footer.size };
}

/** Refuse iterable sections other than RAM, and RAM sections of another version. */
export function checkRamSectionHeader(header: SectionHeader, offset: number): void {
  if (header.idstr !== RAM_SECTION_IDSTR) {
    throw iterableUnsupported(header.idstr ?? '', offset);
  }
  if (header.instanceId !== RAM_SECTION_INSTANCE_ID || header.versionId !== RAM_SECTION_VERSION_ID) {
    throw unsupportedError(
      `RAM section instance ${header.instanceId} version ${header.versionId}; qsnap parses instance 0 version 4`,
      'use a QEMU version qsnap supports (7.2 … 10.x)',
      offset,
    );
  }
}

export function footerMismatch(found: number, expected: number, offset: number) {
  return formatError(`section footer names section ${found}, expected ${expected}`, offset, {
    found,
    expected,
  });
}

export function iterableUnsupported(idstr: string, offset: number) {
  const hints: Record<string, string> = {
    block:
      'block migration (migrate -b/-i) is on: turn it off; qsnap snapshots disks with blockdev snapshots',
    'dirty-bitmap': 'disable the dirty-bitmaps migration capability',
  };
  const hint =
    hints[idstr] ??
    (idstr.includes('vfio')
      ? 'VFIO devices cannot be snapshotted; remove the device'
      : 'remove the device that migrates iteratively, or disable the migration feature that adds it');
  return unsupportedError(
    `iterable migration section ${JSON.stringify(idstr)}: qsnap parses only RAM as an iterable section`,
    hint,
    offset,
    { idstr },
  );
}

function hookUnsupported(offset: number) {
  return unsupportedError(
    'RAM_SAVE_FLAG_HOOK record (RDMA migration)',
    'migrate over a socket, not RDMA',
    offset,
  );
}

export function encodeRamSetupSection(setup: RamSetup): Buffer {
  const { sectionId, blocks, footers, ignoreShared } = setup;
  const parts: Buffer[] = [
    encodeSectionHeader({
      type: SectionType.START,
      sectionId,
      idstr: RAM_SECTION_IDSTR,
      instanceId: RAM_SECTION_INSTANCE_ID,
      versionId: RAM_SECTION_VERSION_ID,
    }),
  ];
  const total = blocks.reduce((sum, b) => sum + b.usedLength, 0);
  parts.push(u64(total + RamFlag.MEM_SIZE));
  for (const block of blocks) {
    if (block.usedLength % PAGE_SIZE !== 0 || block.usedLength <= 0) {
      throw new RangeError(
        `RAM block ${block.idstr}: used_length ${block.usedLength} is not a page multiple`,
      );
    }
    parts.push(encodeShortString(block.idstr), u64(block.usedLength));
    if (ignoreShared) {
      const addr = Buffer.alloc(8);
      addr.writeBigUInt64BE(block.mrAddr ?? 0n);
      parts.push(addr);
    }
  }
  parts.push(u64(RamFlag.EOS));
  if (footers) parts.push(encodeFooter(sectionId));
  return Buffer.concat(parts);
}

function u64(value: number): Buffer {
  const out = Buffer.alloc(8);
  writeU64(out, 0, value);
  return out;
}

function writeU64(target: Buffer, pos: number, value: number): number {
  const hi = Math.floor(value / TWO_32);
  target.writeUInt32BE(hi, pos);
  return target.writeUInt32BE(value - hi * TWO_32, pos + 4);
}

// ---------------------------------------------------------------------------------------------
// RAM records (PART and END payloads)

/** A decoded record header; the parser reuses one object for every record. */
export interface RecordHeader {
  flags: number;
  /** Offset of the page within its block (the be64 without its flag bits). */
  offset: number;
  /** The block's idstr when the record names it (CONTINUE not set on a page record). */
  idstr: string | undefined;
  /** Header bytes: 8, or 8 + 1 + idstr length. */
  size: number;
}

export function newRecordHeader(): RecordHeader {
  return { flags: 0, offset: 0, idstr: undefined, size: 0 };
}

/** Flags whose record names a block (ram.c, ram_load_precopy calls ram_block_from_stream for these). */
const BLOCK_FLAGS = RamFlag.ZERO | RamFlag.PAGE | RamFlag.COMPRESS_PAGE | RamFlag.XBZRLE;

/**
 * A record header: be64 (offset | flags), then, for ZERO/PAGE/COMPRESS/XBZRLE records without
 * CONTINUE, u8 len + idstr of the block (ram.c, save_page_header / ram_block_from_stream).
 * Fills and returns `out`.
 */
export function tryDecodeRecordHeader(
  buf: Buffer,
  pos: number,
  base: number,
  out: RecordHeader,
): RecordHeader | undefined {
  if (buf.length < pos + 8) return undefined;
  const hi = buf.readUInt32BE(pos);
  const lo = buf.readUInt32BE(pos + 4);
  if (hi > 0x1f_ffff) {
    throw formatError(
      `RAM record offset 0x${buf.readBigUInt64BE(pos).toString(16)} is out of range`,
      base + pos,
    );
  }
  const flags = lo & FLAGS_MASK;
  out.flags = flags;
  out.offset = hi * TWO_32 + (lo - flags);
  if (flags & BLOCK_FLAGS && !(flags & RamFlag.CONTINUE)) {
    if (buf.length < pos + 9) return undefined;
    const idLength = buf[pos + 8]!;
    if (buf.length < pos + 9 + idLength) return undefined;
    out.idstr = buf.toString('latin1', pos + 9, pos + 9 + idLength);
    out.size = 9 + idLength;
  } else {
    out.idstr = undefined;
    out.size = 8;
  }
  return out;
}

export type RecordKind = 'page' | 'zero' | 'eos' | 'multifd-flush';

/**
 * What a record's flags mean, or the error QEMU's loader would raise (ram.c, ram_load_precopy
 * switches on `flags & ~RAM_SAVE_FLAG_CONTINUE`: one main flag per record).
 */
export function classifyRecord(flags: number, offset: number, streamOffset: number): RecordKind {
  const main = flags & ~RamFlag.CONTINUE;
  const named = ramFlagNames(flags);
  switch (main) {
    case RamFlag.PAGE:
      return 'page';
    case RamFlag.ZERO:
      return 'zero';
    case RamFlag.EOS:
    case RamFlag.MULTIFD_FLUSH:
      if (flags & RamFlag.CONTINUE || offset !== 0) {
        throw formatError(`malformed RAM record ${named} at page offset ${hex(offset)}`, streamOffset);
      }
      return main === RamFlag.EOS ? 'eos' : 'multifd-flush';
    case RamFlag.XBZRLE:
      throw unsupportedError(
        'XBZRLE-compressed RAM page',
        'disable the xbzrle migration capability',
        streamOffset,
      );
    case RamFlag.COMPRESS_PAGE:
      throw unsupportedError(
        'compressed RAM page (compress capability)',
        'disable the compress migration capability',
        streamOffset,
      );
    case RamFlag.HOOK:
      throw hookUnsupported(streamOffset);
    case RamFlag.MEM_SIZE:
      throw formatError('RAM_SAVE_FLAG_MEM_SIZE outside the RAM START section', streamOffset);
    default:
      throw formatError(`unknown combination of RAM record flags ${named}`, streamOffset, { flags });
  }
}

/** be64 (offset | flags [| CONTINUE]) [+ u8 len + idstr]; `idstr` undefined means CONTINUE. */
export function writeRecordHeader(
  target: Buffer,
  pos: number,
  flags: number,
  offset: number,
  idstr: Buffer | undefined,
): number {
  if (offset % PAGE_SIZE !== 0) throw new RangeError(`page offset ${hex(offset)} is not page-aligned`);
  const at = writeU64(target, pos, offset + flags + (idstr ? 0 : RamFlag.CONTINUE));
  if (!idstr) return at;
  target[at] = idstr.length;
  return at + 1 + idstr.copy(target, at + 1);
}

/** A PAGE record; `data` holds the page at `dataPos`. */
export function writePageRecord(
  target: Buffer,
  pos: number,
  offset: number,
  idstr: Buffer | undefined,
  data: Buffer,
  dataPos = 0,
): number {
  const at = writeRecordHeader(target, pos, RamFlag.PAGE, offset, idstr);
  return at + data.copy(target, at, dataPos, dataPos + PAGE_SIZE);
}

/** A ZERO record: header + fill byte 0 (ram.c, save_zero_page_to_file). */
export function writeZeroRecord(
  target: Buffer,
  pos: number,
  offset: number,
  idstr: Buffer | undefined,
): number {
  const at = writeRecordHeader(target, pos, RamFlag.ZERO, offset, idstr);
  target[at] = 0;
  return at + 1;
}

export function writeEos(target: Buffer, pos: number): number {
  return writeU64(target, pos, RamFlag.EOS);
}

export function encodeEos(): Buffer {
  return u64(RamFlag.EOS);
}

/** A page record for `encodeRamSection`: data pages carry 4096 bytes, zero pages none. */
export interface PageRecord {
  idstr: string;
  offset: number;
  data?: Buffer;
}

/**
 * A whole PART (or END) section: header, the records, EOS, footer. The first record names its
 * block, as does every record whose block differs from the previous one; the rest carry
 * CONTINUE. QEMU carries the current block across sections, but a section that names its block
 * first loads whatever came before it.
 */
export function encodeRamSection(
  sectionId: number,
  records: readonly PageRecord[],
  options: { type?: typeof SectionType.PART | typeof SectionType.END; footers?: boolean } = {},
): Buffer {
  let size = 5 + EOS_BYTES + FOOTER_BYTES;
  for (const r of records) size += MAX_RECORD_HEADER_BYTES + (r.data ? PAGE_SIZE : 1);
  const out = Buffer.alloc(size);
  let pos = writeSectionHeader(out, 0, { type: options.type ?? SectionType.PART, sectionId });
  let current: string | undefined;
  for (const r of records) {
    const idstr = r.idstr === current ? undefined : Buffer.from(r.idstr, 'latin1');
    current = r.idstr;
    if (r.data) {
      if (r.data.length !== PAGE_SIZE) throw new RangeError(`page data must be ${PAGE_SIZE} bytes`);
      pos = writePageRecord(out, pos, r.offset, idstr, r.data);
    } else {
      pos = writeZeroRecord(out, pos, r.offset, idstr);
    }
  }
  pos = writeEos(out, pos);
  if (options.footers ?? true) pos = writeFooter(out, pos, sectionId);
  return out.subarray(0, pos);
}

// ---------------------------------------------------------------------------------------------
// The end of the device tail: EOF, then VMDESCRIPTION

const vmDescriptionSchema = z.looseObject({
  page_size: z.number().int(),
  devices: z.array(z.looseObject({ name: z.string(), instance_id: z.number().int() })),
});

export interface DeviceTailEnd {
  /** Position of the EOF byte within the tail. */
  eofAt: number;
  vmDescription?: VmDescription;
  /** JSON length in bytes. */
  vmDescriptionBytes?: number;
}

/**
 * Where the device sections end. FULL payloads carry no length, so this works from the end:
 * QEMU writes EOF, then VMDESCRIPTION + be32 length + JSON (savevm.c,
 * qemu_savevm_state_complete_precopy_non_iterable; analyze-migration.py reads it from the end
 * the same way). The JSON has no control bytes (QEMU's JSON writer escapes them), so the last
 * 0x06 whose length field reaches exactly to the end, preceded by 0x00, is the marker.
 *
 * Returns undefined when the tail does not end that way: it is incomplete. Without
 * `requireVmDescription`, a tail ending in 0x00 is taken as ending in EOF, which cannot be told
 * from a tail cut inside a device section that happens to end in 0x00: QEMU omits VMDESCRIPTION
 * only for machines with suppress-vmdesc and in postcopy.
 */
export function decodeDeviceTailEnd(
  tail: Buffer,
  base: number,
  options: { requireVmDescription: boolean },
): DeviceTailEnd | undefined {
  for (let at = tail.length - 5; at >= 1; at--) {
    at = tail.lastIndexOf(SectionType.VMDESCRIPTION, at);
    if (at < 1) break;
    if (tail.readUInt32BE(at + 1) === tail.length - at - 5 && tail[at - 1] === SectionType.EOF) {
      return { eofAt: at - 1, ...decodeVmDescription(tail, at, base) };
    }
  }
  if (!options.requireVmDescription && tail.length > 0 && tail[tail.length - 1] === SectionType.EOF) {
    return { eofAt: tail.length - 1 };
  }
  return undefined;
}

function decodeVmDescription(tail: Buffer, at: number, base: number) {
  const text = tail.toString('utf8', at + 5);
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (err) {
    throw formatError(`VMDESCRIPTION is not valid JSON: ${(err as Error).message}`, base + at + 5);
  }
  const parsed = vmDescriptionSchema.safeParse(json);
  if (!parsed.success) {
    throw formatError('VMDESCRIPTION JSON lacks page_size and devices', base + at + 5, {
      issues: parsed.error.issues.map((i) => `${i.path.join('.')}: ${i.message}`),
    });
  }
  return { vmDescription: parsed.data as VmDescription, vmDescriptionBytes: tail.length - at - 5 };
}

/** EOF, then VMDESCRIPTION with `json` when given (synthetic tails for tests). */
export function encodeDeviceTailEnd(json?: string | object): Buffer {
  if (json === undefined) return Buffer.of(SectionType.EOF);
  const text = Buffer.from(typeof json === 'string' ? json : JSON.stringify(json), 'utf8');
  const head = Buffer.alloc(6);
  head[0] = SectionType.EOF;
  head[1] = SectionType.VMDESCRIPTION;
  head.writeUInt32BE(text.length, 2);
  return Buffer.concat([head, text]);
}
