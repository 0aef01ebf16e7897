/**
 * Whether a unix-socket QMP monitor is held by another client (libvirt keeps its monitor
 * connection for the VM's whole life). QEMU serves one client per monitor: while one is
 * connected its listener accepts no other (chardev/char-socket.c, tcp_chr_new_client turns the
 * listener's client callback off until the client goes), so a second client's connect(2)
 * succeeds into the backlog and then waits for a greeting that never comes.
 *
 * Linux lists every unix socket in /proc/net/unix with the path it is bound to; an accepted
 * connection carries its listener's path in state 03 (connected), a connection still in the
 * backlog in state 02 (connecting). So a monitor is held when its path shows both: a client
 * served and one (ours) left waiting. A peer that accepted us and stays silent is not "held":
 * it shows our connection in state 03 and none waiting.
 */
import { readFile } from 'node:fs/promises';
import { resolve } from 'node:path';

/** __SO_ACCEPTCON: the socket listens. */
const ACCEPTING = 0x10000;
const SS_CONNECTING = '02';
const SS_CONNECTED = '03';

interface UnixSocketEntry {
  flags: number;
  state: string;
  path: string;
}

/** "Num RefCount Protocol Flags Type St Inode Path" per line (net/unix/af_unix.c, unix_seq_show). */
export function parseProcNetUnix(text: string): UnixSocketEntry[] {
  const entries: UnixSocketEntry[] = [];
  for (const line of text.split('\n').slice(1)) {
    const fields = line.trim().split(/\s+/);
    if (fields.length < 8) continue;
    entries.push({
      flags: Number.parseInt(fields[3]!, 16),
      state: fields[5]!,
      path: fields.slice(7).join(' '),
    });
  }
  return entries;
}

/**
 * True when the monitor at `path` serves a client while another connection waits in its
 * backlog; false when it listens otherwise; undefined when it cannot be told (no listener
 * under this path, e.g. QEMU bound a relative path, or /proc unreadable).
 */
export function monitorHeld(entries: readonly UnixSocketEntry[], path: string): boolean | undefined {
  const names = new Set([path, resolve(path)]);
  const listener = entries.find((e) => names.has(e.path) && (e.flags & ACCEPTING) !== 0);
  if (!listener) return undefined;
  const under = entries.filter((e) => e.path === listener.path && (e.flags & ACCEPTING) === 0);
  return under.some((e) => e.state === SS_CONNECTED) && under.some((e) => e.state === SS_CONNECTING);
}

export async function isMonitorHeld(path: string): Promise<boolean | undefined> {
  try {
    return monitorHeld(parseProcNetUnix(await readFile('/proc/net/unix', 'utf8')), path);
  } catch {
    return undefined;
  }
}
