// The bench guest: the bundled test guest as a qsnap Machine (so a revert can replace it in
// place), its heartbeats, its workload's progress, and the command line of a stock restore.
import { mkdir, stat } from 'node:fs/promises';
import { GuestConsole } from '../../dist/guest/console.js';
import { testGuestSpec } from '../../dist/guest/test-guest.js';
import { launchTestGuest } from '../../dist/index.js';
import { Vm } from '../../dist/vm/launcher.js';
import { cont } from './qemu.mjs';

/** The workload prints a heartbeat every second of guest time (images/workload/workload.c). */
export const HEARTBEAT_MS = 1000;

export class BenchGuest {
  /** Host arrival times (performance.now()) of the workload's heartbeats. */
  heartbeats = [];

  constructor(options, machine, guestConsole, commandLine) {
    this.options = options;
    this.machine = machine;
    this.commandLine = commandLine;
    this.attach(guestConsole);
  }

  /** Boots the test guest (TCG, 1 vCPU) and waits until its workload runs. */
  static async boot({ dir, memoryMiB, workloadMiB, qemu }) {
    const started = performance.now();
    const {
      machine,
      console: guestConsole,
      commandLine,
    } = await launchTestGuest(dir, {
      memoryMiB,
      workloadMiB,
      accel: 'tcg',
      ...(qemu ? { qemuBinary: qemu } : {}),
    });
    const guest = new BenchGuest({ dir, memoryMiB, workloadMiB, qemu }, machine, guestConsole, commandLine);
    guest.bootSeconds = (performance.now() - started) / 1000;
    return guest;
  }

  attach(guestConsole) {
    this.console = guestConsole;
    guestConsole.onLine((line) => {
      if (line.startsWith('QSNAP-HB ')) this.heartbeats.push(performance.now());
    });
  }

  /** After a revert replaced QEMU: the serial socket is the same path, the connection is new. */
  async reconnect() {
    await this.console.close().catch(() => undefined);
    this.attach(await GuestConsole.connect(this.commandLine.serialSocket));
  }

  get qmp() {
    return this.machine.qmp;
  }

  get pid() {
    return this.machine.pid;
  }

  /** The workload's memory pages in its rewrite cycle. */
  get workloadPages() {
    return (this.options.workloadMiB * 2 ** 20) / 4096;
  }

  /**
   * Pages the workload has written so far, read at one instant: the writers park at their
   * safe points (`hold`), report their progress and go on (`release`).
   */
  async progress() {
    const { epoch, page } = await this.console.hold({ timeoutMs: 60_000 });
    const atMs = performance.now();
    await this.console.release({ timeoutMs: 60_000 });
    return { pages: epoch * this.workloadPages + page, atMs };
  }

  /** Waits for the first heartbeat that arrives after `afterMs`, so a gap ending later is seen. */
  async heartbeatAfter(afterMs) {
    while (!(this.heartbeats.at(-1) > afterMs)) {
      await this.console.nextHeartbeat({ timeoutMs: 30_000 });
    }
  }

  /** The largest gap between two heartbeats around [fromMs, toMs] beyond their 1 s period. */
  heartbeatDelayMs(fromMs, toMs) {
    let gap = 0;
    for (let i = 1; i < this.heartbeats.length; i++) {
      const [a, b] = [this.heartbeats[i - 1], this.heartbeats[i]];
      if (b > fromMs && a < toMs) gap = Math.max(gap, b - a);
    }
    return gap === 0 ? undefined : gap - HEARTBEAT_MS;
  }

  /** Runs the workload's invariant check (memory and disk); true when it holds. */
  async check() {
    return (await this.console.check({ timeoutMs: 120_000 })).ok;
  }

  /** Runs `fn` with the guest paused (`stop`, then `cont` whatever happened). */
  async whilePaused(fn) {
    await this.qmp.execute('stop');
    try {
      return await fn();
    } finally {
      await cont(this.qmp);
    }
  }

  async ensureRunning() {
    const status = await this.qmp.execute('query-status');
    if (!status.running) await cont(this.qmp);
  }

  async close() {
    await this.console?.close().catch(() => undefined);
    await this.machine.close();
  }
}

/**
 * Starts a new QEMU with the guest's command line, its disk an overlay on `frozen`, its
 * sockets in `runDir`, waiting in `-incoming <incoming>`: a stock restore.
 */
export async function launchIncoming(guest, { runDir, disk, incoming }) {
  await mkdir(runDir, { recursive: true });
  const spec = testGuestSpec(runDir, disk, {
    memoryMiB: guest.options.memoryMiB,
    workloadMiB: guest.options.workloadMiB,
    accel: 'tcg',
    ...(guest.options.qemu ? { qemuBinary: guest.options.qemu } : {}),
  });
  return Vm.launch({ ...spec, incoming });
}

/** Size and allocated bytes (st_blocks × 512) of a file. */
export async function fileBytes(file) {
  const s = await stat(file);
  return { sizeBytes: s.size, allocatedBytes: s.blocks * 512 };
}
