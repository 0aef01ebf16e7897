/**
 * Machine, as a harness author uses it: one guest booted per file, checkpoints taken and
 * reverted to. Each reset is shown against a negative control (without a revert the changed
 * state survives); a revert after the QEMU was SIGKILLed; reverts to a missing or mismatched
 * checkpoint leave the running guest untouched; the checkpoint lifecycle; 4 clones of one
 * checkpoint at once; close() leaves nothing.
 */
import { existsSync, lstatSync, readdirSync, rmSync } from 'node:fs';
import { basename, join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { launchTestGuest } from '../../src/harness/test-guest.js';
import { type Checkpoint, GuestConsole, Machine, type MachineExit, QmpClient } from '../../src/index.js';
import { canRun, QEMU } from '../support/env.js';
import { childrenOf, isAlive, waitUntil } from '../support/process.js';
import { openSandbox, type Sandbox } from '../support/sandbox.js';

/**
 * A CMOS byte (0x50) qsnap's test guest never uses: a device register set from the host over
 * HMP. The guest is paused around it: its kernel selects CMOS registers too (the RTC).
 */
async function cmos(machine: Machine, value?: number): Promise<number> {
  await machine.hmp('stop');
  try {
    await machine.hmp('o /b 0x70 0x50');
    if (value !== undefined) await machine.hmp(`o /b 0x71 0x${value.toString(16)}`);
    const out = await machine.hmp('i /b 0x71');
    return Number.parseInt(/0x([0-9a-f]+)\s*$/i.exec(out.trim())![1]!, 16);
  } finally {
    await machine.hmp('cont');
  }
}

async function writeCmos(machine: Machine, value: number): Promise<void> {
  expect(await cmos(machine, value)).toBe(value);
}

async function readCmos(machine: Machine): Promise<number> {
  return cmos(machine);
}

async function heartbeat(guestConsole: GuestConsole): Promise<number> {
  for (;;) {
    const line = await guestConsole.waitReady({ timeoutMs: 30_000 });
    if (line.kind === 'heartbeat') return line.n;
  }
}

function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.floor(sorted.length / 2)]!;
}

function p95(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.min(sorted.length - 1, Math.ceil(sorted.length * 0.95) - 1)]!;
}

describe.skipIf(!canRun)('Machine', () => {
  let sandbox: Sandbox;
  let machine: Machine;
  let guestConsole: GuestConsole;
  let serialSocket: string;
  let guestDir: string;
  let clean: Checkpoint;
  const pids = new Set<number>();
  const exits: MachineExit[] = [];

  async function reconnect(): Promise<void> {
    await guestConsole?.close().catch(() => undefined);
    guestConsole = await GuestConsole.connect(serialSocket, { timeoutMs: 15_000 });
    await guestConsole.waitReady({ timeoutMs: 30_000 });
  }

  /** The qcow2 files beside the disk, but the warm spare's (it comes and goes with reverts). */
  function layers(): string[] {
    const spare = new Set((machine.spare?.overlays ?? []).map((f) => basename(f)));
    return readdirSync(guestDir).filter((f) => f.endsWith('.qcow2') && !spare.has(f));
  }

  async function revert(to: Checkpoint): Promise<void> {
    await guestConsole.close();
    const r = await machine.revert(to);
    pids.add(r.pid);
    await reconnect();
  }

  beforeAll(async () => {
    sandbox = await openSandbox('machine');
    guestDir = join(sandbox.root, 'guest');
    const launched = await launchTestGuest(guestDir, { accel: 'tcg' });
    machine = launched.machine;
    guestConsole = launched.console;
    serialSocket = launched.commandLine.serialSocket;
    pids.add(machine.pid);
    machine.on('exit', (exit: MachineExit) => exits.push(exit));
    await writeCmos(machine, 0x11);
    clean = await machine.checkpoint('clean');
  }, 180_000);

  afterAll(async () => {
    await guestConsole?.close().catch(() => undefined);
    await machine?.close();
    try {
      if (machine) {
        expect([...pids].filter(isAlive), 'QEMU processes left').toEqual([]);
        expect(await childrenOf(process.pid), 'child processes left (a warm spare)').toEqual([]);
        expect(existsSync(machine.runDir), 'run directory').toBe(false);
        expect(existsSync(machine.checkpointDir), 'checkpoint directory').toBe(false);
        expect(
          readdirSync(guestDir).filter((f) => f.endsWith('.qcow2')),
          'overlays beside the disk',
        ).toEqual(['disk.qcow2']);
      }
    } finally {
      await sandbox?.dispose();
    }
  }, 60_000);

  it('memory: a corruption survives without a revert (control) and is gone after one', async () => {
    await guestConsole.hold();
    await guestConsole.corrupt('mem', 'pattern');
    expect((await guestConsole.check()).ok).toBe(false);
    // Control: still broken a moment later, without a revert.
    expect((await guestConsole.check()).reason).toBe('mem-pattern');
    await revert(clean);
    expect((await guestConsole.check()).ok).toBe(true);
  });

  it('disk: a corrupted record survives without a revert (control) and is gone after one', async () => {
    await guestConsole.hold();
    await guestConsole.corrupt('disk', 'nonce');
    const broken = await guestConsole.check();
    expect(broken.ok).toBe(false);
    expect(broken.reason).toMatch(/^disk-/);
    expect((await guestConsole.check()).ok).toBe(false);
    await revert(clean);
    expect((await guestConsole.check()).ok).toBe(true);
  });

  it('a device register (a CMOS byte set over HMP) keeps its value without a revert (control), is reset by one', async () => {
    await writeCmos(machine, 0x5a);
    expect(await readCmos(machine)).toBe(0x5a);
    await new Promise((r) => setTimeout(r, 200));
    expect(await readCmos(machine)).toBe(0x5a);
    await revert(clean);
    expect(await readCmos(machine)).toBe(0x11);
  });

  it('guest time: it runs on without a revert (control) and goes back to the checkpoint with one', async () => {
    const before = await heartbeat(guestConsole);
    await new Promise((r) => setTimeout(r, 3000));
    const later = await heartbeat(guestConsole);
    expect(later - before).toBeGreaterThanOrEqual(2);
    await revert(clean);
    const after = await heartbeat(guestConsole);
    expect(after).toBeLessThan(later - 1);
  });

  it('the public QMP socket stays free: a harness holds its own client while qsnap checkpoints', async () => {
    const own = await QmpClient.connect(machine.qmpPath, { connectTimeoutMs: 5000 });
    try {
      const cp = await machine.checkpoint('while-held');
      expect(await own.execute('query-status')).toMatchObject({ running: true });
      expect(cp.downtimeMs).toBeLessThan(1000);
      await machine.deleteCheckpoint(cp);
    } finally {
      await own.close();
    }
    expect(await machine.qmp.execute('query-status')).toMatchObject({ running: true });
  });

  it('revert to a missing or mismatched checkpoint fails before touching the running guest', async () => {
    const pid = machine.pid;
    await writeCmos(machine, 0x77);
    const doomed = await machine.checkpoint('doomed');
    rmSync(doomed.file);
    await expect(machine.revert(doomed)).rejects.toMatchObject({ code: 'QSNAP_MACHINE_CHECKPOINT_MISSING' });
    // A checkpoint of another VM (128 MiB, no disk): the RAM size does not fit.
    const other = await Machine.launch({
      argv: [
        QEMU,
        '-machine',
        'pc-i440fx-7.2',
        '-accel',
        'tcg',
        '-m',
        '128M',
        '-display',
        'none',
        '-nodefaults',
      ],
    });
    try {
      const foreign = await other.checkpoint('foreign');
      await expect(machine.revert(foreign)).rejects.toMatchObject({
        code: 'QSNAP_MACHINE_CHECKPOINT_MISMATCH',
      });
    } finally {
      await other.close();
    }
    // A checkpoint whose id does not match its file (the file replaced behind qsnap's back).
    await expect(
      machine.revert({ ...clean, id: '00000000-0000-4000-8000-000000000000' }),
    ).rejects.toMatchObject({
      code: 'QSNAP_MACHINE_CHECKPOINT_MISMATCH',
    });
    // Untouched: same QEMU, running, its state as set, and an intact checkpoint still reverts.
    expect(machine.pid).toBe(pid);
    expect(machine.state).toBe('running');
    expect(await readCmos(machine)).toBe(0x77);
    expect((await guestConsole.check()).ok).toBe(true);
    await machine.deleteCheckpoint(doomed);
    await revert(clean);
    expect(await readCmos(machine)).toBe(0x11);
  });

  it('revert after the QEMU was SIGKILLed: state dead, an exit event, DEAD errors, then a working revert', async () => {
    const pid = machine.pid;
    process.kill(pid, 'SIGKILL');
    await new Promise<void>((resolve) => machine.once('exit', () => resolve()));
    expect(machine.state).toBe('dead');
    expect(exits.at(-1)).toMatchObject({ pid, signal: 'SIGKILL' });
    await expect(machine.checkpoint('x')).rejects.toMatchObject({ code: 'QSNAP_MACHINE_DEAD' });
    await expect(machine.hmp('info status')).rejects.toMatchObject({ code: 'QSNAP_MACHINE_DEAD' });
    await guestConsole.close();
    const r = await machine.revert(clean);
    pids.add(r.pid);
    expect(r.previous).toEqual({ pid, was: 'dead' });
    expect(machine.state).toBe('running');
    await reconnect();
    expect((await guestConsole.check()).ok).toBe(true);
  });

  it('checkpoints: validated unique names, a list, revert in any order, delete frees files and overlays', async () => {
    await expect(machine.checkpoint('../escape')).rejects.toMatchObject({ code: 'QSNAP_STORE_NAME' });
    expect(existsSync('/dev/shm/escape.qsnap')).toBe(false);
    await expect(machine.checkpoint('clean')).rejects.toMatchObject({
      code: 'QSNAP_MACHINE_CHECKPOINT_EXISTS',
    });
    await writeCmos(machine, 0x01);
    const one = await machine.checkpoint('one');
    await writeCmos(machine, 0x02);
    const two = await machine.checkpoint('two');
    await writeCmos(machine, 0x03);
    const twoAgain = await machine.checkpoint('two', { overwrite: true });
    expect(existsSync(two.file), 'the overwritten checkpoint file').toBe(false);
    expect(machine.checkpoints().map((c) => c.name)).toEqual(['clean', 'one', 'two']);
    for (const [cp, value] of [
      [twoAgain, 0x03],
      [one, 0x01],
      [clean, 0x11],
      [twoAgain, 0x03],
    ] as const) {
      await revert(cp);
      expect(await readCmos(machine), cp.name).toBe(value);
    }
    await expect(machine.revert(two)).rejects.toMatchObject({ code: 'QSNAP_MACHINE_CHECKPOINT_UNKNOWN' });
    // The running VM was reverted to "two": the layers below it stay while it runs on them.
    const { removed } = await machine.deleteCheckpoint(one);
    expect(existsSync(one.file)).toBe(false);
    expect(removed).toEqual([one.file]);
    expect((await guestConsole.check()).ok).toBe(true);
    await revert(clean);
    const layersBefore = layers();
    const deleted = await machine.deleteCheckpoint(twoAgain);
    // Now nothing needs the layers of "one" and "two": only the disk and the overlay the VM
    // writes to stay.
    expect(deleted.removed.length).toBeGreaterThan(1);
    const layersAfter = layers();
    expect(layersAfter.length).toBe(2);
    expect(layersBefore.length).toBeGreaterThan(layersAfter.length);
    expect(machine.checkpoints().map((c) => c.name)).toEqual(['clean']);
    expect((await guestConsole.check()).ok).toBe(true);
    await revert(clean);
    expect((await guestConsole.check()).ok).toBe(true);
    expect(layers().length).toBe(2);
  });

  it('reverts: time per revert, and the pause of a checkpoint taken right after one', async () => {
    const times: number[] = [];
    for (let i = 0; i < 6; i++) {
      const r = await machine.revert(clean);
      pids.add(r.pid);
      times.push(r.revertMs);
    }
    // A full revert (RAM loaded, not mapped) takes seconds on TCG: not timed here (docs/harness.md has its figure).
    const pauses: number[] = [];
    for (let i = 0; i < 2; i++) {
      await machine.revert(clean);
      pids.add(machine.pid);
      const cp = await machine.checkpoint(`after-revert-${i}`);
      pauses.push(cp.downtimeMs);
      await machine.deleteCheckpoint(cp);
    }
    console.log(
      `revert: median ${median(times).toFixed(0)} ms, p95 ${p95(times).toFixed(0)} ms (lazy, 256 MiB, TCG); ` +
        `checkpoint pause of the booted guest ${clean.downtimeMs.toFixed(1)} ms, right after a lazy revert ` +
        `${pauses.map((d) => d.toFixed(1)).join(', ')} ms`,
    );
    await reconnect();
    expect((await guestConsole.check()).ok).toBe(true);
  });

  it('warm spare: a revert to the checkpoint last reverted to is taken over by a QEMU started ahead', async () => {
    await revert(clean);
    await waitUntil(() => machine.spare?.pid !== undefined, 30_000, 'the spare QEMU to start');
    const spare = machine.spare!;
    expect(spare.checkpoint).toBe('clean');
    pids.add(spare.pid!);
    await guestConsole.hold();
    await guestConsole.corrupt('mem', 'pattern');
    expect((await guestConsole.check()).ok).toBe(false);
    await guestConsole.close();
    await waitUntil(() => machine.spare?.ready === true, 30_000, 'the spare to wait for its state');
    const warm = await machine.revert(clean);
    expect(warm.warm).toBe(true);
    expect(warm.pid).toBe(spare.pid);
    // The public paths lead to it: the serial socket (a symlink now) and the harness's QMP socket.
    expect(lstatSync(serialSocket).isSymbolicLink()).toBe(true);
    await reconnect();
    expect((await guestConsole.check()).ok).toBe(true);
    expect(await readCmos(machine)).toBe(0x11);
    const own = await QmpClient.connect(machine.qmpPath);
    try {
      expect(await own.execute('query-status')).toMatchObject({ running: true });
    } finally {
      await own.close();
    }
    // Timed: reverts with the spare ready, as between tests (the guest runs 200 ms in between).
    const times: number[] = [warm.revertMs];
    for (let i = 0; i < 4; i++) {
      await waitUntil(() => machine.spare?.ready === true, 30_000, 'the spare to be ready');
      await new Promise((r) => setTimeout(r, 200));
      const r = await machine.revert(clean);
      expect(r.warm).toBe(true);
      pids.add(r.pid);
      times.push(r.revertMs);
    }
    console.log(
      `warm revert: median ${median(times).toFixed(0)} ms, max ${Math.max(...times).toFixed(0)} ms (lazy, 256 MiB, TCG)`,
    );
    await reconnect();
    expect((await guestConsole.check()).ok).toBe(true);
    // The next spare is another QEMU. Killed, it is passed over: the revert starts one as usual.
    await waitUntil(
      () => machine.spare?.pid !== undefined && !pids.has(machine.spare.pid),
      30_000,
      'the next spare QEMU to start',
    );
    const next = machine.spare!;
    pids.add(next.pid!);
    process.kill(next.pid!, 'SIGKILL');
    await waitUntil(() => !isAlive(next.pid!), 5000, 'the spare to die');
    await guestConsole.close();
    const cold = await machine.revert(clean);
    expect(cold.warm).toBe(false);
    pids.add(cold.pid);
    expect(lstatSync(serialSocket).isSymbolicLink(), 'the cold QEMU binds the public path itself').toBe(
      false,
    );
    for (const file of next.overlays) expect(existsSync(file), 'the dead spare overlay').toBe(false);
    await reconnect();
    expect((await guestConsole.check()).ok).toBe(true);
  });

  it('4 clones of one checkpoint run at once, each its own QEMU and sockets, each passing the check', async () => {
    await guestConsole.close();
    await machine.revert(clean);
    pids.add(machine.pid);
    await reconnect();
    const started = performance.now();
    const clones = await Promise.all([0, 1, 2, 3].map(() => Machine.fromCheckpoint(clean)));
    const startMs = performance.now() - started;
    try {
      for (const clone of clones) pids.add(clone.pid);
      expect(new Set(clones.map((c) => c.pid)).size).toBe(4);
      expect(new Set(clones.map((c) => c.qmpPath)).size).toBe(4);
      expect(clones.map((c) => c.socketPath(serialSocket))).not.toContain(serialSocket);
      const consoles = await Promise.all(
        clones.map((c) => GuestConsole.connect(c.socketPath(serialSocket), { timeoutMs: 15_000 })),
      );
      try {
        // One clone breaks its memory: only that clone fails its check (they are independent).
        await consoles[0]!.waitReady({ timeoutMs: 30_000 });
        await consoles[0]!.hold();
        await consoles[0]!.corrupt('mem', 'pattern');
        const checks = await Promise.all(consoles.map((c) => c.check({ timeoutMs: 60_000 })));
        expect(checks.map((c) => c.ok)).toEqual([false, true, true, true]);
        expect(await readCmos(clones[1]!)).toBe(0x11);
        // The clone reverts on its own, to the same checkpoint.
        await consoles[0]!.close();
        await clones[0]!.revert(clean);
        pids.add(clones[0]!.pid);
        consoles[0] = await GuestConsole.connect(clones[0]!.socketPath(serialSocket), { timeoutMs: 15_000 });
        await consoles[0].waitReady({ timeoutMs: 30_000 });
        expect((await consoles[0].check({ timeoutMs: 60_000 })).ok).toBe(true);
      } finally {
        await Promise.all(consoles.map((c) => c.close().catch(() => undefined)));
      }
      console.log(`4 clones started in ${startMs.toFixed(0)} ms (in parallel, lazy)`);
    } finally {
      await Promise.all(clones.map((c) => c.close()));
    }
    expect(clones.map((c) => existsSync(c.runDir))).toEqual([false, false, false, false]);
    // The source machine is unaffected.
    expect((await guestConsole.check()).ok).toBe(true);
  });

  it('signal and timeoutMs: an aborted or timed-out checkpoint or revert is undone', async () => {
    const before = {
      names: machine.checkpoints().map((c) => c.name),
      files: readdirSync(machine.checkpointDir),
      layers: layers(),
      pid: machine.pid,
    };
    const aborted = new AbortController();
    aborted.abort();
    await expect(machine.checkpoint('a', { signal: aborted.signal })).rejects.toMatchObject({
      code: 'QSNAP_MACHINE_ABORTED',
    });
    await expect(machine.revert(clean, { signal: aborted.signal })).rejects.toMatchObject({
      code: 'QSNAP_MACHINE_ABORTED',
    });
    // Cut short while RAM streams: the snapshot is cancelled and the VM put back as it was.
    await expect(machine.checkpoint('b', { timeoutMs: 300 })).rejects.toMatchObject({
      code: 'QSNAP_MACHINE_TIMEOUT',
    });
    expect(machine.checkpoints().map((c) => c.name)).toEqual(before.names);
    expect(readdirSync(machine.checkpointDir)).toEqual(before.files);
    expect(layers()).toEqual(before.layers);
    expect(machine.pid).toBe(before.pid);
    expect(await machine.qmp.execute('query-status')).toMatchObject({ running: true });
    expect((await guestConsole.check()).ok).toBe(true);
  });

  it('after close(), calls fail with QSNAP_MACHINE_CLOSED; close() is idempotent; await using closes', async () => {
    let disposed: Machine | undefined;
    {
      await using clone = await Machine.fromCheckpoint(clean);
      disposed = clone;
      pids.add(clone.pid);
      expect(clone.state).toBe('running');
    }
    expect(disposed.state).toBe('closed');
    expect(isAlive(disposed.pid)).toBe(false);
    await disposed.close();
    await expect(disposed.revert(clean)).rejects.toMatchObject({ code: 'QSNAP_MACHINE_CLOSED' });
    await expect(disposed.checkpoint('x')).rejects.toMatchObject({ code: 'QSNAP_MACHINE_CLOSED' });
    expect(() => disposed.qmp).toThrow(expect.objectContaining({ code: 'QSNAP_MACHINE_CLOSED' }));
  });
});
