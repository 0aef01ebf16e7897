import { basename, join, resolve } from 'node:path';
import { type ArgvDisk, type ParsedCommandLine, readJsonOption } from './cmdline.js';
import {
  type ArgvEntry,
  formatQemuOpts,
  getOpt,
  joinArgv,
  parseQemuOpts,
  type QemuOpts,
  setOpt,
} from './qemu-opts.js';

/**
 * Rewriting the command line a VM was started with into one that restores a snapshot
 * (pure: a parsed command line in, argv out). What a restore changes:
 * - every snapshotted disk opens a fresh qcow2 overlay whose backing file is the snapshot's
 *   frozen layer, so a frozen layer is never opened writable and one snapshot can be
 *   restored any number of times (`-drive file=…` and `-blockdev driver=file,filename=…`);
 * - `-incoming defer` (qsnap feeds the state over QMP `migrate-incoming`);
 * - lazy mode: the main RAM block becomes a private mapping of the snapshot file;
 * - a QMP socket when the command line has none; `-daemonize` goes (qsnap detaches QEMU).
 */

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

/** Apply a restore plan to a parsed command line; returns the argv without the binary. */
export function rewriteCommandLine(parsed: ParsedCommandLine, options: RewriteOptions): string[] {
  const entries = parsed.entries.map((e) => ({ ...e }));
  for (const rewrite of options.disks) {
    pointDiskAt(entries[rewrite.argvDisk.entryIndex]!, rewrite.argvDisk, resolve(rewrite.overlayFile));
    if (rewrite.argvDisk.formatEntryIndex !== undefined)
      makeQcow2(entries[rewrite.argvDisk.formatEntryIndex]!);
  }
  let out = entries.filter((e) => e.option !== '-incoming' && e.option !== '-daemonize');
  if (options.lazy) out = mapRamFromFile(out, parsed.memoryBackendId, options.lazy);
  if (!parsed.qmpSocket && options.qmpSocket) {
    out.push({ option: '-qmp', value: `unix:${options.qmpSocket.replaceAll(',', ',,')},server=on,wait=off` });
  }
  out.push({ option: '-incoming', value: 'defer' });
  return joinArgv(out);
}

function rewriteOpts(value: string, change: (o: QemuOpts) => QemuOpts): string {
  return formatQemuOpts(change(parseQemuOpts(value)));
}

/** The disk's entry opens `overlay` instead of its image. */
function pointDiskAt(entry: ArgvEntry, disk: ArgvDisk, overlay: string): void {
  if (disk.kind === 'drive') {
    entry.value = rewriteOpts(entry.value ?? '', (o) =>
      setOpt(setOpt(o, 'file', overlay), 'format', 'qcow2'),
    );
  } else if (disk.kind === 'blockdev-json') {
    const json = JSON.parse(entry.value ?? '{}') as Record<string, unknown>;
    if (json['driver'] === 'file') json['filename'] = overlay;
    else {
      json['driver'] = 'qcow2';
      json['file'] = { ...(json['file'] as object), filename: overlay };
      delete json['backing'];
    }
    entry.value = JSON.stringify(json);
  } else {
    entry.value = rewriteOpts(entry.value ?? '', (o) =>
      getOpt(o, 'file.filename') !== undefined
        ? setOpt(o, 'file.filename', overlay)
        : setOpt(o, 'filename', overlay),
    );
  }
}

/** The overlay is qcow2 whatever the frozen layer is; its header names the backing file. */
function makeQcow2(formatEntry: ArgvEntry): void {
  const dropped = ['backing', 'offset', 'size'];
  const json = readJsonOption(formatEntry.value ?? '');
  if (json === undefined) {
    formatEntry.value = rewriteOpts(formatEntry.value ?? '', (o) => ({
      ...o,
      pairs: setOpt(o, 'driver', 'qcow2').pairs.filter(([k]) => !dropped.includes(k)),
    }));
  } else {
    json['driver'] = 'qcow2';
    for (const key of dropped) delete json[key];
    formatEntry.value = JSON.stringify(json);
  }
}

/** Replace the user's backend of that id (if any) by a private mapping of the snapshot file. */
function mapRamFromFile(
  entries: ArgvEntry[],
  memoryBackendId: string | undefined,
  lazy: NonNullable<RewriteOptions['lazy']>,
): ArgvEntry[] {
  const backendId = memoryBackendId ?? lazy.blockName;
  const out = entries.filter((e) => {
    if (e.option !== '-object') return true;
    const o = parseQemuOpts(e.value ?? '', 'qom-type');
    return !(o.implied?.startsWith('memory-backend') && getOpt(o, 'id') === backendId);
  });
  out.push({
    option: '-object',
    value: formatQemuOpts({
      implied: 'memory-backend-file',
      pairs: [
        ['id', backendId],
        ['size', String(lazy.ramBytes)],
        ['mem-path', resolve(lazy.file)],
        ['share', 'off'],
      ],
    }),
  });
  if (memoryBackendId) return out;
  const machine = out.find((e) => e.option === '-machine' || e.option === '-M');
  if (machine)
    machine.value = formatQemuOpts(
      setOpt(parseQemuOpts(machine.value ?? '', 'type'), 'memory-backend', backendId),
    );
  else out.push({ option: '-machine', value: `memory-backend=${backendId}` });
  return out;
}

/**
 * The same command line with every unix socket it listens on and its pidfile moved into `dir`:
 * for a second instance of a VM whose first still runs (a restore beside the original, a
 * clone), whose sockets it would otherwise take over (QEMU unlinks a socket path before it
 * binds it). Client sockets (server=off) are left alone: they name someone else's socket.
 */
export function relocateSockets(
  parsed: ParsedCommandLine,
  dir: string,
): { parsed: ParsedCommandLine; moved: Map<string, string> } {
  const moved = new Map<string, string>();
  const place = (path: string) => {
    if (!moved.has(path)) moved.set(path, uniqueIn(dir, path, moved));
    return moved.get(path)!;
  };
  const entries = parsed.entries.map((e) => ({
    ...e,
    ...(e.value === undefined ? {} : { value: relocateEntry(e, place) }),
  }));
  const qmpSocket =
    parsed.qmpSocket === undefined ? undefined : (moved.get(parsed.qmpSocket) ?? parsed.qmpSocket);
  return { parsed: { ...parsed, entries, qmpSocket }, moved };
}

/** `-qmp unix:P`, `-monitor unix:P`, `-serial unix:P` (and the key=value forms with server), `-chardev socket,path=P,server=on`, `-pidfile P`. */
function relocateEntry(entry: ArgvEntry, place: (path: string) => string): string | undefined {
  const value = entry.value!;
  if (entry.option === '-pidfile') return place(value);
  if (['-qmp', '-qmp-pretty', '-monitor', '-serial'].includes(entry.option)) {
    const o = parseQemuOpts(value, 'path');
    if (!o.implied?.startsWith('unix:') || !isServer(o, true)) return value;
    return formatQemuOpts({ ...o, implied: `unix:${place(o.implied.slice(5))}` });
  }
  if (entry.option === '-chardev') {
    const o = parseQemuOpts(value, 'backend');
    const path = getOpt(o, 'path');
    if (o.implied !== 'socket' || !path || !isServer(o, false)) return value;
    return formatQemuOpts(setOpt(o, 'path', place(path)));
  }
  return value;
}

/** `-qmp unix:P` listens unless server=off; `-chardev socket` connects unless server=on. */
function isServer(o: QemuOpts, byDefault: boolean): boolean {
  const server = getOpt(o, 'server');
  return server === undefined ? byDefault : server === 'on' || server === 'true' || server === 'yes';
}

function uniqueIn(dir: string, path: string, taken: Map<string, string>): string {
  const used = new Set(taken.values());
  const name = basename(path);
  let candidate = join(dir, name);
  for (let n = 2; used.has(candidate); n++) candidate = join(dir, `${n}-${name}`);
  return candidate;
}
