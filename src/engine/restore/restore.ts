import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { once } from 'node:events';
import { mkdir, mkdtemp, readdir, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { Socket, type SocketConstructorOpts } from 'node:net';
import { tmpdir } from 'node:os';
import { basename, dirname, extname, join, resolve } from 'node:path';
import { promisify } from 'node:util';
import { QsnapError } from '../../errors.js';
import { openSnapshot, type SnapshotReader } from '../../format/index.js';
import type { QmpClient } from '../../qmp/index.js';
import { type RamPageRun, tryDecodePrologue, writeMigrationStream } from '../../stream/index.js';
import { type ArgvDisk, parseCommandLine, refuseUnsafeLazy, rewriteCommandLine } from '../../vm/cmdline.js';
import { Vm } from '../../vm/launcher.js';
import { createOverlay } from '../../vm/qemu-img.js';
import { RestoreError } from '../errors.js';
import { MIGRATION_ENDED, pollMigration } from '../migration.js';
import { Operation, type OperationContext } from '../operation.js';
import { versionAtLeast } from '../probe.js';

const run = promisify(execFile);

export type RestoreMode = 'full' | 'lazy';

export interface RestoreOptions {
  /** The snapshot file. */
  file: string;
  /** The QEMU command line the VM was started with (binary first, or options only). */
  argv: string[];
  /** Map the main RAM block straight from the snapshot file instead of loading it. */
  lazy?: boolean;
  /** Leave the guest paused after loading. */
  paused?: boolean;
  /** QMP socket to add when the command line has none (default `<runDir>/qmp.sock`). */
  qmp?: string;
  /** Where the restore overlays go (default: beside each frozen layer). */
  overlayDir?: string;
  /** Directory for QEMU's log and qsnap's control socket (default: a new temp directory, kept while QEMU runs). */
  runDir?: string;
  /**
   * 'auto' (default): check everything the restore reads — every page it sends; in lazy mode
   * the mapped RAM block is not read, so not checked. 'full': verify the whole file first.
   */
  verify?: 'auto' | 'full';
  /** Keep QEMU attached to this process (tests); default: it outlives qsnap. */
  attached?: boolean;
}

export interface RestoredDisk {
  device: string;
  frozenFile: string;
  /** The new overlay the restored VM writes to. */
  overlayFile: string;
}

export interface RestoreResult {
  mode: RestoreMode;
  /** From the start of the command to the guest running (or loaded, with paused). */
  restoreMs: number;
  /** Time QEMU took from migrate-incoming to a completed load. */
  loadMs: number;
  pid: number;
  /** The restored VM's QMP socket. */
  qmp: string;
  runDir: string;
  logFile: string;
  runState: string;
  disks: RestoredDisk[];
  argv: string[];
  /** The running QEMU, when the caller asked to keep it attached. */
  vm?: Vm;
}

/** Restore a snapshot into a new QEMU started from the VM's own command line. */
export function restore(options: RestoreOptions): Operation<RestoreResult> {
  return new Operation((op) => runRestore(options, op));
}

async function backingChain(file: string): Promise<string[]> {
  try {
    const { stdout } = await run('qemu-img', ['info', '-U', '--backing-chain', '--output=json', file]);
    const parsed = JSON.parse(stdout) as { filename: string }[] | { filename: string };
    return (Array.isArray(parsed) ? parsed : [parsed]).map((i) => resolve(dirname(file), i.filename));
  } catch {
    return [resolve(file)];
  }
}

interface DiskPlanEntry {
  argvDisk: ArgvDisk;
  device: string;
  frozenFile: string;
  format: string;
  virtualSize: number;
  overlayFile: string;
}

/**
 * Pair each disk of the snapshot with the disk of the command line it restores: the command
 * line's image is the frozen layer itself, an image below it (the VM's original disk after
 * several snapshots), or an image above it.
 */
async function planDisks(
  reader: SnapshotReader,
  disks: ArgvDisk[],
  overlayDir: string | undefined,
  tag: string,
): Promise<DiskPlanEntry[]> {
  const plan: DiskPlanEntry[] = [];
  const used = new Set<ArgvDisk>();
  for (const disk of reader.manifest.disks) {
    // The chain recorded at snapshot time saves a qemu-img run per restore.
    const recorded = (disk as { backingChain?: unknown }).backingChain;
    const frozenChain = Array.isArray(recorded) ? recorded.map(String) : await backingChain(disk.frozenFile);
    const candidates = disks.filter((d) => !used.has(d) && !d.readOnly);
    let matches = candidates.filter((d) => frozenChain.includes(resolve(d.file)));
    if (matches.length === 0) {
      // The command line may name an image above the frozen layer (a later overlay).
      const above: ArgvDisk[] = [];
      for (const d of candidates)
        if ((await backingChain(d.file)).includes(resolve(disk.frozenFile))) above.push(d);
      matches = above;
    }
    const match = matches.find((d) => d.deviceId === disk.device) ?? matches[0];
    if (!match) {
      throw new RestoreError(
        'QSNAP_RESTORE_DISKS',
        `no disk in the command line matches the snapshot's disk ${disk.device} (${disk.frozenFile})`,
        {
          hint: 'pass the command line the VM was started with, naming its original disk image',
          details: { device: disk.device, frozenFile: disk.frozenFile },
        },
      );
    }
    used.add(match);
    const dir = overlayDir ? resolve(overlayDir) : dirname(disk.frozenFile);
    // A frozen layer that is itself a restore (or snapshot) overlay keeps its original stem:
    // along a chain of snapshots and restores the names would otherwise outgrow NAME_MAX.
    const stem = basename(disk.frozenFile, extname(disk.frozenFile)).replace(
      /(\.(?:restore|qsnap)-[0-9a-f]{8})+$/,
      '',
    );
    plan.push({
      argvDisk: match,
      device: disk.device,
      frozenFile: disk.frozenFile,
      format: disk.format,
      virtualSize: disk.virtualSize,
      overlayFile: join(dir, `${stem}.restore-${tag}.qcow2`),
    });
  }
  const stray = disks.filter((d) => !used.has(d) && !d.readOnly);
  if (stray.length) {
    throw new RestoreError(
      'QSNAP_RESTORE_DISKS',
      `writable disk ${stray[0]!.file} in the command line is not part of the snapshot`,
      {
        hint: 'its contents would come from another instant than the snapshot; remove it or make it read-only',
        details: { files: stray.map((d) => d.file) },
      },
    );
  }
  return plan;
}

async function createRestoreOverlay(entry: DiskPlanEntry): Promise<void> {
  try {
    await mkdir(dirname(entry.overlayFile), { recursive: true });
    await createOverlay({
      overlayFile: entry.overlayFile,
      backingFile: entry.frozenFile,
      backingFormat: entry.format,
      virtualSize: entry.virtualSize,
    });
  } catch (err) {
    throw new RestoreError(
      'QSNAP_RESTORE_DISKS',
      `cannot create the restore overlay ${entry.overlayFile}: ${(err as Error).message}`,
      { hint: 'check that the directory is writable (or choose --overlay-dir)', cause: err },
    );
  }
}

async function checkCompatible(qmp: QmpClient, reader: SnapshotReader): Promise<void> {
  const m = reader.manifest;
  const [version, machine, memory] = await Promise.all([
    qmp.execute('query-version'),
    qmp.execute('qom-get', { path: '/machine', property: 'type' }),
    qmp.execute('query-memory-size-summary'),
  ]);
  const dest = version.qemu;
  if (!versionAtLeast(dest, m.qemu.version.major, m.qemu.version.minor)) {
    throw new RestoreError(
      'QSNAP_RESTORE_QEMU_VERSION',
      `the snapshot comes from QEMU ${m.qemu.version.major}.${m.qemu.version.minor}, this QEMU is older (${dest.major}.${dest.minor})`,
      { hint: 'restore with the same or a newer QEMU' },
    );
  }
  const machineName = String(machine).replace(/-machine$/, '');
  if (machineName !== m.qemu.machine) {
    throw new RestoreError(
      'QSNAP_RESTORE_MACHINE',
      `the command line gives machine type ${machineName}, the snapshot has ${m.qemu.machine}`,
      {
        hint: `start with -machine ${m.qemu.machine} (the command line the VM was started with)`,
      },
    );
  }
  const ramBytes = memory['base-memory'] + (memory['plugged-memory'] ?? 0);
  if (ramBytes !== m.vm.ramBytes) throw ramSizeError(ramBytes, m.vm.ramBytes);
}

function ramSizeError(given: number, snapshot: number): RestoreError {
  return new RestoreError(
    'QSNAP_RESTORE_RAM_SIZE',
    `the command line gives ${given} bytes of RAM, the snapshot has ${snapshot}`,
    { hint: `use -m ${snapshot / 2 ** 20}M as when the snapshot was taken` },
  );
}

/**
 * QEMU exits when an incoming migration fails (7.2: migration.c process_incoming_migration_co),
 * so the usual sign of a refused state is the monitor going away: say so with QEMU's own words.
 */
async function loadFailure(vm: Vm, err: unknown): Promise<unknown> {
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

async function connectWhenListening(path: string, timeoutMs: number): Promise<Socket> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    try {
      return await new Promise<Socket>((resolvePromise, reject) => {
        // A deep write queue lets the next sections be built while QEMU loads the previous ones;
        // with the default 16 KiB, building and loading take turns instead of overlapping.
        const socket = new Socket({ writableHighWaterMark: 16 * 2 ** 20 } as SocketConstructorOpts);
        socket.connect(path);
        socket.once('connect', () => resolvePromise(socket));
        socket.once('error', reject);
      });
    } catch (err) {
      if (Date.now() > deadline) throw err;
      await new Promise((r) => setTimeout(r, 5));
    }
  }
}

/** The QEMU stream of a snapshot: original prologue and device state, RAM pages from the file. */
export async function* snapshotStream(
  reader: SnapshotReader,
  options: { skipMainBlock: boolean; verify: boolean | 'data' },
): AsyncGenerator<Buffer> {
  const stored = await reader.readPrologue();
  const header = tryDecodePrologue(stored, 0);
  if (!header)
    throw new RestoreError('QSNAP_RESTORE_FORMAT', 'the snapshot has no valid stream header', {
      hint: 'run qsnap verify on it',
    });
  const deviceTail = await reader.readDeviceTail();
  yield* writeMigrationStream({
    prologue: stored.subarray(0, header.size),
    ramSetup: { bytes: stored.subarray(header.size) },
    deviceTail,
    pages: (_block, index) => {
      if (index === 0 && options.skipMainBlock) return 'skip';
      return (async function* (): AsyncGenerator<RamPageRun> {
        for await (const run of reader.readPages(index, { verify: options.verify })) {
          if (run.kind === 'data') yield { offset: run.offset, data: run.data };
          else yield { offset: run.offset, zeroPages: run.pageCount };
        }
      })();
    },
  });
}

async function feed(socket: Socket, chunks: AsyncIterable<Buffer>): Promise<void> {
  // Listened for before the first write: QEMU exits as soon as it refuses the stream, and a
  // socket that closed while nobody waited for 'drain' would otherwise leave this loop waiting forever.
  let cause: Error | undefined;
  const gone = new Promise<never>((_, reject) => {
    socket.on('error', (err) => {
      cause ??= err;
    });
    socket.once('close', () => reject(cause ?? new Error('QEMU closed the incoming migration socket')));
  });
  gone.catch(() => undefined);
  for await (const chunk of chunks) {
    if (!socket.write(chunk)) await Promise.race([once(socket, 'drain'), gone]);
  }
  await new Promise<void>((resolvePromise) => socket.end(resolvePromise));
}

async function waitIncoming(qmp: QmpClient, timeoutMs: number): Promise<void> {
  const { info, timedOut } = await pollMigration(qmp, {
    done: (status) => MIGRATION_ENDED.has(status),
    intervalMs: 2,
    timeoutMs,
  });
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

const RUN_DIR_PREFIX = 'qsnap-vm-';

/**
 * A detached restored QEMU outlives qsnap, so nobody removes its run directory (log, control
 * socket) when it exits. Each restore removes the run directories of QEMUs that are gone.
 */
export async function sweepStaleRunDirs(base = tmpdir()): Promise<string[]> {
  const removed: string[] = [];
  for (const name of await readdir(base).catch(() => [] as string[])) {
    if (!name.startsWith(RUN_DIR_PREFIX)) continue;
    const dir = join(base, name);
    const pid = Number(await readFile(join(dir, 'qemu.pid'), 'utf8').catch(() => ''));
    if (!Number.isInteger(pid) || pid <= 0) continue;
    try {
      process.kill(pid, 0);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ESRCH') {
        await rm(dir, { recursive: true, force: true });
        removed.push(dir);
      }
    }
  }
  return removed;
}

async function runRestore(options: RestoreOptions, op: OperationContext): Promise<RestoreResult> {
  const startedAt = performance.now();
  void sweepStaleRunDirs().catch(() => undefined);
  const mode: RestoreMode = options.lazy ? 'lazy' : 'full';
  op.phase('open', options.file);
  const reader = await openSnapshot(options.file);
  const created: string[] = [];
  let vm: Vm | undefined;
  const ownsRunDir = options.runDir === undefined;
  const runDir = options.runDir ? resolve(options.runDir) : await mkdtemp(join(tmpdir(), RUN_DIR_PREFIX));
  try {
    const m = reader.manifest;
    if (options.verify === 'full') {
      op.phase('verify');
      await reader.verify({ onProgress: (p) => op.progress(p.bytesDone, p.bytesTotal, 'verify') });
    }
    const parsed = parseCommandLine(options.argv);
    if (options.lazy) {
      refuseUnsafeLazy(parsed, m.stream.devices ?? []);
      // The backend must be as large as -m; QEMU would refuse with a start-up error only.
      if (parsed.ramBytes !== undefined && parsed.ramBytes !== m.vm.ramBytes)
        throw ramSizeError(parsed.ramBytes, m.vm.ramBytes);
      if (m.ram.blocks[0]?.fileOffset !== 0) {
        throw new RestoreError('QSNAP_RESTORE_FORMAT', 'the main RAM block is not at offset 0 of the file', {
          hint: 'restore without --lazy',
        });
      }
    }
    op.phase('disks');
    const tag = randomBytes(4).toString('hex');
    const plan = await planDisks(reader, parsed.disks, options.overlayDir, tag);
    for (const entry of plan) {
      await createRestoreOverlay(entry);
      created.push(entry.overlayFile);
    }
    const qmpPath = parsed.qmpSocket ?? options.qmp ?? join(runDir, 'qmp.sock');
    const argv = rewriteCommandLine(parsed, {
      disks: plan.map((p) => ({ argvDisk: p.argvDisk, overlayFile: p.overlayFile })),
      ...(options.lazy
        ? { lazy: { file: reader.path, blockName: m.ram.blocks[0]!.name, ramBytes: m.vm.ramBytes } }
        : {}),
      qmpSocket: qmpPath,
    });
    op.phase('launch');
    await mkdir(runDir, { recursive: true });
    vm = await Vm.launchArgv(argv, {
      qemuBinary: parsed.binary ?? 'qemu-system-x86_64',
      qmpPath,
      runDir,
      // An attached QEMU's run directory goes when it is stopped; a detached one's is swept
      // by a later restore once the QEMU is gone (sweepStaleRunDirs).
      ownsRunDir: ownsRunDir && options.attached === true,
      detached: !options.attached,
    });
    if (!options.attached && ownsRunDir) await writeFile(join(runDir, 'qemu.pid'), `${vm.pid}\n`);
    op.phase('load');
    const loadStart = performance.now();
    const incoming = join(runDir, `incoming-${tag}.sock`);
    const qmp = vm.qmp;
    // The checks and the incoming set-up go out together (QMP answers in order); a failed
    // check kills this QEMU before any state is sent.
    await Promise.all([
      checkCompatible(qmp, reader),
      qmp
        .execute('migrate-set-capabilities', { capabilities: [{ capability: 'events', state: true }] })
        .then(() => qmp.execute('migrate-incoming', { uri: `unix:${incoming}` })),
    ]);
    const socket = await connectWhenListening(incoming, 10_000);
    const totalBytes = m.ram.blocks.reduce(
      (sum, b, i) => (options.lazy && i === 0 ? sum : sum + b.usedLength),
      0,
    );
    let sent = 0;
    const progress = async function* (chunks: AsyncIterable<Buffer>) {
      for await (const chunk of chunks) {
        sent += chunk.length;
        op.progress(Math.min(sent, totalBytes), totalBytes, 'load');
        yield chunk;
      }
    };
    const launched = vm;
    const loaded = waitIncoming(vm.qmp, 30 * 60_000).catch(async (err) => {
      throw await loadFailure(launched, err);
    });
    loaded.catch(() => undefined);
    try {
      await feed(
        socket,
        progress(snapshotStream(reader, { skipMainBlock: mode === 'lazy', verify: 'data' })),
      );
    } catch (err) {
      socket.destroy();
      // A bad page of the file is the cause; QEMU failing on the cut stream is its effect.
      if (err instanceof QsnapError) throw err;
      // Otherwise QEMU's own reason (it closed the socket) beats EPIPE.
      await loaded;
      throw err;
    }
    await loaded;
    await rm(incoming, { force: true });
    const loadMs = performance.now() - loadStart;

    const resume = !options.paused && m.vm.runStateBefore === 'running';
    if (resume) await vm.qmp.execute('cont');
    const status = await vm.qmp.execute('query-status');
    const restoreMs = performance.now() - startedAt;
    op.phase(resume ? 'running' : 'loaded');
    const result: RestoreResult = {
      mode,
      restoreMs,
      loadMs,
      pid: vm.pid,
      qmp: qmpPath,
      runDir,
      logFile: vm.logPath,
      runState: status.status,
      disks: plan.map((p) => ({ device: p.device, frozenFile: p.frozenFile, overlayFile: p.overlayFile })),
      argv,
    };
    if (options.attached) result.vm = vm;
    else await vm.qmp.close();
    return result;
  } catch (err) {
    await vm?.kill().catch(() => undefined);
    await vm?.qmp?.close().catch(() => undefined);
    for (const file of created) await rm(file, { force: true });
    if (ownsRunDir) await rm(runDir, { recursive: true, force: true });
    if (err instanceof QsnapError) throw err;
    throw new RestoreError('QSNAP_RESTORE_FAILED', `restore failed: ${(err as Error).message}`, {
      cause: err,
    });
  } finally {
    await reader.close();
  }
}

/** Write a snapshot as a plain QEMU migration stream (`qemu -incoming "exec:cat FILE"` loads it). */
export function exportStream(options: {
  file: string;
  out: string;
  overwrite?: boolean;
}): Operation<{ out: string; bytes: number; ms: number }> {
  return new Operation(async (op) => {
    const started = performance.now();
    const reader = await openSnapshot(options.file);
    const out = resolve(options.out);
    const tmp = join(dirname(out), `.${basename(out)}.partial-${randomBytes(4).toString('hex')}`);
    const { open, rename } = await import('node:fs/promises');
    if (
      !options.overwrite &&
      (await stat(out).then(
        () => true,
        () => false,
      ))
    ) {
      await reader.close();
      throw new RestoreError('QSNAP_EXPORT_EXISTS', `${out} already exists`, {
        hint: 'choose another path or pass --overwrite',
      });
    }
    const handle = await open(tmp, 'wx', 0o600);
    let bytes = 0;
    const total = reader.manifest.vm.ramBytes;
    try {
      for await (const chunk of snapshotStream(reader, { skipMainBlock: false, verify: 'data' })) {
        await handle.write(chunk);
        bytes += chunk.length;
        op.progress(Math.min(bytes, total), total, 'export');
      }
      await handle.sync();
      await handle.close();
      await rename(tmp, out);
      return { out, bytes, ms: performance.now() - started };
    } catch (err) {
      await handle.close().catch(() => undefined);
      await rm(tmp, { force: true });
      throw err;
    } finally {
      await reader.close();
    }
  });
}
