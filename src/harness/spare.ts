import { randomBytes } from 'node:crypto';
import { lstat, rename, rm, symlink } from 'node:fs/promises';
import { join } from 'node:path';
import type { RestoreResult } from '../engine/restore/restore.js';
import { parseCommandLine } from '../vm/cmdline.js';
import { relocateSockets } from '../vm/cmdline-rewrite.js';
import { isRunning, type ProcessIdentity, processIdentity } from '../vm/process.js';
import { joinArgv } from '../vm/qemu-opts.js';
import type { Checkpoint } from './checkpoints.js';
import { restoreWithin } from './restore-within.js';

/**
 * A warm spare: the next revert's QEMU, started ahead while the tests run. It is a lazy restore
 * of one checkpoint held just before its state is sent: QEMU launched with `-incoming defer`,
 * RAM mapped from the checkpoint file, a fresh overlay on each of the checkpoint's frozen
 * layers, checked and listening for the stream. A revert to that checkpoint then only stops
 * the old QEMU, sends the device state (milliseconds: the RAM is mapped, not sent) and resumes.
 *
 * The spare cannot bind the machine's socket paths while the old QEMU still serves them, so
 * its sockets and pidfile are relocated into its own directory (like a clone's) and, once it
 * takes over, each public path becomes a symlink to the spare's (connect(2) follows symlinks):
 * the harness keeps its paths. Nothing here outlives the machine: the spare's pid and overlays
 * are in the machine's ledger, its directory is inside the machine's run directory.
 */
export class Spare {
  /** Public path → the spare's own, for every relocated socket and pidfile. */
  readonly moved: Map<string, string>;
  /** Resolves once the held restore's QEMU waits for the stream; rejects if it failed first. */
  readonly ready: Promise<void>;
  pid: number | undefined;
  /** Its QEMU waits for the stream: a revert now takes it over at once. */
  waiting = false;
  /** The QEMU's pid and start time: a dead spare is never mistaken for a process that took its pid. */
  identity: ProcessIdentity | undefined;
  overlays: string[] = [];
  private release: (go: boolean) => void = () => undefined;
  private readonly restored: Promise<RestoreResult>;

  private constructor(
    readonly checkpoint: Checkpoint,
    readonly dir: string,
    argv: string[],
    hooks: SpareHooks,
  ) {
    const relocated = relocateSockets(parseCommandLine(argv), dir);
    this.moved = relocated.moved;
    const spareArgv = joinArgv(relocated.parsed.entries);
    const gate = new Promise<boolean>((resolve) => {
      this.release = resolve;
    });
    let onReady: () => void = () => undefined;
    let onFailed: (err: unknown) => void = () => undefined;
    this.ready = new Promise<void>((resolve, reject) => {
      onReady = resolve;
      onFailed = reject;
    });
    this.ready.catch(() => undefined);
    this.restored = restoreWithin(
      'warm spare',
      {},
      {
        file: checkpoint.file,
        argv: [checkpoint.binary, ...spareArgv],
        lazy: true,
        runDir: dir,
        attached: true,
        onPlanned: async (planned) => {
          this.overlays = planned.overlays;
          await hooks.onPlanned(planned.overlays);
        },
        onLaunched: async (qemu) => {
          this.pid = qemu.pid;
          this.identity = processIdentity(qemu.pid);
          // An idle spare never keeps the harness's process alive (the exit hook still kills it).
          qemu.unref();
          await hooks.onLaunched(qemu.pid);
        },
        beforeLoad: async () => {
          this.waiting = true;
          onReady();
          if (!(await gate)) throw new Error('the warm spare was discarded');
        },
      },
    );
    this.restored.catch(onFailed);
  }

  /** Start a spare of `checkpoint` in a new directory under `runDir` (restore makes it). */
  static start(checkpoint: Checkpoint, runDir: string, argv: string[], hooks: SpareHooks): Spare {
    // Short: the sockets moved into it must stay within a unix socket path's 107 bytes.
    return new Spare(checkpoint, join(runDir, `s-${randomBytes(3).toString('hex')}`), argv, hooks);
  }

  /** Resolves once the spare is ready or failed, or after `timeoutMs`, whichever comes first. */
  async settled(timeoutMs: number): Promise<void> {
    let timer: NodeJS.Timeout | undefined;
    await Promise.race([
      this.ready.catch(() => undefined),
      new Promise<void>((resolve) => {
        timer = setTimeout(resolve, timeoutMs);
      }),
    ]);
    clearTimeout(timer);
  }

  /**
   * Whether this spare can take over now, waiting for it if it is still starting: false when it
   * failed to start or its QEMU died meanwhile (the revert then starts a QEMU the usual way).
   */
  async usable(): Promise<boolean> {
    try {
      await this.ready;
    } catch {
      return false;
    }
    return this.identity !== undefined && isRunning(this.identity);
  }

  /**
   * Send the state and resume: call with the old QEMU stopped. The public paths point at the
   * spare's sockets before its guest runs, so whatever the guest does first reaches the harness.
   */
  async takeOver(): Promise<RestoreResult> {
    for (const [publicPath, own] of this.moved) await pointAt(publicPath, own);
    this.release(true);
    return this.restored;
  }

  /**
   * Stop the spare's QEMU and let restore remove its overlays (a spare that failed to take over
   * has done so already). Its directory is the caller's to remove. Idempotent.
   */
  async discard(): Promise<void> {
    this.release(false);
    await this.restored.catch(() => undefined);
  }
}

export interface SpareHooks {
  /** The overlays it is about to make (before any exists). */
  onPlanned(overlays: string[]): Promise<void>;
  /** Its QEMU answered. */
  onLaunched(pid: number): Promise<void>;
}

/** Replace `publicPath` (a socket, a pidfile or an older symlink) by a symlink to `target`, atomically. */
async function pointAt(publicPath: string, target: string): Promise<void> {
  const temp = `${publicPath}.qsnap-${randomBytes(4).toString('hex')}`;
  await symlink(target, temp);
  try {
    await rename(temp, publicPath);
  } catch (err) {
    await rm(temp, { force: true });
    throw err;
  }
}

/**
 * Remove the symlinks a spare that took over left at the public socket and pidfile paths of
 * `argv`, so that a QEMU started the usual way creates them again (it would follow a pidfile
 * symlink into a directory that is gone).
 */
export async function removePublicLinks(argv: string[]): Promise<void> {
  for (const publicPath of relocateSockets(parseCommandLine(argv), '/').moved.keys()) {
    try {
      if ((await lstat(publicPath)).isSymbolicLink()) await rm(publicPath, { force: true });
    } catch {
      // not there
    }
  }
}
