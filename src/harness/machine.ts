import { mkdtemp, rm, statfs } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { TMPFS_MAGIC } from '../engine/ram-protection.js';
import { type RestoreMode, restore } from '../engine/restore/restore.js';
import { type SnapshotResult, snapshot } from '../engine/snapshot/snapshot.js';
import { parseCommandLine } from '../vm/cmdline.js';
import { plainFilename } from '../vm/image-chain.js';
import { Vm } from '../vm/launcher.js';

export interface Checkpoint {
  file: string;
  id: string;
  createdAt: string;
  downtimeMs: number;
  /** Disk layers this checkpoint needs; never deleted while the checkpoint exists. */
  frozenFiles: string[];
}

export interface MachineOptions {
  /** The QEMU command line (binary first, or options only). A QMP socket is added if it has none. */
  argv: string[];
  /**
   * Where checkpoint files go (default: a temp directory removed by close(), on /dev/shm when it
   * has room: a lazily reverted VM maps RAM from the checkpoint file, and only on tmpfs (or
   * hugetlbfs) can such RAM be write-protected for a later checkpoint).
   */
  checkpointDir?: string;
  /** Directory for QEMU's sockets and log (default: a temp directory removed by close()). */
  runDir?: string;
  /** How revert loads RAM (default 'lazy': constant time whatever the RAM size). */
  revertMode?: RestoreMode;
}

async function checkpointBase(): Promise<string> {
  try {
    const fs = await statfs('/dev/shm');
    if (fs.type === TMPFS_MAGIC && fs.bavail * fs.bsize >= 2 * 2 ** 30) return '/dev/shm';
  } catch {
    // no /dev/shm
  }
  return tmpdir();
}

export interface RevertResult {
  restoreMs: number;
  /** Whole revert: stopping the old QEMU, restoring, removing its overlays. */
  revertMs: number;
  pid: number;
}

/**
 * A VM for test harnesses: checkpoint once, revert before each test. Reverting replaces
 * the running QEMU in place — same command line, same QMP socket path — from the
 * checkpoint's file, and removes the disk overlays the replaced QEMU wrote to.
 */
export class Machine {
  private vm: Vm;
  private readonly argv: string[];
  private readonly binary: string;
  private readonly checkpoints: Checkpoint[] = [];
  private readonly ownsCheckpointDir: boolean;
  private readonly ownsRunDir: boolean;
  /** Overlays created for the current QEMU (by checkpoints or reverts): removed when it is replaced. */
  private activeOverlays = new Set<string>();

  private constructor(
    vm: Vm,
    argv: string[],
    binary: string,
    readonly qmpPath: string,
    readonly checkpointDir: string,
    readonly runDir: string,
    private readonly options: MachineOptions,
    owns: { checkpointDir: boolean; runDir: boolean },
  ) {
    this.vm = vm;
    this.argv = argv;
    this.binary = binary;
    this.ownsCheckpointDir = owns.checkpointDir;
    this.ownsRunDir = owns.runDir;
  }

  /** Start QEMU from a command line and wait until it answers QMP. */
  static async launch(options: MachineOptions): Promise<Machine> {
    const parsed = parseCommandLine(options.argv);
    const runDir = options.runDir ? resolve(options.runDir) : await mkdtemp(join(tmpdir(), 'qsnap-machine-'));
    const checkpointDir = options.checkpointDir
      ? resolve(options.checkpointDir)
      : await mkdtemp(join(await checkpointBase(), 'qsnap-checkpoints-'));
    const qmpPath = parsed.qmpSocket ?? join(runDir, 'qmp.sock');
    const options_ = parsed.binary ? options.argv.slice(1) : [...options.argv];
    const argv = parsed.qmpSocket ? options_ : [...options_, '-qmp', `unix:${qmpPath},server=on,wait=off`];
    const binary = parsed.binary ?? 'qemu-system-x86_64';
    const vm = await Vm.launchArgv(argv, { qemuBinary: binary, qmpPath, runDir });
    return new Machine(vm, argv, binary, qmpPath, checkpointDir, runDir, options, {
      checkpointDir: options.checkpointDir === undefined,
      runDir: options.runDir === undefined,
    });
  }

  get pid(): number {
    return this.vm.pid;
  }

  /** The current QEMU (replaced by every revert). */
  get current(): Vm {
    return this.vm;
  }

  /** Take a live snapshot of the running VM. */
  async checkpoint(name = `checkpoint-${this.checkpoints.length + 1}`): Promise<Checkpoint> {
    const result: SnapshotResult = await snapshot({
      qmp: this.qmpPath,
      out: join(this.checkpointDir, `${name}.qsnap`),
      overwrite: true,
      commandLine: [this.binary, ...this.argv],
    }).result;
    for (const disk of result.disks) this.activeOverlays.add(disk.overlayFile);
    const checkpoint: Checkpoint = {
      file: result.file,
      id: result.id,
      createdAt: result.pointInTime,
      downtimeMs: result.downtimeMs,
      frozenFiles: result.disks.map((d) => d.frozenFile),
    };
    this.checkpoints.push(checkpoint);
    return checkpoint;
  }

  /** Replace the running QEMU by a fresh one restored from `checkpoint`. */
  async revert(checkpoint: Checkpoint, options: { mode?: RestoreMode } = {}): Promise<RevertResult> {
    const started = performance.now();
    const replaced = await this.overlaysInUse();
    await this.vm.stop();
    const result = await restore({
      file: checkpoint.file,
      argv: [this.binary, ...this.argv],
      lazy: (options.mode ?? this.options.revertMode ?? 'lazy') === 'lazy',
      runDir: this.runDir,
      attached: true,
    }).result;
    this.vm = result.vm!;
    await this.removeOverlays(replaced);
    this.activeOverlays = new Set(result.disks.map((d) => d.overlayFile));
    return { restoreMs: result.restoreMs, revertMs: performance.now() - started, pid: result.pid };
  }

  /** Stop QEMU and remove what this machine created (overlays, checkpoints, run directory). */
  async close(options: { keepCheckpoints?: boolean } = {}): Promise<void> {
    const overlays = await this.overlaysInUse().catch(() => [...this.activeOverlays]);
    await this.vm.stop();
    await this.removeOverlays(overlays);
    if (!options.keepCheckpoints) {
      for (const cp of this.checkpoints) await rm(cp.file, { force: true });
      // Checkpoint overlays the VM stopped writing to are garbage once the checkpoints are gone.
      if (this.ownsCheckpointDir) await rm(this.checkpointDir, { recursive: true, force: true });
    }
    if (this.ownsRunDir) await rm(this.runDir, { recursive: true, force: true });
  }

  /** Image files the current QEMU writes to that qsnap created. */
  private async overlaysInUse(): Promise<string[]> {
    const blocks = await this.vm.qmp.execute('query-block');
    const files = blocks.flatMap((b) =>
      b.inserted ? [plainFilename(b.inserted.image.filename) ?? b.inserted.image.filename] : [],
    );
    return files.filter((f) => this.activeOverlays.has(f));
  }

  private async removeOverlays(files: string[]): Promise<void> {
    const needed = new Set(this.checkpoints.flatMap((c) => c.frozenFiles));
    for (const file of files) if (!needed.has(file)) await rm(file, { force: true });
  }
}
