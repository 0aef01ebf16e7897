import { resolve } from 'node:path';
import { RestoreError } from '../engine/errors.js';
import {
  type ArgvEntry,
  formatQemuOpts,
  getOpt,
  joinArgv,
  parseQemuOpts,
  type QemuOpts,
  setOpt,
  splitArgv,
} from './qemu-opts.js';

/**
 * Rewriting the command line a VM was started with into one that restores a snapshot
 * (pure: argv in, argv out). What a restore changes:
 * - every snapshotted disk opens a fresh qcow2 overlay whose backing file is the snapshot's
 *   frozen layer, so a frozen layer is never opened writable and one snapshot can be
 *   restored any number of times (`-drive file=…` and `-blockdev driver=file,filename=…`);
 * - `-incoming defer` (qsnap feeds the state over QMP `migrate-incoming`);
 * - lazy mode: the main RAM block becomes a private mapping of the snapshot file;
 * - a QMP socket when the command line has none; `-daemonize` goes (qsnap detaches QEMU).
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

function isTruthy(value: string | undefined): boolean {
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

function readJsonOption(value: string): Record<string, unknown> | undefined {
  if (!value.trimStart().startsWith('{')) return undefined;
  try {
    return JSON.parse(value) as Record<string, unknown>;
  } catch {
    return undefined;
  }
}

/** Where a command line keeps its disks, QMP socket and devices. */
export function parseCommandLine(argv: readonly string[]): ParsedCommandLine {
  const first = argv[0];
  const binary = first !== undefined && !first.startsWith('-') ? first : undefined;
  const entries = splitArgv(binary ? argv.slice(1) : argv);
  const disks: ArgvDisk[] = [];
  const deviceTypes: string[] = [];
  const drivesOfDevices = new Map<string, string>();
  const chardevSockets = new Map<string, string>();
  let qmpSocket: string | undefined;
  let memoryBackendId: string | undefined;
  let ramBytes: number | undefined;
  const formatNodeOfFile = new Map<string, { index: number; name: string | undefined; readOnly: boolean }>();

  entries.forEach((entry, index) => {
    const value = entry.value ?? '';
    switch (entry.option) {
      case '-device': {
        const o = parseQemuOpts(value, 'driver');
        const type = o.implied ?? getOpt(o, 'driver');
        if (type) deviceTypes.push(type);
        const drive = getOpt(o, 'drive');
        const id = getOpt(o, 'id');
        if (drive && id) drivesOfDevices.set(drive, id);
        break;
      }
      case '-blockdev': {
        const json = readJsonOption(value);
        if (json) {
          const file = json['file'] as Record<string, unknown> | undefined;
          // A format node with its file node nested, or a file node on its own.
          const nested = file && typeof file === 'object' && typeof file['filename'] === 'string';
          const filename = nested
            ? file['filename']
            : json['driver'] === 'file'
              ? json['filename']
              : undefined;
          if (typeof filename === 'string') {
            disks.push({
              entryIndex: index,
              kind: 'blockdev-json',
              file: filename,
              nodeName: json['node-name'] as string | undefined,
              formatEntryIndex: nested ? index : undefined,
              readOnly: json['read-only'] === true,
              deviceId: undefined,
            });
          } else if (typeof json['file'] === 'string') {
            formatNodeOfFile.set(json['file'], {
              index,
              name: json['node-name'] as string | undefined,
              readOnly: json['read-only'] === true,
            });
          }
          break;
        }
        const o = parseQemuOpts(value);
        const driver = getOpt(o, 'driver');
        const fileRef = getOpt(o, 'file');
        const nested = getOpt(o, 'file.filename');
        if (driver === 'file' || driver === 'host_device') {
          const filename = getOpt(o, 'filename');
          if (filename) {
            disks.push({
              entryIndex: index,
              kind: 'blockdev-file',
              file: filename,
              nodeName: getOpt(o, 'node-name'),
              formatEntryIndex: undefined,
              readOnly: isTruthy(getOpt(o, 'read-only')),
              deviceId: undefined,
            });
          }
        } else if (nested) {
          disks.push({
            entryIndex: index,
            kind: 'blockdev-file',
            file: nested,
            nodeName: getOpt(o, 'node-name'),
            formatEntryIndex: index,
            readOnly: isTruthy(getOpt(o, 'read-only')),
            deviceId: undefined,
          });
        } else if (fileRef) {
          formatNodeOfFile.set(fileRef, {
            index,
            name: getOpt(o, 'node-name'),
            readOnly: isTruthy(getOpt(o, 'read-only')),
          });
        }
        break;
      }
      case '-drive': {
        const o = parseQemuOpts(value);
        const file = getOpt(o, 'file');
        const media = getOpt(o, 'media');
        if (file && media !== 'cdrom') {
          disks.push({
            entryIndex: index,
            kind: 'drive',
            file,
            nodeName: getOpt(o, 'id') ?? getOpt(o, 'node-name'),
            formatEntryIndex: undefined,
            readOnly: isTruthy(getOpt(o, 'readonly')) || isTruthy(getOpt(o, 'read-only')),
            deviceId: undefined,
          });
        }
        break;
      }
      case '-hda':
      case '-hdb':
      case '-hdc':
      case '-hdd':
        // Legacy shorthands become -drive entries so the same rewriting applies.
        entries[index] = {
          option: '-drive',
          value: formatQemuOpts({
            pairs: [
              ['file', value],
              ['index', String('abcd'.indexOf(entry.option[3]!))],
              ['media', 'disk'],
            ],
          }),
        };
        disks.push({
          entryIndex: index,
          kind: 'drive',
          file: value,
          nodeName: undefined,
          formatEntryIndex: undefined,
          readOnly: false,
          deviceId: undefined,
        });
        break;
      case '-qmp': {
        const o = parseQemuOpts(value, 'path');
        if (o.implied?.startsWith('unix:')) qmpSocket = o.implied.slice(5);
        break;
      }
      case '-chardev': {
        const o = parseQemuOpts(value, 'backend');
        const id = getOpt(o, 'id');
        const path = getOpt(o, 'path');
        if (o.implied === 'socket' && id && path && isTruthy(getOpt(o, 'server') ?? 'off'))
          chardevSockets.set(id, path);
        break;
      }
      case '-mon': {
        const o = parseQemuOpts(value, 'chardev');
        const chardev = o.implied ?? getOpt(o, 'chardev');
        if (getOpt(o, 'mode') === 'control' && chardev && chardevSockets.has(chardev))
          qmpSocket ??= chardevSockets.get(chardev);
        break;
      }
      case '-m':
        ramBytes = parseRamSize(value);
        break;
      case '-machine':
      case '-M': {
        const o = parseQemuOpts(value, 'type');
        memoryBackendId = getOpt(o, 'memory-backend') ?? memoryBackendId;
        break;
      }
    }
  });

  // A -blockdev file node is the disk; the format node above it carries the device's drive name.
  for (const disk of disks) {
    if (disk.kind !== 'drive' && disk.formatEntryIndex === undefined && disk.nodeName) {
      const format = formatNodeOfFile.get(disk.nodeName);
      if (format) {
        disk.formatEntryIndex = format.index;
        disk.nodeName = format.name ?? disk.nodeName;
        disk.readOnly ||= format.readOnly;
      }
    }
    if (disk.nodeName) disk.deviceId = drivesOfDevices.get(disk.nodeName);
  }
  return { binary, entries, disks, qmpSocket, deviceTypes, memoryBackendId, ramBytes };
}

export interface DiskRewrite {
  /** The disk in the command line. */
  argvDisk: ArgvDisk;
  /** The qcow2 overlay (backed by the frozen layer) the restored VM opens instead. */
  overlayFile: string;
}

export interface RewriteOptions {
  disks: DiskRewrite[];
  /** Lazy mode: map the main RAM block privately from the snapshot file. */
  lazy?: { file: string; blockName: string; ramBytes: number };
  /** Add `-qmp unix:<path>` when the command line has no QMP socket. */
  qmpSocket?: string;
}

function rewriteBlockdev(value: string, change: (o: QemuOpts) => QemuOpts): string {
  return formatQemuOpts(change(parseQemuOpts(value)));
}

/** Apply a restore plan to a parsed command line; returns the argv without the binary. */
export function rewriteCommandLine(parsed: ParsedCommandLine, options: RewriteOptions): string[] {
  const entries = parsed.entries.map((e) => ({ ...e }));
  for (const { argvDisk, overlayFile } of options.disks) {
    const entry = entries[argvDisk.entryIndex]!;
    const overlay = resolve(overlayFile);
    if (argvDisk.kind === 'drive') {
      const o = parseQemuOpts(entry.value ?? '');
      entry.value = formatQemuOpts(setOpt(setOpt(o, 'file', overlay), 'format', 'qcow2'));
    } else if (argvDisk.kind === 'blockdev-json') {
      const json = JSON.parse(entry.value ?? '{}') as Record<string, unknown>;
      if (json['driver'] === 'file') json['filename'] = overlay;
      else {
        json['driver'] = 'qcow2';
        json['file'] = { ...(json['file'] as object), filename: overlay };
        delete json['backing'];
      }
      entry.value = JSON.stringify(json);
    } else {
      const fileEntry = entries[argvDisk.entryIndex]!;
      fileEntry.value = rewriteBlockdev(fileEntry.value ?? '', (o) =>
        getOpt(o, 'file.filename') !== undefined
          ? setOpt(o, 'file.filename', overlay)
          : setOpt(o, 'filename', overlay),
      );
    }
    if (argvDisk.formatEntryIndex !== undefined) {
      // The overlay is qcow2 whatever the frozen layer is; its header names the backing file.
      const formatEntry = entries[argvDisk.formatEntryIndex]!;
      const json = readJsonOption(formatEntry.value ?? '');
      if (json === undefined) {
        formatEntry.value = rewriteBlockdev(formatEntry.value ?? '', (o) => ({
          ...o,
          pairs: setOpt(o, 'driver', 'qcow2').pairs.filter(
            ([k]) => !['backing', 'offset', 'size'].includes(k),
          ),
        }));
      } else {
        json['driver'] = 'qcow2';
        for (const key of ['backing', 'offset', 'size']) delete json[key];
        formatEntry.value = JSON.stringify(json);
      }
    }
  }

  const out = entries.filter((e) => e.option !== '-incoming' && e.option !== '-daemonize');
  if (options.lazy) {
    const { file, blockName, ramBytes } = options.lazy;
    const backendId = parsed.memoryBackendId ?? blockName;
    // Replace the user's backend of that id (if any) by a private mapping of the snapshot file.
    const kept = out.filter((e) => {
      if (e.option !== '-object') return true;
      const o = parseQemuOpts(e.value ?? '', 'qom-type');
      return !(o.implied?.startsWith('memory-backend') && getOpt(o, 'id') === backendId);
    });
    out.length = 0;
    out.push(...kept);
    out.push({
      option: '-object',
      value: formatQemuOpts({
        implied: 'memory-backend-file',
        pairs: [
          ['id', backendId],
          ['size', String(ramBytes)],
          ['mem-path', resolve(file)],
          ['share', 'off'],
        ],
      }),
    });
    if (!parsed.memoryBackendId) {
      const machineIndex = out.findIndex((e) => e.option === '-machine' || e.option === '-M');
      if (machineIndex >= 0) {
        const m = out[machineIndex]!;
        m.value = formatQemuOpts(setOpt(parseQemuOpts(m.value ?? '', 'type'), 'memory-backend', backendId));
      } else {
        out.push({ option: '-machine', value: `memory-backend=${backendId}` });
      }
    }
  }
  if (!parsed.qmpSocket && options.qmpSocket) {
    out.push({ option: '-qmp', value: `unix:${options.qmpSocket.replaceAll(',', ',,')},server=on,wait=off` });
  }
  out.push({ option: '-incoming', value: 'defer' });
  return joinArgv(out);
}

/** Devices that discard guest RAM, which on QEMU < 8.2 punches holes in a privately mapped file. */
export const RAM_DISCARDING_DEVICES = /^virtio-(balloon|mem)/;

export function refuseUnsafeLazy(parsed: ParsedCommandLine, devicesInSnapshot: string[]): void {
  const discarding = [...parsed.deviceTypes, ...devicesInSnapshot].filter((t) =>
    RAM_DISCARDING_DEVICES.test(t),
  );
  if (discarding.length) {
    throw new RestoreError(
      'QSNAP_RESTORE_LAZY_UNSAFE',
      `lazy restore is unsafe with ${[...new Set(discarding)].join(', ')}: RAM discards would punch holes in the snapshot file`,
      { hint: 'restore without --lazy (full restore), or remove the balloon/virtio-mem device' },
    );
  }
}
