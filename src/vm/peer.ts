import { readdir, readFile, readlink, realpath } from 'node:fs/promises';
import { isIPv6 } from 'node:net';
import { endianness } from 'node:os';
import { basename, resolve } from 'node:path';
import { describeTarget, parseTarget, type QmpTarget } from '../qmp/index.js';
import { CONTROL_CHARDEV_ID } from './launcher.js';
import { isRunning, processIdentity } from './process.js';
import { type ArgvEntry, getOpt, parseQemuOpts, splitArgv } from './qemu-opts.js';

/**
 * The local QEMU on the other end of a QMP endpoint, found without guessing: the kernel's
 * socket table names the one listening socket bound to the endpoint (/proc/net/unix,
 * /proc/net/tcp and tcp6), the process table names the one process holding it
 * (/proc/<pid>/fd links `socket:[<inode>]`), and that process's /proc/<pid>/cmdline is its
 * command line. Anything short of exactly one listener and exactly one holder is a reason,
 * never a pick. Nothing here connects to the endpoint: QEMU serves one client per QMP socket.
 *
 * The parsers (text in, rows out) come first and do no I/O; the /proc reads follow them.
 * The socket tables are those of this process's network namespace.
 */

// ─── /proc/net/unix ─────────────────────────────────────────────────────────────────────

/** __SO_ACCEPTCON (include/uapi/linux/net.h): printed in Flags for a socket in listen(2). */
const SO_ACCEPTCON = 0x00010000;
/** SS_UNCONNECTED (include/uapi/linux/net.h): the St of a listener (an accepted socket is 03). */
const SS_UNCONNECTED = 0x01;

export interface UnixSocketRow {
  inode: number;
  flags: number;
  /** SOCK_STREAM 1, SOCK_DGRAM 2, SOCK_SEQPACKET 5. */
  type: number;
  state: number;
  /**
   * The bound name as the kernel prints it: a path as it was given to bind(2) (relative ones
   * stay relative), `@name` for an abstract name (its NULs printed as `@` too), undefined when
   * unbound. A server-side socket accepted from a listener prints the listener's name.
   */
  path: string | undefined;
  /** In listen(2): __SO_ACCEPTCON set and SS_UNCONNECTED. */
  listening: boolean;
}

/**
 * net/unix/af_unix.c unix_seq_show: `%pK: %08X %08X %08X %04X %02X %5lu` (address, refcount,
 * protocol, flags, type, state, inode space-padded to five digits), then for a bound socket
 * one space and the name's bytes verbatim, spaces and newlines included.
 */
const UNIX_ROW =
  /^[0-9a-f]+: [0-9A-F]{8} [0-9A-F]{8} ([0-9A-F]{8}) ([0-9A-F]{4}) ([0-9A-F]{2}) +(\d+)(?: ([^\n]*))?$/;

function unixRow(m: RegExpExecArray): UnixSocketRow {
  const flags = Number.parseInt(m[1]!, 16);
  const state = Number.parseInt(m[3]!, 16);
  return {
    inode: Number(m[4]),
    flags,
    type: Number.parseInt(m[2]!, 16),
    state,
    path: m[5],
    listening: (flags & SO_ACCEPTCON) !== 0 && state === SS_UNCONNECTED,
  };
}

/** The rows of /proc/net/unix. A line that is no row continues the path of the row above (a path with a newline). */
export function parseProcNetUnix(text: string): UnixSocketRow[] {
  const lines = text.split('\n');
  if (lines.at(-1) === '') lines.pop();
  const rows: UnixSocketRow[] = [];
  lines.forEach((line, index) => {
    const m = UNIX_ROW.exec(line);
    const last = rows.at(-1);
    if (m) rows.push(unixRow(m));
    else if (index > 0 && last?.path !== undefined) last.path += `\n${line}`;
  });
  return rows;
}

/** The listening rows bound to any of `names` (as the kernel prints them), accepted sockets left out. */
export function unixListeners(rows: readonly UnixSocketRow[], names: readonly string[]): UnixSocketRow[] {
  return rows.filter((row) => row.listening && row.path !== undefined && names.includes(row.path));
}

/** How /proc/net/unix prints an abstract name given as Node writes it (a leading NUL). */
export function abstractName(path: string): string {
  return `@${path.slice(1).replaceAll('\0', '@')}`;
}

// ─── /proc/net/tcp, /proc/net/tcp6 ──────────────────────────────────────────────────────

/** TCP_LISTEN (include/net/tcp_states.h). */
const TCP_LISTEN = 0x0a;

export interface TcpSocketRow {
  family: 4 | 6;
  /** The local address in canonical text (`127.0.0.1`, `::1`, `::ffff:7f00:1`). */
  address: string;
  port: number;
  state: number;
  /** 0 for a socket no file refers to (TIME_WAIT). */
  inode: number;
  listening: boolean;
}

/**
 * net/ipv4/tcp_ipv4.c get_tcp4_sock and net/ipv6/tcp_ipv6.c get_tcp6_sock: `%4d: %08X:%04X
 * %08X:%04X %02X …`, local and remote address, state, queues, timer, retransmits, uid,
 * timeout, inode. Each 32-bit word of an address is printed as a host-order integer (so a
 * little-endian host prints 127.0.0.1 as 0100007F); the port is already in host order.
 * TIME_WAIT rows end after fewer fields.
 */
const TCP_ROW =
  /^ *\d+: ([0-9A-F]{8}|[0-9A-F]{32}):([0-9A-F]{4}) [0-9A-F]+:[0-9A-F]{4} ([0-9A-F]{2}) \S+ \S+ \S+ +\d+ +\d+ +(\d+)/;

/** The canonical text of an IPv6 address (WHATWG URL's serializer: lowercase, `::` compression). */
export function canonicalIpv6(address: string): string {
  return new URL(`http://[${address}]/`).hostname.slice(1, -1);
}

/** An address as /proc/net/tcp* prints it, as text. */
export function decodeProcAddress(hex: string, byteOrder: 'LE' | 'BE' = endianness()): string {
  const bytes: number[] = [];
  for (let i = 0; i < hex.length; i += 8) {
    const word = (hex.slice(i, i + 8).match(/../g) ?? []).map((b) => Number.parseInt(b, 16));
    bytes.push(...(byteOrder === 'LE' ? word.reverse() : word));
  }
  if (bytes.length === 4) return bytes.join('.');
  const groups = [];
  for (let i = 0; i < 16; i += 2) groups.push(((bytes[i]! << 8) | bytes[i + 1]!).toString(16));
  return canonicalIpv6(groups.join(':'));
}

/** The rows of /proc/net/tcp or /proc/net/tcp6 (the header and anything else skipped). */
export function parseProcNetTcp(text: string, byteOrder: 'LE' | 'BE' = endianness()): TcpSocketRow[] {
  const rows: TcpSocketRow[] = [];
  for (const line of text.split('\n')) {
    const m = TCP_ROW.exec(line);
    if (!m) continue;
    const state = Number.parseInt(m[3]!, 16);
    rows.push({
      family: m[1]!.length === 8 ? 4 : 6,
      address: decodeProcAddress(m[1]!, byteOrder),
      port: Number.parseInt(m[2]!, 16),
      state,
      inode: Number(m[4]),
      listening: state === TCP_LISTEN,
    });
  }
  return rows;
}

/** Bound addresses that accept a connection to 127.0.0.1 (0.0.0.0 connects there too), v4-mapped and dual-stack included. */
const IPV4_LOOPBACK = [
  '127.0.0.1',
  '0.0.0.0',
  '::',
  canonicalIpv6('::ffff:127.0.0.1'),
  canonicalIpv6('::ffff:0.0.0.0'),
];
const IPV6_LOOPBACK = ['::1', '::'];

/**
 * The bound addresses whose listener could answer a client connecting to `host`, or
 * undefined when `host` is not one of the local names qsnap trusts (127.0.0.1, ::1,
 * localhost, 0.0.0.0). `localhost` may reach either loopback, so both count.
 */
export function localListenAddresses(host: string): string[] | undefined {
  const name = isIPv6(host) ? canonicalIpv6(host) : host.toLowerCase();
  if (name === '127.0.0.1' || name === '0.0.0.0') return IPV4_LOOPBACK;
  if (name === '::1') return IPV6_LOOPBACK;
  if (name === 'localhost') return [...IPV4_LOOPBACK, ...IPV6_LOOPBACK.filter((a) => a !== '::')];
  return undefined;
}

/** The listening rows on `port` bound to any of `addresses`. */
export function tcpListeners(
  rows: readonly TcpSocketRow[],
  addresses: readonly string[],
  port: number,
): TcpSocketRow[] {
  return rows.filter((row) => row.listening && row.port === port && addresses.includes(row.address));
}

// ─── /proc/<pid>/cmdline and the command line ───────────────────────────────────────────

/** /proc/<pid>/cmdline: NUL-terminated arguments (empty ones kept; the terminator's empty tail dropped). */
export function parseProcCmdline(text: string): string[] {
  const argv = text.split('\0');
  if (argv.at(-1) === '') argv.pop();
  return argv;
}

/** The `-chardev` and `-mon` entries launcher.ts adds for qsnap's private control monitor. */
function isControlMonitor(entry: ArgvEntry): boolean {
  if (entry.option === '-chardev')
    return getOpt(parseQemuOpts(entry.value ?? '', 'backend'), 'id') === CONTROL_CHARDEV_ID;
  if (entry.option !== '-mon') return false;
  const o = parseQemuOpts(entry.value ?? '', 'chardev');
  return (o.implied ?? getOpt(o, 'chardev')) === CONTROL_CHARDEV_ID;
}

/**
 * A running QEMU's argv as a user would rerun it: the binary first and everything verbatim,
 * except qsnap's own control monitor (`-chardev socket,id=qsnap-control,…` and
 * `-mon chardev=qsnap-control,…`), which belongs to the qsnap that started it.
 */
export function qemuCommandLine(argv: readonly string[]): string[] {
  const first = argv[0];
  const start = first !== undefined && !first.startsWith('-') ? 1 : 0;
  const kept = argv.slice(0, start);
  let index = start;
  for (const entry of splitArgv(argv.slice(start))) {
    const width = entry.value === undefined ? 1 : 2;
    if (!isControlMonitor(entry)) kept.push(...argv.slice(index, index + width));
    index += width;
  }
  return kept;
}

// ─── The /proc reads ────────────────────────────────────────────────────────────────────

export type PeerResult =
  | { found: true; pid: number; startTime: string; argv: string[]; exe: string }
  | {
      found: false;
      reason: 'not-local' | 'no-listener' | 'no-process' | 'ambiguous' | 'not-readable';
      detail: string;
    };

type NotFound = Extract<PeerResult, { found: false }>;

function notFound(reason: NotFound['reason'], detail: string): NotFound {
  return { found: false, reason, detail };
}

function errnoOf(err: unknown): string | undefined {
  return (err as NodeJS.ErrnoException).code;
}

const isDenied = (err: unknown) => errnoOf(err) === 'EACCES' || errnoOf(err) === 'EPERM';

/** Exactly one listener, or why not. */
function oneListener(
  rows: readonly { inode: number }[],
  where: string,
  hint = '',
): { inode: number } | NotFound {
  if (rows.length === 1) return rows[0]!;
  if (rows.length === 0) return notFound('no-listener', `no listening socket is bound to ${where}${hint}`);
  const inodes = rows.map((r) => r.inode).join(', ');
  return notFound('ambiguous', `${rows.length} listening sockets are bound to ${where} (inodes ${inodes})`);
}

async function realpathOrUndefined(path: string): Promise<string | undefined> {
  return realpath(path).catch(() => undefined);
}

/**
 * The names a listener on `path` may be printed under: the path made absolute, its realpath,
 * and every listening path whose own realpath is that file (bound through a symlink).
 */
async function unixNames(path: string, rows: readonly UnixSocketRow[]): Promise<string[] | NotFound> {
  if (path.startsWith('\0')) return [abstractName(path)];
  const absolute = resolve(path);
  let real: string;
  try {
    real = await realpath(absolute);
  } catch (err) {
    if (isDenied(err)) return notFound('not-readable', `cannot resolve ${absolute}: ${errnoOf(err)}`);
    return notFound('no-listener', `no socket at ${absolute} (${errnoOf(err) ?? String(err)})`);
  }
  const names = new Set([absolute, real]);
  for (const row of rows) {
    if (!row.listening || !row.path?.startsWith('/') || names.has(row.path)) continue;
    if ((await realpathOrUndefined(row.path)) === real) names.add(row.path);
  }
  return [...names];
}

/**
 * QEMU binds a unix path as given, so `-qmp unix:qmp.sock` prints as `qmp.sock`, relative to a
 * directory the table does not name: such a listener is never matched, only pointed out.
 */
function relativeHint(rows: readonly UnixSocketRow[], path: string): string {
  const relative = rows.filter((r) => r.listening && r.path !== undefined && !/^[/@]/.test(r.path));
  const same = relative.filter((r) => basename(r.path!) === basename(path));
  if (same.length === 0) return '';
  const who = same.length === 1 ? `socket ${same[0]!.inode} is` : `${same.length} sockets are`;
  return ` (${who} bound to the relative path ${same[0]!.path}, which cannot be placed: give QEMU an absolute path)`;
}

async function unixListener(path: string): Promise<{ inode: number } | NotFound> {
  const rows = parseProcNetUnix(await readFile('/proc/net/unix', 'utf8'));
  const names = await unixNames(path, rows);
  if (!Array.isArray(names)) return names;
  if (path.startsWith('\0')) return oneListener(unixListeners(rows, names), names[0]!);
  return oneListener(unixListeners(rows, names), resolve(path), relativeHint(rows, path));
}

/** /proc/net/tcp6 is absent when IPv6 is disabled. */
async function readTcpTable(file: string): Promise<TcpSocketRow[]> {
  try {
    return parseProcNetTcp(await readFile(file, 'utf8'));
  } catch (err) {
    if (errnoOf(err) === 'ENOENT') return [];
    throw err;
  }
}

async function tcpListener(
  target: { host: string; port: number },
  where: string,
): Promise<{ inode: number } | NotFound> {
  const addresses = localListenAddresses(target.host);
  if (!addresses) {
    return notFound(
      'not-local',
      `${target.host} is not a loopback name (127.0.0.1, ::1, localhost, 0.0.0.0)`,
    );
  }
  const rows = [...(await readTcpTable('/proc/net/tcp')), ...(await readTcpTable('/proc/net/tcp6'))];
  return oneListener(tcpListeners(rows, addresses, target.port), where);
}

/** Whether `pid` has an fd linking to `link`; 'unreadable' when its fd table may not be read. */
async function holdsLink(pid: number, link: string): Promise<boolean | 'unreadable'> {
  let fds: string[];
  try {
    fds = await readdir(`/proc/${pid}/fd`);
  } catch (err) {
    return isDenied(err) ? 'unreadable' : false; // ENOENT: it exited
  }
  const targets = await Promise.all(fds.map((fd) => readlink(`/proc/${pid}/fd/${fd}`).catch(() => '')));
  return targets.includes(link);
}

export interface SocketOwners {
  /** Processes with an fd on the socket. */
  pids: number[];
  /** Processes whose fd table this process may not read (another user's, without root). */
  unreadable: number;
}

/** The processes holding socket `inode`: every /proc/<pid>/fd linking to `socket:[<inode>]`. */
export async function socketOwners(inode: number): Promise<SocketOwners> {
  const link = `socket:[${inode}]`;
  const owners: SocketOwners = { pids: [], unreadable: 0 };
  const pids = (await readdir('/proc')).filter((e) => /^\d+$/.test(e)).map(Number);
  // All at once: one process after the other took 15-45 ms for 70 processes here.
  const held = await Promise.all(pids.map((pid) => holdsLink(pid, link)));
  for (const [i, pid] of pids.entries()) {
    if (held[i] === 'unreadable') owners.unreadable++;
    else if (held[i]) owners.pids.push(pid);
  }
  return owners;
}

/** Exactly one owner, or why not. */
function oneOwner(owners: SocketOwners, inode: number): number | NotFound {
  const [pid, ...others] = owners.pids;
  if (pid !== undefined && others.length === 0) return pid;
  if (pid !== undefined) {
    return notFound(
      'ambiguous',
      `processes ${owners.pids.join(', ')} all hold the listening socket ${inode}`,
    );
  }
  if (owners.unreadable > 0) {
    return notFound(
      'not-readable',
      `the listening socket ${inode} is held by none of the processes this user may inspect (${owners.unreadable} may not be read)`,
    );
  }
  return notFound('no-process', `no process holds the listening socket ${inode}`);
}

/**
 * What `pid` runs, read only while it provably is the holder: its identity first, then that
 * it still holds the socket (a reused pid would not), and after cmdline and exe that the same
 * process still runs.
 */
async function readPeer(pid: number, inode: number): Promise<PeerResult> {
  const gone = notFound(
    'no-process',
    `pid ${pid}, which held the listening socket ${inode}, exited meanwhile`,
  );
  const identity = processIdentity(pid);
  if (!identity) return gone;
  const held = await holdsLink(pid, `socket:[${inode}]`);
  if (held !== true)
    return held === 'unreadable' ? notFound('not-readable', `cannot read /proc/${pid}/fd`) : gone;
  let cmdline: string;
  let exe: string;
  try {
    [cmdline, exe] = await Promise.all([
      readFile(`/proc/${pid}/cmdline`, 'utf8'),
      readlink(`/proc/${pid}/exe`),
    ]);
  } catch (err) {
    if (!isRunning(identity)) return gone;
    return notFound('not-readable', `cannot read /proc/${pid}: ${errnoOf(err) ?? String(err)}`);
  }
  if (!isRunning(identity)) return gone;
  return { found: true, pid, startTime: identity.startTime, argv: parseProcCmdline(cmdline), exe };
}

/**
 * The local process serving a QMP endpoint (a unix socket path, `unix:PATH`, `HOST:PORT`,
 * `tcp:HOST:PORT`; a unix path starting with NUL is an abstract name), and its command line.
 * `exe` is the readlink of /proc/<pid>/exe (` (deleted)` appended when the binary was replaced).
 */
export async function findQmpPeer(endpoint: string | QmpTarget): Promise<PeerResult> {
  const target = typeof endpoint === 'string' ? parseTarget(endpoint) : endpoint;
  let listener: { inode: number } | NotFound;
  try {
    listener =
      target.kind === 'unix'
        ? await unixListener(target.path)
        : await tcpListener(target, describeTarget(target));
  } catch (err) {
    return notFound('not-readable', `cannot read the socket table: ${(err as Error).message}`);
  }
  if ('found' in listener) return listener;
  const owner = oneOwner(await socketOwners(listener.inode), listener.inode);
  return typeof owner === 'number' ? readPeer(owner, listener.inode) : owner;
}

/** Which of these unix socket paths some process listens on right now (as bound: absolute paths match). */
export async function listeningSockets(paths: readonly string[]): Promise<string[]> {
  if (paths.length === 0) return [];
  const rows = parseProcNetUnix(await readFile('/proc/net/unix', 'utf8').catch(() => ''));
  const listening = new Set(unixListeners(rows, paths).map((row) => row.path));
  return paths.filter((p) => listening.has(p));
}
