import { randomBytes } from 'node:crypto';
import { mkdir, rm } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { QsnapError } from '../../errors.js';
import { openSnapshot, PAGE_SIZE, type SnapshotReader } from '../../format/index.js';
import { QmpCommandError } from '../../qmp/errors.js';
import { SectionPool } from '../../stream/index.js';
import { type ParsedCommandLine, parseCommandLine } from '../../vm/cmdline.js';
import { relocateSockets, rewriteCommandLine } from '../../vm/cmdline-rewrite.js';
import { Vm } from '../../vm/launcher.js';
import { recordQemu, runDirPath } from '../../vm/run-dir.js';
import { RestoreError } from '../errors.js';
import { Operation, type OperationContext } from '../operation.js';
import { createRestoreOverlay, type PairedDisk, pairDisks } from './disk-pairing.js';
import { feed, PulledAhead, snapshotStream } from './file-stream.js';
import {
  checkCompatible,
  commandLineRamZeroed,
  connectWhenListening,
  guestRamZeroed,
  loadFailure,
  qemuCanRead,
  waitIncoming,
} from './incoming.js';
import { checkLazy } from './lazy.js';
import type { RestoreMode, RestoreOptions, RestoreResult } from './types.js';

export type { RestoredDisk, RestoreMode, RestoreOptions, RestoreResult } from './types.js';

/**
 * Restore a snapshot into a new QEMU started from the VM's own command line:
 * open and check the file → pair its disks with the command line's and give each a fresh
 * overlay → launch QEMU with `-incoming defer` → check it can take the state → stream the
 * file into it (lazy: all but the RAM it maps) → resume. A failure leaves nothing behind.
 */
export function restore(options: RestoreOptions): Operation<RestoreResult> {
  return new Operation((op) => runRestore(options, op));
}

/** What a failed restore must remove: the overlays it made, the QEMU it started, its run directory. */
interface Made {
  files: string[];
  vm: Vm | undefined;
  runDir: string | undefined;
  /** The stream being built for QEMU. */
  stream?: PlannedStream;
  /** The pages QEMU reads itself (mapped-ram), being checked. */
  check?: PageCheck;
}

interface PageCheck {
  done: Promise<void>;
  /** Stops reading; `done` then settles soon. */
  stop(): void;
}

/** A mapped-ram view's start (SnapshotReader.mappedRamView). */
type View = { streamOffset: number };

/** The migration stream of a restore, pulled ahead into reusable section buffers. */
interface PlannedStream {
  chunks: PulledAhead;
  sections: SectionPool;
  /** Built without the main block's zero pages. */
  zeroed: boolean;
}

/** How much of the stream is built ahead, while QEMU starts. */
const AHEAD_BYTES = 32 * 2 ** 20;

function buildStream(reader: SnapshotReader, mode: RestoreMode, zeroed: boolean): PlannedStream {
  const sections = new SectionPool();
  const stream = snapshotStream(reader, {
    skipMainBlock: mode === 'lazy',
    verify: 'data',
    mainBlockZeroed: zeroed,
    sections,
  });
  return { chunks: new PulledAhead(stream, AHEAD_BYTES), sections, zeroed };
}

async function runRestore(options: RestoreOptions, op: OperationContext): Promise<RestoreResult> {
  const startedAt = performance.now();
  op.phase('open', options.file);
  const reader = await openSnapshot(options.file);
  const made: Made = { files: [], vm: undefined, runDir: undefined };
  try {
    const runDir = options.runDir ? resolve(options.runDir) : runDirPath();
    if (!options.runDir) made.runDir = runDir;
    const { parsed, disks, argv, qmpPath, relocated } = await prepare(reader, options, runDir, made, op);
    await options.onPrepared?.({ overlays: [...made.files], runDir });
    const view = options.lazy ? undefined : await reader.mappedRamView();
    const zeroGuess = !options.lazy && commandLineRamZeroed(parsed);
    // Started now, while QEMU starts. A snapshot of QEMU ≥ 9.0 is restored by one (checkCompatible),
    // which reads the file itself: its pages are checked meanwhile. Otherwise the stream is built
    // (again, if QEMU's RAM turns out not to be zero).
    if (view && zeroGuess && reader.manifest.qemu.version.major >= 9) made.check = checkPages(reader);
    else made.stream = buildStream(reader, options.lazy ? 'lazy' : 'full', zeroGuess);
    op.phase('launch');
    const vm = await launch(parsed, argv, qmpPath, runDir, options, made);
    await options.onLaunched?.({ pid: vm.pid, qmp: qmpPath, unref: () => vm.unref() });
    op.phase('launched');
    op.phase('load');
    const incoming = join(runDir, `incoming-${randomBytes(4).toString('hex')}.sock`);
    const { loadMs, loadPath } = await load(
      vm,
      reader,
      { mode: options.lazy ? 'lazy' : 'full', view },
      incoming,
      op,
      made,
      options.beforeLoad,
    );
    const result = await resume(vm, reader, options, op);
    const restoreMs = performance.now() - startedAt;
    return {
      ...result,
      restoreMs,
      loadMs,
      loadPath,
      qmp: qmpPath,
      runDir,
      argv,
      relocated,
      disks: disks.map(restored),
    };
  } catch (err) {
    await undo(made);
    if (err instanceof QsnapError) throw err;
    throw new RestoreError('QSNAP_RESTORE_FAILED', `restore failed: ${(err as Error).message}`, {
      cause: err,
    });
  } finally {
    await reader.close();
  }
}

/** Check the file and the command line, make the overlays, and write the restoring command line. */
async function prepare(
  reader: SnapshotReader,
  options: RestoreOptions,
  runDir: string,
  made: Made,
  op: OperationContext,
): Promise<{
  parsed: ParsedCommandLine;
  disks: PairedDisk[];
  argv: string[];
  qmpPath: string;
  relocated: Record<string, string>;
}> {
  if (options.verify === 'full') {
    op.phase('verify');
    await reader.verify({ onProgress: (p) => op.progress(p.bytesDone, p.bytesTotal, 'verify') });
  }
  const relocation = relocateIf(parseCommandLine(options.argv), options.relocateSockets ? runDir : undefined);
  const parsed = relocation.parsed;
  if (options.lazy) checkLazy(parsed, reader.manifest);
  op.phase('disks');
  const disks = await makeOverlays(reader, parsed, options, randomBytes(4).toString('hex'), made, runDir);
  op.phase('overlays');
  const qmpPath = parsed.qmpSocket ?? options.qmp ?? join(runDir, 'qmp.sock');
  const argv = rewriteCommandLine(parsed, {
    disks: disks.map((d) => ({ argvDisk: d.argvDisk, overlayFile: d.overlayFile })),
    ...(options.lazy ? { lazy: lazyMapping(reader) } : {}),
    qmpSocket: qmpPath,
  });
  return { parsed, disks, argv, qmpPath, relocated: Object.fromEntries(relocation.moved) };
}

function relocateIf(parsed: ParsedCommandLine, dir: string | undefined): ReturnType<typeof relocateSockets> {
  return dir ? relocateSockets(parsed, dir) : { parsed, moved: new Map() };
}

async function makeOverlays(
  reader: SnapshotReader,
  parsed: ParsedCommandLine,
  options: RestoreOptions,
  tag: string,
  made: Made,
  runDir: string,
): Promise<PairedDisk[]> {
  const disks = await pairDisks(reader.manifest, parsed.disks, {
    overlayDir: options.overlayDir,
    tag,
    frozenLayers: options.frozenLayers,
  });
  await options.onPlanned?.({ overlays: disks.map((d) => d.overlayFile), runDir });
  for (const disk of disks) {
    await createRestoreOverlay(disk);
    made.files.push(disk.overlayFile);
  }
  return disks;
}

function lazyMapping(reader: SnapshotReader): { file: string; blockName: string; ramBytes: number } {
  const m = reader.manifest;
  return { file: reader.path, blockName: m.ram.blocks[0]!.name, ramBytes: m.vm.ramBytes };
}

async function launch(
  parsed: ParsedCommandLine,
  argv: string[],
  qmpPath: string,
  runDir: string,
  options: RestoreOptions,
  made: Made,
): Promise<Vm> {
  // Ours is made only now, after the caller recorded it; a random name that exists is refused.
  if (made.runDir) await mkdir(runDir, { mode: 0o700 });
  else await mkdir(runDir, { recursive: true });
  made.vm = await Vm.launchArgv(argv, {
    qemuBinary: parsed.binary ?? 'qemu-system-x86_64',
    qmpPath,
    runDir,
    // An attached QEMU's run directory goes when it is stopped; a detached one's is swept
    // once the QEMU is gone (vm/run-dir.ts), which its recorded identity tells.
    ownsRunDir: made.runDir !== undefined && options.attached === true,
    detached: !options.attached,
  });
  if (!options.attached && made.runDir) await recordQemu(runDir, made.vm.pid);
  return made.vm;
}

/**
 * Load the snapshot into QEMU: QEMU ≥ 9.0 reads a format-2 file itself (mapped-ram) when the
 * restore is full and its RAM fresh; otherwise qsnap streams it into QEMU's incoming socket.
 * Resolves when QEMU completed the load (and, with mapped-ram, every page it read is checked).
 */
async function load(
  vm: Vm,
  reader: SnapshotReader,
  how: { mode: RestoreMode; view: View | undefined },
  incoming: string,
  op: OperationContext,
  made: Made,
  beforeLoad: (() => Promise<void>) | undefined,
): Promise<{ loadMs: number; loadPath: 'mapped-ram' | 'stream' }> {
  let started = performance.now();
  const qmp = vm.qmp;
  const { mode, view } = how;
  const viaFile = mode === 'full' && view !== undefined;
  // The checks and the incoming set-up go out together (QMP answers in order); a failed
  // check kills this QEMU before any state is sent (or, with mapped-ram, read).
  const [, zeroed, capabilities] = await Promise.all([
    checkCompatible(qmp, reader),
    mode === 'full' ? guestRamZeroed(qmp) : false,
    viaFile ? qmp.execute('query-migrate-capabilities') : [],
    qmp
      .execute('migrate-set-capabilities', { capabilities: [{ capability: 'events', state: true }] })
      .then(() => (viaFile ? undefined : qmp.execute('migrate-incoming', { uri: `unix:${incoming}` }))),
  ]);
  op.phase('checked');
  if (beforeLoad) {
    await beforeLoad();
    started = performance.now();
  }
  if (viaFile) {
    const mappedRam = capabilities.some((c) => c.capability === 'mapped-ram');
    if (zeroed && mappedRam && (await loadFromFile(vm, reader, view, made))) {
      await made.stream?.chunks.discard();
      made.stream = undefined;
      op.progress(1, 1, 'load');
      return { loadMs: performance.now() - started, loadPath: 'mapped-ram' };
    }
    await stopCheck(made); // the stream checks what it sends
    await qmp.execute('migrate-incoming', { uri: `unix:${incoming}` });
  }
  return {
    loadMs: await sendStream(vm, reader, mode, incoming, op, made, zeroed, started),
    loadPath: 'stream',
  };
}

/**
 * QEMU reads the file from the view's start with the mapped-ram capability while qsnap checks
 * every page it reads; false (nothing asked of QEMU) when QEMU could not open the file (it runs
 * in another mount namespace, as another user), so the caller streams it instead.
 */
async function loadFromFile(vm: Vm, reader: SnapshotReader, view: View, made: Made): Promise<boolean> {
  if (!(await qemuCanRead(vm.pid, reader.path))) return false;
  const qmp = vm.qmp;
  // With multifd, QEMU's channels (2 by default) read and fault in RAM in parallel: the load is
  // mostly the kernel zeroing fresh guest memory (clear_page, 76 % of a perf profile of QEMU 10).
  await qmp.execute('migrate-set-capabilities', {
    capabilities: [
      { capability: 'mapped-ram', state: true },
      { capability: 'multifd', state: true },
    ],
  });
  try {
    const addr = { transport: 'file' as const, filename: reader.path, offset: view.streamOffset };
    await qmp.execute('migrate-incoming', { channels: [{ 'channel-type': 'main', addr }] });
  } catch (err) {
    if (!(err instanceof QmpCommandError)) throw err;
    // QEMU's incoming state stays in `setup` after this: no second migrate-incoming.
    throw new RestoreError('QSNAP_RESTORE_LOAD', `QEMU could not read the snapshot file: ${err.desc}`, {
      hint: 'make the snapshot file readable by the QEMU that restores it',
      cause: err,
    });
  }
  made.check ??= checkPages(reader);
  const loaded = waitIncoming(qmp, 30 * 60_000).catch(async (err) => {
    throw await loadFailure(vm, err);
  });
  loaded.catch(() => undefined);
  // A bad page is the cause of a failure, not QEMU's load of it.
  await made.check.done;
  await loaded;
  return true;
}

/**
 * Every data page QEMU reads in a mapped-ram load, checked against the page table (the stream
 * path checks what it sends the same way); stops early once the restore is undone.
 */
function checkPages(reader: SnapshotReader): PageCheck {
  let stopped = false;
  const run = async (): Promise<void> => {
    for (const [i] of reader.manifest.ram.blocks.entries()) {
      for await (const _ of reader.readPages(i, { verify: 'data', maxRunBytes: 256 * PAGE_SIZE })) {
        if (stopped) return;
      }
    }
  };
  const done = run();
  done.catch(() => undefined); // awaited by the load; until then a failure must not go unhandled
  return { done, stop: () => (stopped = true) };
}

async function stopCheck(made: Made): Promise<void> {
  made.check?.stop();
  await made.check?.done.catch(() => undefined);
  made.check = undefined;
}

/** Stream the snapshot into QEMU's incoming socket; resolves when QEMU completed the load. */
async function sendStream(
  vm: Vm,
  reader: SnapshotReader,
  mode: RestoreMode,
  incoming: string,
  op: OperationContext,
  made: Made,
  zeroed: boolean,
  started: number,
): Promise<number> {
  const qmp = vm.qmp;
  if (made.stream && made.stream.zeroed !== zeroed) {
    await made.stream.chunks.discard();
    made.stream = undefined;
  }
  const stream = made.stream ?? buildStream(reader, mode, zeroed);
  const socket = await connectWhenListening(incoming, 10_000);
  const loaded = waitIncoming(qmp, 30 * 60_000).catch(async (err) => {
    throw await loadFailure(vm, err);
  });
  loaded.catch(() => undefined);
  const total = streamRamBytes(reader, mode, stream.zeroed);
  try {
    await feed(socket, counted(stream.chunks, total, op), stream.sections);
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
  return performance.now() - started;
}

/** About the RAM bytes of the stream: a record header and 4096 bytes per data page, 9 per zero page sent. */
function streamRamBytes(reader: SnapshotReader, mode: RestoreMode, zeroed: boolean): number {
  return reader.manifest.ram.blocks.reduce((sum, b, i) => {
    if (mode === 'lazy' && i === 0) return sum;
    return sum + b.dataPages * (8 + 4096) + (zeroed && i === 0 ? 0 : b.zeroPages * 9);
  }, 0);
}

async function* counted(
  chunks: AsyncIterable<Buffer>,
  total: number,
  op: OperationContext,
): AsyncGenerator<Buffer> {
  let sent = 0;
  for await (const chunk of chunks) {
    sent += chunk.length;
    op.progress(Math.min(sent, total), total, 'load');
    yield chunk;
  }
  op.progress(total, total, 'load');
}

/** Resume the guest if it ran at the snapshot (and the caller did not ask for paused). */
async function resume(
  vm: Vm,
  reader: SnapshotReader,
  options: RestoreOptions,
  op: OperationContext,
): Promise<Pick<RestoreResult, 'mode' | 'pid' | 'logFile' | 'runState' | 'vm'>> {
  const run = !options.paused && reader.manifest.vm.runStateBefore === 'running';
  // Sent together: QMP answers in order, so the status is the one after cont.
  const [, status] = await Promise.all([
    run ? vm.qmp.execute('cont') : undefined,
    vm.qmp.execute('query-status'),
  ]);
  op.phase(run ? 'running' : 'loaded');
  const result = {
    mode: (options.lazy ? 'lazy' : 'full') as RestoreMode,
    pid: vm.pid,
    logFile: vm.logPath,
    runState: status.status,
  };
  if (options.attached) return { ...result, vm };
  await vm.qmp.close();
  return result;
}

function restored(d: PairedDisk): { device: string; frozenFile: string; overlayFile: string } {
  return { device: d.device, frozenFile: d.frozenFile, overlayFile: d.overlayFile };
}

async function undo(made: Made): Promise<void> {
  await stopCheck(made);
  await made.stream?.chunks.discard().catch(() => undefined);
  await made.vm?.kill().catch(() => undefined);
  await made.vm?.qmp?.close().catch(() => undefined);
  for (const file of made.files) await rm(file, { force: true });
  if (made.runDir) await rm(made.runDir, { recursive: true, force: true });
}
