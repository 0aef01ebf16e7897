import { type ChildProcess, spawn } from 'node:child_process';
import { closeSync, existsSync, mkdirSync, openSync, readFileSync, rmSync } from 'node:fs';
import { rm } from 'node:fs/promises';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { QmpClient } from '../qmp/index.js';
import { type AccelDecision, isKvmStartupFailure, resolveAccel } from './accel.js';
import { buildArgv } from './args.js';
import { VmError } from './errors.js';
import { childExists } from './process.js';
import { makeRunDir } from './run-dir.js';
import { type ResolvedVmSpec, VmSpec } from './spec.js';

export interface ExitInfo {
  code: number | null;
  signal: NodeJS.Signals | null;
}

export interface LaunchOptions {
  /** Let QEMU outlive this process (restore, `make vm`); otherwise it is killed when we exit. */
  detached?: boolean;
  /** How long QEMU may take to answer QMP. */
  startTimeoutMs?: number;
}

export interface LaunchArgvOptions extends LaunchOptions {
  qemuBinary?: string;
  /** The public QMP socket the argv opens, for users and other qsnap commands. */
  qmpPath: string;
  runDir: string;
  /** Remove runDir when the VM is stopped. */
  ownsRunDir?: boolean;
  serial?: { socket: string; log: string } | undefined;
  accel?: AccelDecision;
}

/**
 * VMs started by this process and not detached: killed by pid if we exit first, and the run
 * directory qsnap made for each (the value) removed.
 */
const liveChildren = new Map<Vm, string | undefined>();
let exitHookInstalled = false;

function installExitHook(): void {
  if (exitHookInstalled) return;
  exitHookInstalled = true;
  process.on('exit', () => {
    for (const [vm, ownedRunDir] of liveChildren) {
      try {
        process.kill(vm.pid, 'SIGKILL');
      } catch {
        // already gone
      }
      if (ownedRunDir) rmSync(ownedRunDir, { recursive: true, force: true });
    }
  });
}

/** The chardev id of qsnap's private control monitor (peer.ts leaves it out of a command line it reads back). */
export const CONTROL_CHARDEV_ID = 'qsnap-control';

/** qsnap's private QMP monitor: QEMU serves one client per socket, so the public one stays free. */
function controlMonitorArgs(controlPath: string): string[] {
  return [
    '-chardev',
    `socket,id=${CONTROL_CHARDEV_ID},path=${controlPath.replaceAll(',', ',,')},server=on,wait=off`,
    '-mon',
    `chardev=${CONTROL_CHARDEV_ID},mode=control`,
  ];
}

/** Start QEMU with its output to `logPath`; resolves once it runs, or throws a coded error. */
async function spawnQemu(
  binary: string,
  argv: string[],
  runDir: string,
  logPath: string,
): Promise<ChildProcess> {
  mkdirSync(runDir, { recursive: true });
  const logFd = openSync(logPath, 'a');
  let child: ChildProcess;
  try {
    child = spawn(binary, argv, { detached: true, stdio: ['ignore', logFd, logFd] });
  } finally {
    closeSync(logFd);
  }
  const spawnError = await new Promise<Error | undefined>((resolve) => {
    child.once('spawn', () => resolve(undefined));
    child.once('error', (err) => resolve(err));
  });
  if (!spawnError) return child;
  const missing = (spawnError as NodeJS.ErrnoException).code === 'ENOENT';
  throw new VmError(
    missing ? 'QSNAP_VM_NO_QEMU' : 'QSNAP_VM_LAUNCH',
    missing ? `${binary} is not installed` : `cannot start ${binary}: ${spawnError.message}`,
    {
      hint: missing
        ? 'install it: apt-get install qemu-system-x86 qemu-utils (or run make setup)'
        : 'check the QEMU binary',
      cause: spawnError,
    },
  );
}

/**
 * A running QEMU process that qsnap started. QEMU serves one client per QMP socket, so the
 * VM gets two monitors: the public `qmpPath` (for users and qsnap commands such as snapshot)
 * and a private control socket that `vm.qmp` stays connected to.
 */
export class Vm {
  readonly pid: number;
  /** The argv as given (what a user would run), without qsnap's private control monitor. */
  readonly argv: readonly string[];
  /** The argv QEMU actually runs with. */
  readonly fullArgv: readonly string[];
  readonly qmpPath: string;
  readonly controlPath: string;
  readonly runDir: string;
  readonly serial: { socket: string; log: string } | undefined;
  readonly accel: AccelDecision | undefined;
  readonly logPath: string;
  /** Resolves when QEMU has exited (whatever the cause). */
  readonly exited: Promise<ExitInfo>;
  qmp!: QmpClient;

  private exitInfo: ExitInfo | undefined;
  private readonly ownsRunDir: boolean;
  private readonly child: ChildProcess;

  private constructor(
    child: ChildProcess,
    argv: string[],
    fullArgv: string[],
    options: LaunchArgvOptions,
    logPath: string,
  ) {
    if (child.pid === undefined) throw new VmError('QSNAP_VM_LAUNCH', 'QEMU could not be started');
    this.pid = child.pid;
    this.child = child;
    this.argv = argv;
    this.fullArgv = fullArgv;
    this.qmpPath = options.qmpPath;
    this.controlPath = join(options.runDir, 'control.sock');
    this.runDir = options.runDir;
    this.serial = options.serial;
    this.accel = options.accel;
    this.ownsRunDir = options.ownsRunDir ?? false;
    this.logPath = logPath;
    this.exited = new Promise((resolve) => {
      child.once('exit', (code, signal) => {
        this.exitInfo = { code, signal };
        liveChildren.delete(this);
        resolve(this.exitInfo);
      });
    });
  }

  /** Launch QEMU from a validated spec and wait until it answers QMP. */
  static async launch(input: VmSpec, options: LaunchOptions = {}): Promise<Vm> {
    const parsed = VmSpec.safeParse(input);
    if (!parsed.success) {
      throw new VmError(
        'QSNAP_VM_SPEC',
        `invalid VM spec: ${parsed.error.issues.map((i) => `${i.path.join('.')}: ${i.message}`).join('; ')}`,
        {
          hint: 'fix the fields named above',
          details: { issues: parsed.error.issues },
        },
      );
    }
    const spec: ResolvedVmSpec = parsed.data;
    const ownsRunDir = spec.runDir === undefined;
    const runDir = spec.runDir ?? (await makeRunDir());
    const accel = await resolveAccel(spec.accel);
    const built = buildArgv(spec, { runDir, accel: accel.accel });
    try {
      return await Vm.launchArgv(built.argv, {
        ...options,
        qemuBinary: spec.qemuBinary,
        qmpPath: built.qmpPath,
        runDir,
        ownsRunDir,
        serial: built.serial,
        accel,
      });
    } catch (err) {
      if (ownsRunDir) await rm(runDir, { recursive: true, force: true });
      throw err;
    }
  }

  /** Launch QEMU from a complete argv (without the binary) that opens `qmpPath`. */
  static async launchArgv(argv: string[], options: LaunchArgvOptions): Promise<Vm> {
    const logPath = join(options.runDir, 'qemu.log');
    const fullArgv = [...argv, ...controlMonitorArgs(join(options.runDir, 'control.sock'))];
    const child = await spawnQemu(
      options.qemuBinary ?? 'qemu-system-x86_64',
      fullArgv,
      options.runDir,
      logPath,
    );
    const vm = new Vm(child, argv, fullArgv, options, logPath);
    if (options.detached) child.unref();
    else {
      installExitHook();
      liveChildren.set(vm, options.ownsRunDir ? options.runDir : undefined);
    }
    try {
      vm.qmp = await vm.waitForQmp(options.startTimeoutMs ?? 30_000);
    } catch (err) {
      await vm.kill();
      if (options.ownsRunDir) await rm(options.runDir, { recursive: true, force: true });
      throw err;
    }
    return vm;
  }

  /**
   * Let this process exit while QEMU runs (a harness that forgot close()): QEMU stays attached
   * and is still killed by the exit hook; only the event loop stops waiting for it.
   */
  unref(): void {
    this.child.unref();
    this.qmp?.unref();
  }

  get running(): boolean {
    return this.exitInfo === undefined;
  }

  /** The last lines QEMU printed on stdout/stderr (for error messages). */
  logTail(lines = 5): string {
    try {
      return readFileSync(this.logPath, 'utf8').trimEnd().split('\n').slice(-lines).join('\n');
    } catch {
      return '';
    }
  }

  /** Why QEMU exited before it answered QMP, in its own words. */
  private startupError(): VmError {
    const tail = this.logTail(3).replaceAll('\n', ' | ');
    const details = { log: this.logPath, argv: this.fullArgv };
    if (isKvmStartupFailure(this.fullArgv, tail)) {
      return new VmError('QSNAP_VM_ACCEL', `QEMU could not use KVM: ${tail}`, {
        hint: 'check that /dev/kvm exists and is usable by this user, or run under TCG (QSNAP_ACCEL=tcg, or accel: tcg)',
        details,
      });
    }
    return new VmError(
      'QSNAP_VM_LAUNCH',
      `QEMU exited during start-up (code ${this.exitInfo?.code})${tail ? `: ${tail}` : ''}`,
      { hint: 'check the QEMU command line and the message above', details },
    );
  }

  private async waitForQmp(timeoutMs: number): Promise<QmpClient> {
    const deadline = Date.now() + timeoutMs;
    let lastError: unknown;
    while (Date.now() < deadline) {
      if (!this.running) throw this.startupError();
      if (existsSync(this.controlPath)) {
        try {
          return await QmpClient.connect(this.controlPath, {
            connectTimeoutMs: Math.max(1000, deadline - Date.now()),
          });
        } catch (err) {
          lastError = err;
        }
      }
      // QEMU creates its monitor socket some 20–50 ms after exec: a fine poll costs a stat.
      await sleep(1);
    }
    throw new VmError(
      'QSNAP_VM_LAUNCH',
      `QEMU did not answer QMP on ${this.controlPath} within ${timeoutMs} ms`,
      {
        hint: 'the host may be overloaded; check the QEMU log',
        cause: lastError,
        details: { log: this.logPath },
      },
    );
  }

  /**
   * Stop QEMU: QMP `quit`, then SIGTERM, then SIGKILL, by pid. Idempotent. Removes the
   * run directory when qsnap made it.
   */
  async stop(options: { timeoutMs?: number } = {}): Promise<ExitInfo> {
    const graceMs = options.timeoutMs ?? 5000;
    if (this.running) {
      try {
        await this.qmp?.execute('quit', undefined, { timeoutMs: graceMs });
      } catch {
        // QEMU may close the socket before replying, or be wedged: the signals below handle it.
      }
      if (!(await this.waitExit(graceMs))) await this.kill();
    }
    await this.qmp?.close();
    if (this.ownsRunDir) await rm(this.runDir, { recursive: true, force: true });
    return this.exitInfo ?? { code: null, signal: 'SIGKILL' };
  }

  /**
   * SIGTERM, then SIGKILL; resolves once the process is gone. `{ now: true }` skips the SIGTERM
   * (a QEMU whose state is thrown away: a revert replaces it).
   */
  async kill(options: { now?: boolean } = {}): Promise<void> {
    const signals = options.now ? (['SIGKILL'] as const) : (['SIGTERM', 'SIGKILL'] as const);
    for (const signal of signals) {
      if (!this.running) return;
      try {
        process.kill(this.pid, signal);
      } catch {
        // gone between the check and the signal
      }
      if (await this.waitExit(signal === 'SIGTERM' ? 3000 : 5000)) return;
    }
    if (this.running && childExists(this.pid)) {
      throw new VmError('QSNAP_VM_STOP', `QEMU pid ${this.pid} did not exit after SIGKILL`, {
        hint: 'the process may be stuck in the kernel (D state); check it with ps',
      });
    }
  }

  private async waitExit(timeoutMs: number): Promise<boolean> {
    if (!this.running) return true;
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<false>((resolve) => {
      timer = setTimeout(() => resolve(false), timeoutMs);
    });
    const done = await Promise.race([this.exited.then(() => true as const), timeout]);
    clearTimeout(timer);
    return done;
  }
}
