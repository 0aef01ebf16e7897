import { EventEmitter } from 'node:events';
import { rm } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { readMachineType, readRamBytes } from '../engine/probe.js';
import type { RestoreMode, RestoreResult } from '../engine/restore/restore.js';
import { snapshot } from '../engine/snapshot/snapshot.js';
import type { QmpClient } from '../qmp/index.js';
import { checkName } from '../store/names.js';
import { type ParsedCommandLine, parseCommandLine } from '../vm/cmdline.js';
import { relocateSockets } from '../vm/cmdline-rewrite.js';
import { type ExitInfo, Vm } from '../vm/launcher.js';
import { processIdentity } from '../vm/process.js';
import { joinArgv } from '../vm/qemu-opts.js';
import { type Checkpoint, CheckpointCatalog } from './checkpoints.js';
import { type CallOptions, runOperation, throwIfAborted, withDeadline } from './deadline.js';
import { MachineError } from './errors.js';
import { type Layout, makeLayout, opsMonitorArgs, opsPath, removeLayout } from './layout.js';
import {
  killSync,
  ownerIdentity,
  register,
  removeSync,
  sweepMachines,
  type Teardown,
  unregister,
  writeLedger,
} from './leftovers.js';
import { checkCheckpoint } from './preflight.js';
import { restoreWithin } from './restore-within.js';
import { removePublicLinks, Spare } from './spare.js';

export type { Checkpoint } from './checkpoints.js';

/** How long a checkpoint waits for a spare that is still starting. */
const SPARE_SETTLE_MS = 2000;

/** Spares in a row that failed to start before the machine stops making them. */
const MAX_SPARE_FAILURES = 3;

export type { CallOptions } from './deadline.js';

export interface MachineOptions extends CallOptions {
  /** The QEMU command line (binary first, or options only). A QMP socket is added if it has none. */
  argv: string[];
  /** How revert loads RAM (default 'lazy': constant time whatever the RAM size). */
  revertMode?: RestoreMode;
  /**
   * Keep the next revert's QEMU started ahead, for the checkpoint last taken or reverted to
   * (default true with lazy reverts): a revert to it then takes milliseconds instead of a QEMU
   * start. It costs a second QEMU process, idle, whose RAM is the checkpoint file's page cache.
   */
  warmSpare?: boolean;
}

export type MachineState = 'running' | 'dead' | 'closed';

/** The `exit` event: QEMU ended without qsnap stopping it (a guest panic with -no-reboot, a kill). */
export interface MachineExit extends ExitInfo {
  pid: number;
  /** The last lines QEMU printed. */
  logTail: string;
}

export interface RevertResult {
  /** Restoring the checkpoint into the new QEMU. */
  restoreMs: number;
  /** The whole revert: checks, stopping the old QEMU, restoring, removing what is no longer needed. */
  revertMs: number;
  pid: number;
  /** What happened to the QEMU that ran before: stopped by the revert, or found dead. */
  previous: { pid: number; was: 'stopped' | 'dead' };
  /** Disk overlays removed because nothing needs them any more. */
  removed: string[];
  /** Reverted by the warm spare (MachineOptions.warmSpare). */
  warm: boolean;
}

/**
 * A VM for test harnesses: checkpoint it, revert to any checkpoint before each test, clone a
 * checkpoint for parallel workers. Reverting replaces the running QEMU in place — same command
 * line, same QMP and serial socket paths — after checking the checkpoint fits; it works when
 * the QEMU died. close() (or `await using`, or the process ending by SIGINT, SIGTERM or exit)
 * removes everything qsnap created for the machine.
 *
 * Events: `exit` (MachineExit) when QEMU ends on its own; `progress` (OperationEvent) for
 * every checkpoint and revert.
 */
export class Machine extends EventEmitter implements Teardown, AsyncDisposable {
  private vm: Vm;
  private closed = false;
  private readonly catalog = new CheckpointCatalog();
  /** Every overlay qsnap created for this machine: removed once nothing needs it. */
  private readonly created = new Set<string>();
  /** The images the current QEMU writes to. */
  private inUse: string[];
  private queue: Promise<unknown> = Promise.resolve();
  private sequence = 0;
  /** The QEMU a revert in flight started (teardownSync kills it too). */
  private starting: number | undefined;
  /** A clone's sockets and pidfile: original path → its own. */
  private moved = new Map<string, string>();
  /** The next revert's QEMU, started ahead (spare.ts). */
  private spareQemu: Spare | undefined;
  private keepSpare = true;
  private spareFailures = 0;
  /** The current QEMU's own directory, when it was a spare: removed once that QEMU is stopped. */
  private vmDir: string | undefined;
  /** The QMP socket path the harness connects to: the same whichever QEMU serves it. */
  private readonly publicQmpPath: string;
  private ledgerWrites: Promise<void> = Promise.resolve();

  private constructor(
    vm: Vm,
    private readonly binary: string,
    /** The command line every revert starts (the user's, plus qsnap's ops monitor). */
    private readonly argv: string[],
    private readonly parsed: ParsedCommandLine,
    private readonly layout: Layout,
    private readonly ramBytes: number,
    private readonly machineType: string,
    private readonly revertMode: RestoreMode,
  ) {
    super();
    this.vm = vm;
    this.publicQmpPath = vm.qmpPath;
    this.inUse = parsed.disks.filter((d) => !d.readOnly).map((d) => d.file);
    this.watch(vm);
  }

  /** Start QEMU from a command line and wait until it answers QMP. */
  static async launch(options: MachineOptions): Promise<Machine> {
    throwIfAborted('Machine.launch', options);
    await sweepMachines().catch(() => undefined);
    const layout = await makeLayout();
    const parsed = parseCommandLine(options.argv);
    const binary = parsed.binary ?? 'qemu-system-x86_64';
    const qmpPath = parsed.qmpSocket ?? join(layout.runDir, 'qmp.sock');
    const argv = [
      ...(parsed.binary ? options.argv.slice(1) : options.argv),
      ...(parsed.qmpSocket ? [] : ['-qmp', `unix:${qmpPath},server=on,wait=off`]),
      ...opsMonitorArgs(join(layout.runDir, 'ops.sock')),
    ];
    return Machine.start(layout, options, binary, argv, (l) =>
      Vm.launchArgv(argv, {
        qemuBinary: binary,
        qmpPath,
        runDir: l.runDir,
        ...(options.timeoutMs === undefined ? {} : { startTimeoutMs: options.timeoutMs }),
      }),
    );
  }

  /**
   * Start an independent copy of a checkpointed VM: its own QMP, serial and other unix
   * sockets and pidfile (moved into its run directory: `machine.socketPath(original)`), its own
   * disk overlays on the checkpoint's frozen layers. Any number of clones of one checkpoint
   * run at once; keep the machine that took the checkpoint open while they run (it owns the
   * checkpoint's files).
   */
  static async fromCheckpoint(
    checkpoint: Checkpoint,
    options: CallOptions & { revertMode?: RestoreMode; warmSpare?: boolean } = {},
  ): Promise<Machine> {
    throwIfAborted('Machine.fromCheckpoint', options);
    await sweepMachines().catch(() => undefined);
    const layout = await makeLayout();
    const relocated = relocateSockets(parseCommandLine(checkpoint.argv), layout.runDir);
    const argv = joinArgv(relocated.parsed.entries);
    const lazy = (options.revertMode ?? 'lazy') === 'lazy';
    const machine = await Machine.start(layout, options, checkpoint.binary, argv, async (l, record) => {
      const restored = await restoreWithin('Machine.fromCheckpoint', options, {
        file: checkpoint.file,
        argv: [checkpoint.binary, ...argv],
        lazy,
        runDir: l.runDir,
        attached: true,
        onPlanned: async (planned) => record(planned.overlays),
      });
      return { vm: restored.vm!, overlays: restored.disks.map((d) => d.overlayFile) };
    });
    machine.moved = relocated.moved;
    return machine;
  }

  private static async start(
    layout: Layout,
    options: CallOptions & { revertMode?: RestoreMode; warmSpare?: boolean },
    binary: string,
    argv: string[],
    boot: (
      layout: Layout,
      record: (files: string[]) => Promise<void>,
    ) => Promise<Vm | { vm: Vm; overlays: string[] }>,
  ): Promise<Machine> {
    const made: string[] = [];
    const record = async (files: string[]) => {
      made.push(...files);
      await writeLedger(layout.machineDir, {
        owner: ownerIdentity(),
        checkpointDir: layout.checkpointDir,
        qemus: [],
        files: made,
      });
    };
    let vm: Vm | undefined;
    try {
      const booted = await withDeadline('Machine.launch', boot(layout, record), options, async (late) =>
        (late instanceof Vm ? late : late.vm).stop().then(() => undefined),
      );
      vm = booted instanceof Vm ? booted : booted.vm;
      const [ramBytes, machineType] = await Promise.all([readRamBytes(vm.qmp), readMachineType(vm.qmp)]);
      const machine = new Machine(
        vm,
        binary,
        argv,
        parseCommandLine(argv),
        layout,
        ramBytes,
        machineType,
        options.revertMode ?? 'lazy',
      );
      for (const file of made) machine.created.add(file);
      machine.keepSpare = options.warmSpare ?? true;
      if (!(booted instanceof Vm)) machine.inUse = booted.overlays;
      register(machine);
      await machine.saveLedger();
      return machine;
    } catch (err) {
      await vm?.stop().catch(() => undefined);
      for (const file of made) await rm(file, { force: true });
      await removeLayout(layout);
      throw err;
    }
  }

  get state(): MachineState {
    if (this.closed) return 'closed';
    return this.vm.running ? 'running' : 'dead';
  }

  /** The current QEMU's pid (a revert replaces it). */
  get pid(): number {
    return this.vm.pid;
  }

  /** The public QMP socket of the command line (or the one qsnap added): free for the harness's own client. */
  get qmpPath(): string {
    return this.publicQmpPath;
  }

  /**
   * A QMP client on qsnap's private monitor of the current QEMU (typed `execute`, `on` /
   * `waitFor` for events). A revert replaces it: read it again after each revert.
   */
  get qmp(): QmpClient {
    this.assertRunning('machine.qmp');
    return this.vm.qmp;
  }

  /** Run an HMP command (e.g. `info registers`, `o /b 0x70 0x40`) and return its output. */
  async hmp(command: string): Promise<string> {
    this.assertRunning('machine.hmp');
    return this.vm.qmp.execute('human-monitor-command', { 'command-line': command });
  }

  /** The directories qsnap made for this machine (all removed by close()). */
  get runDir(): string {
    return this.layout.runDir;
  }

  get checkpointDir(): string {
    return this.layout.checkpointDir;
  }

  /** Where a unix socket (or pidfile) of the original command line is for this machine (moved for a clone). */
  socketPath(original: string): string {
    return this.moved.get(resolve(original)) ?? original;
  }

  /**
   * The warm spare (MachineOptions.warmSpare): the checkpoint it reverts to, its QEMU (once
   * started), whether it is ready (waiting for the state: a revert now takes milliseconds) and
   * the disk overlays it made beside the images. Undefined when there is none.
   */
  get spare():
    | { checkpoint: string; pid: number | undefined; ready: boolean; overlays: string[] }
    | undefined {
    const spare = this.spareQemu;
    return (
      spare && {
        checkpoint: spare.checkpoint.name,
        pid: spare.pid,
        ready: spare.waiting,
        overlays: [...spare.overlays],
      }
    );
  }

  /** The current QEMU's log, last lines. */
  logTail(lines = 10): string {
    return this.vm.logTail(lines);
  }

  checkpoints(): Checkpoint[] {
    return this.catalog.list();
  }

  /**
   * Take a live snapshot of the running VM (the guest pauses for milliseconds). Names are
   * unique: an existing name is an error unless `overwrite` (the old checkpoint is deleted).
   */
  async checkpoint(
    name: string = `checkpoint-${this.sequence + 1}`,
    options: CallOptions & { overwrite?: boolean } = {},
  ): Promise<Checkpoint> {
    return this.serialized(async () => {
      this.assertRunning('checkpoint');
      checkName(name);
      if (this.catalog.get(name) && !options.overwrite) {
        throw new MachineError('QSNAP_MACHINE_CHECKPOINT_EXISTS', `a checkpoint named "${name}" exists`, {
          hint: 'pass { overwrite: true } to replace it, or choose another name',
        });
      }
      throwIfAborted('checkpoint', options);
      // A spare still starting takes the CPU the guest's pause needs (two cores, TCG: the pause
      // doubled): let it finish first.
      await this.spareQemu?.settled(SPARE_SETTLE_MS);
      const out = join(this.layout.checkpointDir, `cp-${++this.sequence}.qsnap`);
      const op = snapshot({
        qmp: opsPath(this.parsed),
        out,
        commandLine: [this.binary, ...this.argv],
        stateDir: this.layout.stateDir,
      });
      op.on((event) => this.emit('progress', event));
      const result = await runOperation('checkpoint', op, options);
      for (const disk of result.disks) this.created.add(disk.overlayFile);
      this.inUse = result.disks.map((d) => d.overlayFile);
      const checkpoint: Checkpoint = {
        name,
        file: result.file,
        id: result.id,
        createdAt: result.pointInTime,
        downtimeMs: result.downtimeMs,
        frozenFiles: result.disks.map((d) => d.frozenFile),
        argv: [...this.argv],
        binary: this.binary,
        ramBytes: result.ramBytes,
        machineType: result.machine,
      };
      const replaced = this.catalog.put(checkpoint);
      if (replaced) {
        if (this.spareQemu?.checkpoint.id === replaced.id) await this.dropSpare();
        await rm(replaced.file, { force: true });
      }
      await this.collect();
      await this.prepareSpare(checkpoint);
      return checkpoint;
    });
  }

  /** Delete a checkpoint: its RAM file and every disk overlay no other checkpoint and not the running VM needs. */
  async deleteCheckpoint(checkpoint: Checkpoint | string): Promise<{ removed: string[] }> {
    return this.serialized(async () => {
      this.assertOpen('deleteCheckpoint');
      const found = this.catalog.get(typeof checkpoint === 'string' ? checkpoint : checkpoint.name);
      if (!found || (typeof checkpoint !== 'string' && found.id !== checkpoint.id)) {
        throw this.unknown(typeof checkpoint === 'string' ? checkpoint : checkpoint.name);
      }
      this.catalog.remove(found);
      if (this.spareQemu?.checkpoint.id === found.id) await this.dropSpare();
      await rm(found.file, { force: true });
      return { removed: [found.file, ...(await this.collect())] };
    });
  }

  /**
   * Replace the QEMU by a new one restored from `checkpoint`. The checkpoint is checked first
   * (file, id, RAM size, machine type, disks): a failed check leaves the running guest
   * untouched. Works when the QEMU died; a revert that fails after the old QEMU was stopped
   * leaves the machine `dead`, and the next revert recovers.
   */
  async revert(
    checkpoint: Checkpoint,
    options: CallOptions & { mode?: RestoreMode } = {},
  ): Promise<RevertResult> {
    return this.serialized(async () => {
      const started = performance.now();
      this.assertOpen('revert');
      if (this.catalog.wasDeleted(checkpoint.id)) throw this.unknown(checkpoint.name);
      const lazy = (options.mode ?? this.revertMode) === 'lazy';
      await checkCheckpoint(checkpoint, {
        parsed: this.parsed,
        ramBytes: this.ramBytes,
        machineType: this.machineType,
        lazy,
      });
      throwIfAborted('revert', options);
      const previous = { pid: this.vm.pid, was: this.vm.running ? ('stopped' as const) : ('dead' as const) };
      const spare = lazy && this.spareQemu?.checkpoint.id === checkpoint.id ? this.spareQemu : undefined;
      const warm = spare ? await this.takeOver(spare) : undefined;
      const result = warm?.result ?? (await this.replaceQemu(checkpoint, lazy, options));
      this.vm = result.vm!;
      this.vmDir = warm ? spare?.dir : undefined;
      this.inUse = result.disks.map((d) => d.overlayFile);
      this.watch(this.vm);
      await this.saveLedger();
      const removed = warm ? warm.removed : await this.collect();
      await this.prepareSpare(checkpoint);
      return {
        restoreMs: result.restoreMs,
        warm: warm !== undefined,
        revertMs: performance.now() - started,
        pid: result.pid,
        previous,
        removed,
      };
    });
  }

  /** Stop QEMU and remove everything qsnap created for this machine. Idempotent. */
  async close(): Promise<void> {
    if (this.closed) return;
    await this.queue.catch(() => undefined);
    this.closed = true;
    this.unwatch();
    await this.dropSpare();
    await this.vm.stop().catch(() => undefined);
    await removePublicLinks(this.argv);
    for (const file of this.created) await rm(file, { force: true });
    await removeLayout(this.layout);
    unregister(this);
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }

  /** Process ending (signal or exit): kill QEMU, remove the files, without awaiting. */
  teardownSync(): void {
    if (this.closed) return;
    this.closed = true;
    killSync(this.qemuPids());
    removeSync([...this.created, this.layout.checkpointDir, this.layout.machineDir]);
  }

  /** Stop the current QEMU (if it still runs) and restore `checkpoint` into a new one. */
  private async replaceQemu(
    checkpoint: Checkpoint,
    lazy: boolean,
    options: CallOptions,
  ): Promise<RestoreResult> {
    this.unwatch();
    await this.stopCurrent();
    // A spare that took over before left symlinks at the public paths: this QEMU makes its own.
    await removePublicLinks(this.argv);
    try {
      return await restoreWithin(
        'revert',
        options,
        {
          file: checkpoint.file,
          argv: [this.binary, ...this.argv],
          lazy,
          runDir: this.layout.runDir,
          attached: true,
          onPlanned: async (planned) => {
            for (const file of planned.overlays) this.created.add(file);
            await this.saveLedger();
          },
          // A harness SIGKILLed from here on leaves this QEMU: the ledger names it for the sweep.
          onLaunched: async (qemu) => {
            this.starting = qemu.pid;
            await this.saveLedger();
          },
        },
        (event) => this.emit('progress', event),
      );
    } finally {
      // Adopted on success; on failure restore stopped it: either way no longer "starting".
      this.starting = undefined;
    }
  }

  /**
   * Revert by the spare: stop the current QEMU, send the spare its state, resume it. Undefined
   * when the spare cannot (it failed to start, its QEMU died, the load failed): the revert then
   * restores into a new QEMU as usual.
   */
  private async takeOver(spare: Spare): Promise<{ result: RestoreResult; removed: string[] } | undefined> {
    this.spareQemu = undefined;
    if (!(await spare.usable())) {
      // One that never got its QEMU running (a command line a spare cannot run, e.g. a socket
      // path too long once moved): after a few, this machine reverts without spares.
      if (spare.pid === undefined && ++this.spareFailures >= MAX_SPARE_FAILURES) this.keepSpare = false;
      await this.discardSpare(spare);
      return undefined;
    }
    this.spareFailures = 0;
    this.unwatch();
    const started = performance.now();
    // The old QEMU is killed, not waited for: its sockets, disk overlay and RAM are its own, so
    // the spare takes over while the kernel tears it down (10-20 ms at 256 MiB).
    const stopping = this.stopCurrent();
    // What the old QEMU wrote to is garbage from now on, and the spare's overlays are known:
    // the layers nothing needs go meanwhile too.
    const collecting = this.collect(spare.overlays).catch(() => []);
    try {
      const result = await spare.takeOver();
      return {
        result: { ...result, restoreMs: performance.now() - started },
        removed: await collecting,
      };
    } catch {
      // restore undid itself (its QEMU stopped, its overlays removed).
      await this.discardSpare(spare);
      return undefined;
    } finally {
      await stopping;
      await collecting;
      await this.saveLedger();
    }
  }

  /**
   * Start the spare for `checkpoint`, in the background; one for another checkpoint is stopped
   * first (awaited: its overlay is gone when the call that replaced it returns).
   */
  private async prepareSpare(checkpoint: Checkpoint): Promise<void> {
    if (!this.keepSpare || this.revertMode !== 'lazy' || this.closed) return;
    if (this.spareQemu?.checkpoint.id === checkpoint.id) return;
    await this.dropSpare();
    this.spareQemu = Spare.start(checkpoint, this.layout.runDir, this.argv, {
      onPlanned: async (overlays) => {
        for (const file of overlays) this.created.add(file);
        await this.saveLedger();
      },
      onLaunched: () => this.saveLedger(),
    });
  }

  private async dropSpare(): Promise<void> {
    const spare = this.spareQemu;
    this.spareQemu = undefined;
    if (spare) await this.discardSpare(spare);
  }

  /** Stop a spare that will not be used; its overlays are gone with it. */
  private async discardSpare(spare: Spare): Promise<void> {
    await spare.discard();
    await rm(spare.dir, { recursive: true, force: true });
    for (const file of spare.overlays) {
      await rm(file, { force: true });
      this.created.delete(file);
    }
    await this.saveLedger();
  }

  /**
   * Stop the current QEMU for a revert: its state is being thrown away, so it is killed, not
   * asked to quit. Its own directory (a former spare's) goes with it.
   */
  private async stopCurrent(): Promise<void> {
    const { vm, vmDir } = this;
    this.vmDir = undefined;
    await vm.kill({ now: true }).catch(() => undefined); // stop() below reports a QEMU that stays
    await vm.stop();
    if (vmDir) await rm(vmDir, { recursive: true, force: true });
  }

  private qemuPids(): number[] {
    return [this.vm.pid, this.starting, this.spareQemu?.pid].filter((p): p is number => p !== undefined);
  }

  /** Remove the overlays nothing needs any more (`current`: the running QEMU's); returns them. */
  private async collect(current: string[] = this.vm.running ? this.inUse : []): Promise<string[]> {
    const inUse = [...current, ...(this.spareQemu?.overlays ?? [])];
    const garbage = await this.catalog.garbage(this.created, inUse);
    for (const file of garbage) {
      await rm(file, { force: true });
      this.created.delete(file);
    }
    await this.saveLedger();
    return garbage;
  }

  /** Write the ledger (one write at a time: spares record themselves in the background). */
  private saveLedger(): Promise<void> {
    const write = () =>
      writeLedger(this.layout.machineDir, {
        owner: ownerIdentity(),
        checkpointDir: this.layout.checkpointDir,
        qemus: this.qemuPids()
          .map((pid) => processIdentity(pid))
          .filter((q) => q !== undefined),
        files: [...this.created],
      });
    const run = this.ledgerWrites.then(write, write);
    this.ledgerWrites = run.catch(() => undefined);
    return run;
  }

  private onExit = (vm: Vm, info: ExitInfo) => {
    if (vm !== this.vm || this.closed) return;
    const exit: MachineExit = { ...info, pid: vm.pid, logTail: vm.logTail(10) };
    this.emit('exit', exit);
  };

  private watching: Vm | undefined;

  private watch(vm: Vm): void {
    vm.unref();
    this.watching = vm;
    vm.exited.then((info) => {
      if (this.watching === vm) this.onExit(vm, info);
    });
  }

  private unwatch(): void {
    this.watching = undefined;
  }

  private serialized<T>(work: () => Promise<T>): Promise<T> {
    const run = this.queue.then(work, work);
    this.queue = run.catch(() => undefined);
    return run;
  }

  private assertOpen(what: string): void {
    if (this.closed) {
      throw new MachineError('QSNAP_MACHINE_CLOSED', `${what}: the machine was closed`, {
        hint: 'launch a new Machine',
      });
    }
  }

  private assertRunning(what: string): void {
    this.assertOpen(what);
    if (!this.vm.running) {
      throw new MachineError(
        'QSNAP_MACHINE_DEAD',
        `${what}: the machine's QEMU (pid ${this.vm.pid}) exited`,
        {
          hint: 'revert to a checkpoint to start it again, or close the machine',
          details: { pid: this.vm.pid, logTail: this.vm.logTail(10) },
        },
      );
    }
  }

  private unknown(name: string): MachineError {
    return new MachineError('QSNAP_MACHINE_CHECKPOINT_UNKNOWN', `no checkpoint "${name}" on this machine`, {
      hint: 'it was deleted or replaced; machine.checkpoints() lists those there are',
    });
  }
}
