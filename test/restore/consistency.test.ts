/**
 * The proof that a restore brings back RAM and disk from one instant: the test guest's workload
 * (src/guest/console.ts, images/workload/workload.c) keeps an invariant over memory pages, its
 * progress counters and a disk record ring that only a true point-in-time pair of RAM and disk
 * satisfies, and `check()` verifies all of it inside the restored guest.
 *
 * 1. A chain: boot → snapshot → restore → snapshot the restored guest → restore … ten times,
 *    full and lazy mixed, the workload rewriting memory and disk at full speed throughout, and
 *    `check()` after every restore.
 * 2. Negative controls, same `check()`: (a) RAM copied with plain reads while the guest ran,
 *    paired with device state and disk saved afterwards; (b) a snapshot's RAM with a disk
 *    frozen seconds later. Both must FAIL, or the positive results above prove nothing.
 *
 * Lazy-restored guests map the snapshot file privately; QEMU can only write-protect such RAM
 * for the next background snapshot when the file is on tmpfs (userfaultfd-wp covers anonymous
 * and shmem memory, not ext4 pages), so the chain's snapshots live in /dev/shm.
 */
import { open, rm } from 'node:fs/promises';
import { basename, join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { openSnapshot } from '../../src/format/index.js';
import type { GuestConsole } from '../../src/guest/console.js';
import { bootTestGuest, type TestGuest } from '../../src/guest/test-guest.js';
import { exportStream, type RestoreResult, restore, snapshot } from '../../src/index.js';
import { Vm } from '../../src/vm/launcher.js';
import { canRun } from '../support/env.js';
import { MiB } from '../support/files.js';
import { chardevPath, connectConsole, expectCheckOk, QemuRegister } from '../support/guest.js';
import { openSandbox, type Sandbox } from '../support/sandbox.js';
import { createOverlay, moveArgv, waitLoadedThenCont } from './helpers.js';

const CYCLES: ('full' | 'lazy')[] = [
  'full',
  'lazy',
  'lazy',
  'full',
  'full',
  'lazy',
  'full',
  'lazy',
  'lazy',
  'full',
];

interface CycleRow {
  cycle: number;
  mode: string;
  memMibps: number;
  diskIops: number;
  downtimeMs: number;
  restoreMs: number;
  loadMs: number;
  check: string;
}

describe.skipIf(!canRun)('restore is point-in-time: snapshot → restore chains and negative controls', () => {
  let scratch: Sandbox;
  const qemus = new QemuRegister();
  const consoles = new Set<GuestConsole>();
  let guest: TestGuest;
  /** The QEMU the chain runs on now (the booted guest, then each restored one). */
  let current: { vm: Vm; console: GuestConsole };

  beforeAll(async () => {
    scratch = await openSandbox('consistency');
    guest = await bootTestGuest({ dir: join(scratch.root, 'guest'), accel: 'tcg' });
    qemus.add(guest.vm);
    consoles.add(guest.console);
    current = { vm: guest.vm, console: guest.console };
  });

  afterAll(async () => {
    for (const c of consoles) await c.close().catch(() => undefined);
    await qemus.stopAll();
    await scratch?.dispose();
  });

  /** Stop the QEMU the chain runs on: its successor binds the same socket paths. */
  async function stopCurrent(): Promise<void> {
    await current.console.close();
    consoles.delete(current.console);
    await qemus.stop(current.vm);
  }

  async function restoreAttached(file: string, argv: string[], lazy: boolean): Promise<RestoreResult> {
    const result = await restore({ file, argv, lazy, attached: true }).result;
    qemus.add(result.vm!);
    return result;
  }

  it(`${CYCLES.length} snapshot → restore cycles, full and lazy mixed, each restored guest snapshotted again: check() passes after every restore`, async () => {
    const rows: CycleRow[] = [];
    let previousSnapshot: string | undefined;
    for (const [i, mode] of CYCLES.entries()) {
      // The workload runs at full speed right up to the snapshot: a fresh heartbeat shows both writers moving.
      const hb = await current.console.nextHeartbeat({ timeoutMs: 20_000 });
      expect(hb.memMibps, `cycle ${i}: ${hb.line}`).toBeGreaterThan(0);
      expect(hb.diskIops, `cycle ${i}: ${hb.line}`).toBeGreaterThan(0);
      expect(hb.latchedFailures, `cycle ${i}: ${hb.line}`).toBe(0);

      const file = join(scratch.shm, `chain-${i}.qsnap`);
      const snap = await snapshot({ qmp: current.vm.qmpPath, out: file }).result;
      expect(snap.strategy).toBe('background-snapshot');
      await stopCurrent();

      const restored = await restoreAttached(file, guest.argv, mode === 'lazy');
      expect(restored).toMatchObject({ mode, runState: 'running', qmp: guest.vm.qmpPath });
      // Names do not grow along the chain (the frozen layer is itself a restore overlay).
      expect(basename(restored.disks[0]!.overlayFile)).toMatch(/^disk\.restore-[0-9a-f]{8}\.qcow2$/);
      const restoredConsole = await connectConsole(chardevPath(guest.argv));
      consoles.add(restoredConsole);
      current = { vm: restored.vm!, console: restoredConsole };

      const check = await expectCheckOk(restoredConsole, `cycle ${i} (${mode})`);
      rows.push({
        cycle: i,
        mode,
        memMibps: hb.memMibps,
        diskIops: hb.diskIops,
        downtimeMs: Math.round(snap.downtimeMs),
        restoreMs: Math.round(restored.restoreMs),
        loadMs: Math.round(restored.loadMs),
        check: `epoch=${check.fields['epoch']} rec=${check.fields['rec']}`,
      });
      // The QEMU that mapped the previous file is gone; the current one may map this one.
      if (previousSnapshot) await rm(previousSnapshot, { force: true });
      previousSnapshot = file;
    }
    console.log(
      [
        'cycle mode  workload(MiB/s, IOPS)  snapshot downtime  restore (load)    check',
        ...rows.map(
          (r) =>
            `${String(r.cycle).padStart(5)} ${r.mode.padEnd(5)} ${`${r.memMibps}, ${r.diskIops}`.padEnd(22)}` +
            `${`${r.downtimeMs} ms`.padEnd(19)}${`${r.restoreMs} ms (${r.loadMs} ms)`.padEnd(18)}${r.check}`,
        ),
      ].join('\n'),
    );
    expect(rows).toHaveLength(CYCLES.length);
  });

  it('negative control (b): the RAM of snapshot A with the disk frozen at snapshot B, seconds later, FAILS check() with disk-*', async () => {
    // Two snapshots of the running chain guest, a few seconds of disk writes apart.
    const a = await snapshot({ qmp: current.vm.qmpPath, out: join(scratch.root, 'a.qsnap') }).result;
    const hb = await current.console.nextHeartbeat({ timeoutMs: 20_000 });
    await current.console.nextHeartbeat({ timeoutMs: 20_000 });
    expect(hb.diskIops, 'the workload writes the disk between A and B').toBeGreaterThan(0);
    const b = await snapshot({ qmp: current.vm.qmpPath, out: join(scratch.root, 'b.qsnap') }).result;
    const frozenA = a.disks[0]!.frozenFile;
    const frozenB = b.disks[0]!.frozenFile;
    expect(frozenB).not.toBe(frozenA);

    // restore() pairs the snapshot with its own frozen layer whatever image the command line
    // names, so the mismatched pair is built at the QEMU level: stock QEMU, `-incoming exec:`
    // with A's state exported as a plain stream, on an overlay of either disk.
    const stream = join(scratch.root, 'a.stream');
    await exportStream({ file: a.file, out: stream }).result;

    const loadAWith = async (frozen: string, name: string) => {
      const dir = join(scratch.root, name);
      const overlay = await createOverlay(join(scratch.root, `${name}.qcow2`), frozen);
      const argv = [
        ...moveArgv(guest.argv, {
          fromDir: guest.dir,
          toDir: dir,
          fromDisk: guest.diskFile,
          toDisk: overlay,
        }),
        '-S',
        '-incoming',
        `exec:cat ${stream}`,
      ];
      const vm = qemus.add(await Vm.launchArgv(argv, { qmpPath: join(dir, 'qmp.sock'), runDir: dir }));
      await waitLoadedThenCont(vm);
      const c = await connectConsole(chardevPath(argv));
      consoles.add(c);
      const check = await c.check({ timeoutMs: 60_000 });
      await c.close();
      consoles.delete(c);
      await qemus.stop(vm);
      return check;
    };

    // The construction itself is sound: A's state with A's disk passes.
    const same = await loadAWith(frozenA, 'a-with-a');
    expect(same.ok, `A's RAM + A's disk: ${same.line}`).toBe(true);
    const mixed = await loadAWith(frozenB, 'a-with-b');
    console.log(`negative control (b): ${mixed.line}`);
    expect(mixed.ok, `A's RAM + B's disk must fail: ${mixed.line}`).toBe(false);
    expect(mixed.reason).toMatch(/^disk-/);
  });

  describe('negative control (a): a fuzzy RAM copy', () => {
    let shared: TestGuest;

    beforeAll(async () => {
      // The chain's guest is no longer needed; this one needs RAM in a file the host can read.
      await stopCurrent();
      shared = await bootTestGuest({
        dir: join(scratch.root, 'shared'),
        accel: 'tcg',
        memoryBackend: { file: join(scratch.shm, 'guest.ram'), share: true },
      });
      qemus.add(shared.vm);
      consoles.add(shared.console);
    });

    it('RAM read while the guest runs, device state and disk saved right after, FAILS check() with mem-*', async () => {
      const ramFile = join(scratch.shm, 'guest.ram');
      const fuzzyFile = join(scratch.shm, 'fuzzy.ram');
      const before = await shared.console.nextHeartbeat({ timeoutMs: 20_000 });

      // The fuzzy copy: plain reads of the live, shared RAM file, no pause.
      const copyStarted = performance.now();
      await copyWithReads(ramFile, fuzzyFile);
      const copyMs = performance.now() - copyStarted;
      // Device state, CPU registers and the disk, right after the copy: a real qsnap snapshot —
      // once a heartbeat shows the memory writer a full pass past where it was before the copy,
      // so the copy cannot happen to equal the snapshot's RAM on a host that starved the guest.
      let after = before;
      for (let n = 0; n < 10 && after.epoch < before.epoch + 2; n++)
        after = await shared.console.nextHeartbeat({ timeoutMs: 20_000 });
      expect(
        after.epoch,
        `the memory writer moves on: ${before.line} → ${after.line}`,
      ).toBeGreaterThanOrEqual(before.epoch + 2);
      const real = await snapshot({ qmp: shared.vm.qmpPath, out: join(scratch.shm, 'real.qsnap') }).result;
      expect(real.strategy).toBe('background-snapshot');
      const argv = shared.argv;
      await shared.console.close();
      consoles.delete(shared.console);
      await qemus.stop(shared.vm);

      // The construction itself is sound: a lazy restore of the unmodified snapshot passes.
      const good = await restoreAttached(real.file, argv, true);
      const goodConsole = await connectConsole(chardevPath(argv));
      consoles.add(goodConsole);
      await expectCheckOk(goodConsole, 'lazy restore of the unmodified snapshot');
      await goodConsole.close();
      consoles.delete(goodConsole);
      await qemus.stop(good.vm!);

      // The same snapshot file with the workload's pages of pc.ram taken from the fuzzy copy.
      // (Taking *all* of pc.ram from it pairs stale kernel memory with later CPU state: the guest
      // kernel oopses in its timer code before the workload can answer — seen on this machine —
      // so only the workload's pages, recognisable by their header, come from the copy. Lazy
      // restore does not read pc.ram, so verify: 'auto' does not notice the edit.)
      const fuzzySnapshot = join(scratch.shm, 'fuzzy.qsnap');
      const swapped = await withWorkloadPagesFrom(real.file, fuzzyFile, fuzzySnapshot);
      console.log(
        `fuzzy copy: ${Math.round(copyMs)} ms of plain reads at epoch ${before.epoch}, snapshot at epoch ≥ ${after.epoch} ` +
          `(guest paused ${real.downtimeMs.toFixed(0)} ms); ${swapped.workloadPages} workload pages, ${swapped.differing} differ`,
      );
      expect(swapped.workloadPages).toBeGreaterThan(0);
      expect(swapped.differing, 'the copy is older than the snapshot instant').toBeGreaterThan(0);

      const fuzzy = await restoreAttached(fuzzySnapshot, argv, true);
      expect(fuzzy.runState).toBe('running');
      const fuzzyConsole = await connectConsole(chardevPath(argv));
      consoles.add(fuzzyConsole);
      const check = await fuzzyConsole.check({ timeoutMs: 60_000 });
      console.log(`negative control (a): ${check.line}`);
      expect(check.ok, `a fuzzy RAM copy must fail: ${check.line}`).toBe(false);
      expect(check.reason).toMatch(/^mem-/);
    });
  });
});

/** Copies a file with plain positional reads and writes, 1 MiB at a time. */
async function copyWithReads(from: string, to: string): Promise<void> {
  const src = await open(from, 'r');
  const dst = await open(to, 'w');
  try {
    const buf = Buffer.alloc(MiB);
    for (let at = 0; ; at += buf.length) {
      const { bytesRead } = await src.read(buf, 0, buf.length, at);
      if (bytesRead === 0) break;
      await dst.write(buf, 0, bytesRead, at);
    }
  } finally {
    await src.close();
    await dst.close();
  }
}

const PAGE = 4096;
/** struct qsnap_page_hdr (images/workload/layout.h): "QSNAPPG\0", then the run id. */
const PAGE_MAGIC = Buffer.from('QSNAPPG\0', 'latin1');

/**
 * Writes a copy of `snapshotFile` in which every page of the main RAM block that holds a
 * workload page (same run id) in both the snapshot and `ramCopy` is replaced by the copy's.
 */
async function withWorkloadPagesFrom(
  snapshotFile: string,
  ramCopy: string,
  out: string,
): Promise<{ workloadPages: number; differing: number }> {
  const reader = await openSnapshot(snapshotFile);
  const main = reader.manifest.ram.blocks[0]!;
  await reader.close();
  expect(main.fileOffset).toBe(0);
  const src = await open(snapshotFile, 'r');
  const copy = await open(ramCopy, 'r');
  const dst = await open(out, 'w');
  let workloadPages = 0;
  let differing = 0;
  try {
    // The whole file first (metadata after RAM included), then the swapped pages over it.
    const chunk = Buffer.alloc(4 * MiB);
    const other = Buffer.alloc(4 * MiB);
    for (let at = 0; ; at += chunk.length) {
      const { bytesRead } = await src.read(chunk, 0, chunk.length, at);
      if (bytesRead === 0) break;
      if (at < main.usedLength) {
        await copy.read(other, 0, bytesRead, at);
        for (let p = 0; p + PAGE <= Math.min(bytesRead, main.usedLength - at); p += PAGE) {
          const mine = chunk.subarray(p, p + PAGE);
          const theirs = other.subarray(p, p + PAGE);
          if (
            !isWorkloadPage(mine) ||
            !isWorkloadPage(theirs) ||
            !mine.subarray(8, 16).equals(theirs.subarray(8, 16))
          )
            continue;
          workloadPages++;
          if (!mine.equals(theirs)) differing++;
          theirs.copy(mine);
        }
      }
      await dst.write(chunk, 0, bytesRead, at);
    }
  } finally {
    await src.close();
    await copy.close();
    await dst.close();
  }
  return { workloadPages, differing };
}

function isWorkloadPage(page: Buffer): boolean {
  return page.subarray(0, 8).equals(PAGE_MAGIC);
}
