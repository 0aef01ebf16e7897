/**
 * Full restore leaves out the main RAM block's zero pages only where QEMU's RAM is provably zero
 * before the load. Proven on the guest's RAM itself: after a full restore (left paused), QEMU's
 * `pmemsave` of guest memory equals the snapshot's pc.ram page for page — with fresh anonymous
 * RAM (zero pages left out) and with RAM backed by a file of 0xA5 bytes (zero pages sent). The
 * negative control: the same comparison on that file-backed QEMU before the load finds the
 * garbage where the zero pages are.
 */
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { guestRamZeroed } from '../../src/engine/restore/incoming.js';
import { PAGE_SIZE } from '../../src/format/codec.js';
import { openSnapshot } from '../../src/format/index.js';
import { restore } from '../../src/index.js';
import { Vm } from '../../src/vm/launcher.js';
import { canRun } from '../support/env.js';
import { QemuRegister } from '../support/guest.js';
import { openSandbox, type Sandbox } from '../support/sandbox.js';
import { createOverlay, moveArgv, snapshotFreshGuest } from './helpers.js';

const RAM_BYTES = 256 * 2 ** 20;
/** Guest-physical addresses where pc.ram is not what the CPU sees (VGA window, PAM ROM shadows). */
const HOLE = { start: 0xa0000, end: 0x100000 };

describe.skipIf(!canRun)('full restore and zero pages of the main RAM block', () => {
  let scratch: Sandbox;
  const qemus = new QemuRegister();
  let argv: string[];
  let guestDir: string;
  let file: string;
  let frozenFile: string;
  let zeroPages = 0;

  beforeAll(async () => {
    scratch = await openSandbox('zero-pages');
    ({ argv, guestDir, file, frozenFile } = await snapshotFreshGuest(scratch, qemus));
    const reader = await openSnapshot(file);
    zeroPages = reader.manifest.ram.blocks[0]!.zeroPages;
    await reader.close();
  });

  afterEach(() => qemus.stopAll());
  afterAll(async () => {
    await qemus.stopAll();
    await scratch?.dispose();
  });

  /** A file of RAM_BYTES bytes of 0xA5 and the command line options that back guest RAM with it. */
  async function garbageRam(name: string): Promise<string[]> {
    const path = join(scratch.root, name);
    await writeFile(path, Buffer.alloc(RAM_BYTES, 0xa5));
    return [
      '-object',
      `memory-backend-file,id=pc.ram,size=${RAM_BYTES},mem-path=${path},share=off`,
      '-machine',
      'memory-backend=pc.ram',
    ];
  }

  /** Pages of pc.ram whose guest-physical copy differs from the snapshot (the VGA/ROM window aside). */
  async function pagesDiffering(vm: Vm, dump: string): Promise<number> {
    await vm.qmp.executeRaw('pmemsave', { val: 0, size: RAM_BYTES, filename: dump });
    const memory = await readFile(dump);
    const reader = await openSnapshot(file);
    let differing = 0;
    try {
      for await (const run of reader.readPages(0, { verify: true })) {
        for (let p = 0; p < run.pageCount; p++) {
          const at = run.offset + p * PAGE_SIZE;
          if (at >= HOLE.start && at < HOLE.end) continue;
          const page = memory.subarray(at, at + PAGE_SIZE);
          const same =
            run.kind === 'data'
              ? page.equals(run.data.subarray(p * PAGE_SIZE, (p + 1) * PAGE_SIZE))
              : page.every((b) => b === 0);
          if (!same) differing++;
        }
      }
    } finally {
      await reader.close();
    }
    return differing;
  }

  async function restoredPaused(extra: string[], tag: string): Promise<Vm> {
    const result = await restore({
      file,
      argv: ['qemu-system-x86_64', ...argv, ...extra],
      attached: true,
      paused: true,
      relocateSockets: true,
      overlayDir: join(scratch.root, `overlays-${tag}`),
    }).result;
    expect(result.runState).toBe('paused');
    return qemus.add(result.vm!);
  }

  it('guestRamZeroed: true for anonymous RAM; false for a file backend and for a ROM loaded into RAM', async () => {
    const overlay = await createOverlay(join(scratch.root, 'probe.qcow2'), frozenFile);
    const probeDir = join(scratch.root, 'probe');
    const base = moveArgv(argv, {
      fromDir: guestDir,
      toDir: probeDir,
      fromDisk: frozenFile,
      toDisk: overlay,
    });
    const blob = join(scratch.root, 'blob.bin');
    await writeFile(blob, Buffer.alloc(8192, 0x5a));
    const cases: [string[], boolean][] = [
      [[], true],
      [await garbageRam('probe-ram'), false],
      [['-device', `loader,file=${blob},addr=0x200000`], false],
    ];
    for (const [extra, zeroed] of cases) {
      const vm = qemus.add(
        await Vm.launchArgv([...base, ...extra, '-incoming', 'defer'], {
          qmpPath: join(probeDir, 'qmp.sock'),
          runDir: probeDir,
        }),
      );
      expect(await guestRamZeroed(vm.qmp), extra.join(' ') || 'anonymous RAM').toBe(zeroed);
      await qemus.stop(vm);
    }
  });

  it('the restored RAM equals the snapshot page for page: anonymous RAM (zero pages left out) and RAM over a file of garbage (zero pages sent)', async () => {
    expect(zeroPages).toBeGreaterThan(1000);
    const anonymous = await restoredPaused([], 'anon');
    expect(await pagesDiffering(anonymous, join(scratch.root, 'anon.mem'))).toBe(0);
    await qemus.stop(anonymous);
    const backed = await restoredPaused(await garbageRam('restore-ram'), 'file');
    expect(await pagesDiffering(backed, join(scratch.root, 'file.mem'))).toBe(0);
  });

  it('negative control: the same comparison before the load, on RAM over the file of garbage, finds the zero pages', async () => {
    const overlay = await createOverlay(join(scratch.root, 'control.qcow2'), frozenFile);
    const dir = join(scratch.root, 'control');
    const vm = qemus.add(
      await Vm.launchArgv(
        [
          ...moveArgv(argv, { fromDir: guestDir, toDir: dir, fromDisk: frozenFile, toDisk: overlay }),
          ...(await garbageRam('control-ram')),
          '-incoming',
          'defer',
        ],
        { qmpPath: join(dir, 'qmp.sock'), runDir: dir },
      ),
    );
    // Every page but those in the window differs: data pages and zero pages alike hold 0xA5.
    expect(await pagesDiffering(vm, join(scratch.root, 'control.mem'))).toBeGreaterThan(zeroPages - 100);
  });
});
