import { type ArgvEntry, formatQemuOpts, getOpt, parseQemuOpts, splitArgv } from './qemu-opts.js';

/**
 * Reading a QEMU command line (pure: argv in, a description out): where it keeps its disks,
 * its QMP socket, its devices, its RAM and memory backend. cmdline-rewrite.ts turns a parsed
 * command line into one that restores a snapshot.
 */

export interface ArgvDisk {
  /** Index into the entries of the split argv. */
  entryIndex: number;
  kind: 'drive' | 'blockdev-file' | 'blockdev-json';
  file: string;
  /** -drive id, or the node-name of the format node above a -blockdev file node. */
  nodeName: string | undefined;
  /** Index of the format node's entry (blockdev), whose driver must become qcow2. */
  formatEntryIndex: number | undefined;
  readOnly: boolean;
  /** The guest device (qdev id) attached to it, when the command line names one. */
  deviceId: string | undefined;
}

export interface ParsedCommandLine {
  binary: string | undefined;
  entries: ArgvEntry[];
  disks: ArgvDisk[];
  /** The QMP unix socket the command line opens, if any. */
  qmpSocket: string | undefined;
  /** QOM types of `-device` entries (e.g. virtio-balloon-pci). */
  deviceTypes: string[];
  /** Memory backend id named by `-machine memory-backend=` or `-M memory-backend=`. */
  memoryBackendId: string | undefined;
  /** Guest RAM given by `-m` (base memory), when the command line has one. */
  ramBytes: number | undefined;
}

export function isTruthy(value: string | undefined): boolean {
  return value === 'on' || value === 'true' || value === 'yes';
}

const SIZE_SUFFIXES = 'BKMGTPE';

/**
 * A `-m` size in bytes: a plain number is MiB, else a B/K/M/G/T/P/E suffix
 * (QEMU: softmmu/vl.c parse_memory_options). Undefined when it is not a plain size.
 */
export function parseRamSize(value: string): number | undefined {
  const o = parseQemuOpts(value, 'size');
  const text = (o.implied ?? getOpt(o, 'size'))?.trim();
  const m = text ? /^(\d+(?:\.\d+)?)([bkmgtpe])?$/i.exec(text) : null;
  if (!m) return undefined;
  const unit = m[2] ? SIZE_SUFFIXES.indexOf(m[2].toUpperCase()) : 2;
  return Math.round(Number(m[1]) * 1024 ** unit);
}

/** A `-blockdev` value in JSON form (`{"driver": …}`), or undefined for the key=value form. */
export function readJsonOption(value: string): Record<string, unknown> | undefined {
  if (!value.trimStart().startsWith('{')) return undefined;
  try {
    return JSON.parse(value) as Record<string, unknown>;
  } catch {
    return undefined;
  }
}

/** What the readers below collect while they walk the entries. */
interface Reading extends ParsedCommandLine {
  drivesOfDevices: Map<string, string>;
  chardevSockets: Map<string, string>;
  /** Format nodes by the file node they sit on: `file=<node>`. */
  formatNodeOfFile: Map<string, { index: number; name: string | undefined; readOnly: boolean }>;
}

type Reader = (r: Reading, value: string, index: number, option: string) => void;

function disk(
  r: Reading,
  index: number,
  fields: Pick<ArgvDisk, 'kind' | 'file'> & Partial<Omit<ArgvDisk, 'kind' | 'file' | 'entryIndex'>>,
): void {
  r.disks.push({
    entryIndex: index,
    nodeName: undefined,
    formatEntryIndex: undefined,
    readOnly: false,
    deviceId: undefined,
    ...fields,
  });
}

function readDevice(r: Reading, value: string): void {
  const o = parseQemuOpts(value, 'driver');
  const type = o.implied ?? getOpt(o, 'driver');
  if (type) r.deviceTypes.push(type);
  const drive = getOpt(o, 'drive');
  const id = getOpt(o, 'id');
  if (drive && id) r.drivesOfDevices.set(drive, id);
}

/** A JSON `-blockdev`: a format node with its file node nested, a file node, or a format node on a named file node. */
function readBlockdevJson(r: Reading, json: Record<string, unknown>, index: number): void {
  const file = json['file'];
  const nested =
    typeof file === 'object' &&
    file !== null &&
    typeof (file as Record<string, unknown>)['filename'] === 'string';
  const filename = nested
    ? (file as Record<string, unknown>)['filename']
    : json['driver'] === 'file'
      ? json['filename']
      : undefined;
  const nodeName = json['node-name'] as string | undefined;
  const readOnly = json['read-only'] === true;
  if (typeof filename === 'string') {
    disk(r, index, {
      kind: 'blockdev-json',
      file: filename,
      nodeName,
      formatEntryIndex: nested ? index : undefined,
      readOnly,
    });
  } else if (typeof file === 'string') {
    r.formatNodeOfFile.set(file, { index, name: nodeName, readOnly });
  }
}

/** A key=value `-blockdev`: a file node, a format node with `file.filename`, or a format node on a named file node. */
function readBlockdev(r: Reading, value: string, index: number): void {
  const json = readJsonOption(value);
  if (json) {
    readBlockdevJson(r, json, index);
    return;
  }
  const o = parseQemuOpts(value);
  const driver = getOpt(o, 'driver');
  const nodeName = getOpt(o, 'node-name');
  const readOnly = isTruthy(getOpt(o, 'read-only'));
  const nested = getOpt(o, 'file.filename');
  const fileRef = getOpt(o, 'file');
  if (driver === 'file' || driver === 'host_device') {
    const filename = getOpt(o, 'filename');
    if (filename) disk(r, index, { kind: 'blockdev-file', file: filename, nodeName, readOnly });
  } else if (nested) {
    disk(r, index, { kind: 'blockdev-file', file: nested, nodeName, formatEntryIndex: index, readOnly });
  } else if (fileRef) {
    r.formatNodeOfFile.set(fileRef, { index, name: nodeName, readOnly });
  }
}

function readDrive(r: Reading, value: string, index: number): void {
  const o = parseQemuOpts(value);
  const file = getOpt(o, 'file');
  if (!file || getOpt(o, 'media') === 'cdrom') return;
  disk(r, index, {
    kind: 'drive',
    file,
    nodeName: getOpt(o, 'id') ?? getOpt(o, 'node-name'),
    readOnly: isTruthy(getOpt(o, 'readonly')) || isTruthy(getOpt(o, 'read-only')),
  });
}

/** `-hda` … `-hdd`: legacy shorthands become -drive entries so the same rewriting applies. */
function readHd(r: Reading, value: string, index: number, option: string): void {
  r.entries[index] = {
    option: '-drive',
    value: formatQemuOpts({
      pairs: [
        ['file', value],
        ['index', String('abcd'.indexOf(option[3]!))],
        ['media', 'disk'],
      ],
    }),
  };
  disk(r, index, { kind: 'drive', file: value });
}

function readQmp(r: Reading, value: string): void {
  const o = parseQemuOpts(value, 'path');
  if (o.implied?.startsWith('unix:')) r.qmpSocket = o.implied.slice(5);
}

function readChardev(r: Reading, value: string): void {
  const o = parseQemuOpts(value, 'backend');
  const id = getOpt(o, 'id');
  const path = getOpt(o, 'path');
  if (o.implied === 'socket' && id && path && isTruthy(getOpt(o, 'server') ?? 'off'))
    r.chardevSockets.set(id, path);
}

/** `-mon chardev=X,mode=control` on a socket chardev is a QMP socket too. */
function readMon(r: Reading, value: string): void {
  const o = parseQemuOpts(value, 'chardev');
  const chardev = o.implied ?? getOpt(o, 'chardev');
  if (getOpt(o, 'mode') === 'control' && chardev && r.chardevSockets.has(chardev))
    r.qmpSocket ??= r.chardevSockets.get(chardev);
}

function readMachine(r: Reading, value: string): void {
  r.memoryBackendId = getOpt(parseQemuOpts(value, 'type'), 'memory-backend') ?? r.memoryBackendId;
}

const READERS: Record<string, Reader> = {
  '-device': readDevice,
  '-blockdev': readBlockdev,
  '-drive': readDrive,
  '-hda': readHd,
  '-hdb': readHd,
  '-hdc': readHd,
  '-hdd': readHd,
  '-qmp': readQmp,
  '-chardev': readChardev,
  '-mon': readMon,
  '-m': (r, value) => {
    r.ramBytes = parseRamSize(value);
  },
  '-machine': readMachine,
  '-M': readMachine,
};

/** A -blockdev file node is the disk; the format node above it carries the device's drive name. */
function linkFormatNodes(r: Reading): void {
  for (const d of r.disks) {
    if (d.kind !== 'drive' && d.formatEntryIndex === undefined && d.nodeName) {
      const format = r.formatNodeOfFile.get(d.nodeName);
      if (format) {
        d.formatEntryIndex = format.index;
        d.nodeName = format.name ?? d.nodeName;
        d.readOnly ||= format.readOnly;
      }
    }
    if (d.nodeName) d.deviceId = r.drivesOfDevices.get(d.nodeName);
  }
}

/** Where a command line keeps its disks, QMP socket and devices. */
export function parseCommandLine(argv: readonly string[]): ParsedCommandLine {
  const first = argv[0];
  const binary = first !== undefined && !first.startsWith('-') ? first : undefined;
  const r: Reading = {
    binary,
    entries: splitArgv(binary ? argv.slice(1) : argv),
    disks: [],
    qmpSocket: undefined,
    deviceTypes: [],
    memoryBackendId: undefined,
    ramBytes: undefined,
    drivesOfDevices: new Map(),
    chardevSockets: new Map(),
    formatNodeOfFile: new Map(),
  };
  r.entries.forEach((entry, index) => {
    const read = Object.hasOwn(READERS, entry.option) ? READERS[entry.option] : undefined;
    read?.(r, entry.value ?? '', index, entry.option);
  });
  linkFormatNodes(r);
  const { drivesOfDevices: _d, chardevSockets: _c, formatNodeOfFile: _f, ...parsed } = r;
  return parsed;
}
