import { readFile, stat } from 'node:fs/promises';
import { Socket, type SocketConstructorOpts } from 'node:net';
import { QsnapError } from '../../errors.js';
import type { SnapshotReader } from '../../format/index.js';
import type { QmpClient } from '../../qmp/index.js';
import type { ParsedCommandLine } from '../../vm/cmdline.js';
import type { Vm } from '../../vm/launcher.js';
import { parseQemuOpts } from '../../vm/qemu-opts.js';
import { RestoreError } from '../errors.js';
import { MIGRATION_ENDED, type MigrationInfo } from '../migration.js';
import { readMachineType, readRamBytes, versionAtLeast } from '../probe.js';

/**
 * The destination side of a restore: checking that the new QEMU can take the snapshot,
 * connecting to its incoming socket, waiting for it to finish loading, and naming its reason
 * when it refuses.
 */

/** Refuse before any state is sent: an older QEMU, another machine type, another RAM size. */
export async function checkCompatible(qmp: QmpClient, reader: SnapshotReader): Promise<void> {
  const m = reader.manifest;
  const [version, machine, ramBytes] = await Promise.all([
    qmp.execute('query-version'),
    readMachineType(qmp),
    readRamBytes(qmp),
  ]);
  const dest = version.qemu;
  if (!versionAtLeast(dest, m.qemu.version.major, m.qemu.version.minor)) {
    throw new RestoreError(
      'QSNAP_RESTORE_QEMU_VERSION',
      `the snapshot comes from QEMU ${m.qemu.version.major}.${m.qemu.version.minor}, this QEMU is older (${dest.major}.${dest.minor})`,
      { hint: 'restore with the same or a newer QEMU' },
    );
  }
  if (machine !== m.qemu.machine) {
    throw new RestoreError(
      'QSNAP_RESTORE_MACHINE',
      `the command line gives machine type ${machine}, the snapshot has ${m.qemu.machine}`,
      { hint: `start with -machine ${m.qemu.machine} (the command line the VM was started with)` },
    );
  }
  if (ramBytes !== m.vm.ramBytes) throw ramSizeError(ramBytes, m.vm.ramBytes);
}

/** Memory backends whose memory is zero when QEMU starts (anonymous memory, a new memfd). */
const ZEROED_BACKENDS = new Set(['child<memory-backend-ram>', 'child<memory-backend-memfd>']);

/**
 * Whether the new QEMU's guest RAM is all zeros before the load, so zero pages need not be sent:
 * every memory backend is fresh anonymous memory or a new memfd (a file backend — also what
 * `-mem-path` creates — holds the file's bytes), and no ROM is loaded into RAM (`info roms`
 * marks those `mem=ram`; QEMU copies them in at its start-up reset). The guest has not run.
 */
export async function guestRamZeroed(qmp: QmpClient): Promise<boolean> {
  const [objects, roms] = await Promise.all([
    qmp.execute('qom-list', { path: '/objects' }),
    qmp.execute('human-monitor-command', { 'command-line': 'info roms' }),
  ]);
  const backends = objects.filter((o) => o.type.startsWith('child<memory-backend'));
  return backends.every((o) => ZEROED_BACKENDS.has(o.type)) && !/\bmem=ram\b/.test(String(roms));
}

/**
 * What the command line says of guestRamZeroed, before QEMU runs: false with a file backend
 * (`-object memory-backend-file`, `-mem-path`). A guess to start building the stream on; only
 * QEMU's answer decides.
 */
export function commandLineRamZeroed(parsed: ParsedCommandLine): boolean {
  return !parsed.entries.some(
    (e) =>
      e.option === '-mem-path' ||
      (e.option === '-object' &&
        parseQemuOpts(e.value ?? '', 'qom-type').implied?.startsWith('memory-backend-file') === true),
  );
}

export function ramSizeError(given: number, snapshot: number): RestoreError {
  return new RestoreError(
    'QSNAP_RESTORE_RAM_SIZE',
    `the command line gives ${given} bytes of RAM, the snapshot has ${snapshot}`,
    { hint: `use -m ${snapshot / 2 ** 20}M as when the snapshot was taken` },
  );
}

/** Connect to QEMU's incoming socket, retrying until it listens. */
export async function connectWhenListening(path: string, timeoutMs: number): Promise<Socket> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    try {
      return await new Promise<Socket>((resolve, reject) => {
        // A deep write queue lets the next sections be built while QEMU loads the previous ones;
        // with the default 16 KiB, building and loading take turns instead of overlapping.
        const socket = new Socket({ writableHighWaterMark: 16 * 2 ** 20 } as SocketConstructorOpts);
        socket.connect(path);
        socket.once('connect', () => resolve(socket));
        socket.once('error', reject);
      });
    } catch (err) {
      if (Date.now() > deadline) throw err;
      await new Promise((r) => setTimeout(r, 5));
    }
  }
}

/**
 * Wait until QEMU's incoming migration completed; its failure as QSNAP_RESTORE_LOAD. Told by
 * QEMU's MIGRATION event (the `events` capability must be on): a 7.2 destination loads in its
 * main loop, where every query-migrate of a tight poll interrupts the load. A slow poll covers
 * an event that never comes.
 */
export async function waitIncoming(qmp: QmpClient, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  let ended = false;
  let wake = (): void => {};
  let timer: NodeJS.Timeout | undefined;
  const off = qmp.on('MIGRATION', (e) => {
    if (!MIGRATION_ENDED.has(e.data.status)) return;
    ended = true;
    wake();
  });
  let info: MigrationInfo;
  let timedOut = false;
  try {
    for (;;) {
      info = await qmp.execute('query-migrate');
      if (MIGRATION_ENDED.has(info.status ?? 'none')) break;
      if (Date.now() > deadline) {
        timedOut = true;
        break;
      }
      // The event may have come with the reply, before this wait.
      if (!ended)
        await new Promise<void>((resolve) => {
          wake = resolve;
          timer = setTimeout(resolve, Math.min(100, Math.max(1, deadline - Date.now())));
        });
      clearTimeout(timer);
    }
  } finally {
    off();
    clearTimeout(timer);
  }
  if (timedOut) {
    throw new RestoreError('QSNAP_RESTORE_LOAD', `QEMU did not finish loading within ${timeoutMs} ms`, {
      hint: 'see the QEMU log',
    });
  }
  if (info.status !== 'completed') {
    throw new RestoreError(
      'QSNAP_RESTORE_LOAD',
      `QEMU refused the snapshot's state${info['error-desc'] ? `: ${info['error-desc']}` : ''}`,
      {
        hint: 'check that the command line matches the snapshotted VM (devices, machine, memory); see the QEMU log',
      },
    );
  }
}

/**
 * QEMU exits when an incoming migration fails (7.2: migration.c process_incoming_migration_co),
 * so the usual sign of a refused state is the monitor going away: say so with QEMU's own words.
 */
export async function loadFailure(vm: Vm, err: unknown): Promise<unknown> {
  if (!(err instanceof QsnapError) || err.code !== 'QSNAP_QMP_DISCONNECTED') return err;
  await Promise.race([vm.exited, new Promise((r) => setTimeout(r, 2000))]);
  const said = vm.logTail(3).replaceAll('\n', ' | ');
  return new RestoreError(
    'QSNAP_RESTORE_LOAD',
    `QEMU refused the snapshot's state and exited${said ? `: ${said}` : ''}`,
    {
      hint: 'check that the command line matches the snapshotted VM (devices, machine, memory); see the QEMU log',
      cause: err,
      details: { log: vm.logPath },
    },
  );
}

/**
 * Whether QEMU process `pid` can open `file` for reading itself: the path leads to the same file
 * from QEMU's root (a QEMU in a chroot or another mount namespace may not see it), and its mode
 * lets QEMU's user read it (the directories on the way are not checked: a QEMU that cannot
 * traverse them fails the restore with QSNAP_RESTORE_LOAD). A failed `migrate-incoming` leaves QEMU's incoming state in `setup` (QEMU 10:
 * a second one is refused), so this is asked before, not found out by trying.
 */
export async function qemuCanRead(pid: number, file: string): Promise<boolean> {
  try {
    const [ours, theirs, status] = await Promise.all([
      stat(file),
      stat(`/proc/${pid}/root${file}`),
      readFile(`/proc/${pid}/status`, 'utf8'),
    ]);
    if (ours.dev !== theirs.dev || ours.ino !== theirs.ino) return false;
    const ids = (field: string) =>
      (status.match(new RegExp(`^${field}:\\s*(.*)$`, 'm'))?.[1] ?? '').trim().split(/\s+/).map(Number);
    const uid = ids('Uid')[1]; // effective
    const gids = [ids('Gid')[1], ...ids('Groups')];
    if (uid === 0) return true;
    if (uid === ours.uid) return (ours.mode & 0o400) !== 0;
    if (gids.includes(ours.gid)) return (ours.mode & 0o040) !== 0;
    return (ours.mode & 0o004) !== 0;
  } catch {
    return false;
  }
}
