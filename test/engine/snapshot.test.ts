/**
 * The snapshot engine against the bundled test guest (QEMU 7.2, TCG, 256 MiB RAM, a 64 MiB
 * workload rewriting memory and a disk ring): the happy path of the library API, two snapshots
 * in a row, a paused guest, and negative controls for the harness checks every other test
 * relies on.
 */
import { execFileSync } from 'node:child_process';
import { existsSync, mkdirSync, writeFileSync } from 'node:fs';
import { stat } from 'node:fs/promises';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { openSnapshot } from '../../src/format/index.js';
import { type OperationEvent, type SnapshotResult, snapshot } from '../../src/index.js';
import type { QmpEvent } from '../../src/qmp/index.js';
import { canRun } from '../support/env.js';
import { failure } from '../support/errors.js';
import { fileState, MiB } from '../support/files.js';
import {
  bootGuest,
  chainFiles,
  expectIntact,
  expectNoLeftovers,
  type Guest,
  stopGuest,
} from '../support/guest.js';
import { childrenOf } from '../support/process.js';
import { openSandbox, type Sandbox } from '../support/sandbox.js';

/** Metadata after RAM: page table, prologue, device tail, manifest, trailer. */
async function metadataBytes(file: string): Promise<number> {
  const reader = await openSnapshot(file);
  try {
    const ramEnd = reader.manifest.ram.pageTable.offset;
    return reader.fileLength - ramEnd;
  } finally {
    await reader.close();
  }
}

/** The sparse-file bound: allocated ≤ data pages × 4096 + 1 % + the metadata (+ one 64 KiB extent). */
async function expectSparse(file: string, dataPages: number): Promise<void> {
  const st = await stat(file);
  const bound = dataPages * 4096 * 1.01 + (await metadataBytes(file)) + 64 * 1024;
  expect(st.blocks * 512, `${file} allocated bytes`).toBeLessThanOrEqual(bound);
}

describe.skipIf(!canRun)('snapshot() of the running test guest', () => {
  let sandbox: Sandbox;
  let guest: Guest;
  const events: QmpEvent[] = [];
  let first: SnapshotResult;

  beforeAll(async () => {
    sandbox = await openSandbox('engine-snapshot');
    guest = await bootGuest(sandbox);
    guest.vm.qmp.on('STOP', (e) => events.push(e));
    guest.vm.qmp.on('RESUME', (e) => events.push(e));
  });

  afterAll(async () => {
    await stopGuest(guest);
    await sandbox?.dispose();
  });

  it('pauses the guest for milliseconds, freezes its disk and writes a valid file', async () => {
    const out = join(sandbox.out, 'first.qsnap');
    const seen: OperationEvent[] = [];
    const stopsBefore = guest.stops;
    const eventsBefore = events.length;
    const op = snapshot({ qmp: guest.vm.qmpPath, out }).on((e) => seen.push(e));
    first = await op.result;

    expect(first).toMatchObject({
      file: out,
      strategy: 'background-snapshot',
      transport: 'pipe',
      machine: 'pc-i440fx-7.2',
      qemuVersion: expect.stringMatching(/^7\.2\./),
      runState: 'running',
      skippedDisks: [],
    });
    expect(first.ramBytes).toBeGreaterThanOrEqual(256 * MiB);
    expect(first.pagesWritten + first.zeroPages).toBe(first.ramBytes / 4096);
    expect(first.pagesWritten).toBeGreaterThan((64 * MiB) / 4096); // at least the workload's pages
    expect(first.streamBytes).toBeGreaterThan(first.pagesWritten * 4096);
    expect(first.totalMs).toBeGreaterThan(first.streamMs);
    // The placeholder QEMU ran for the pipe is gone (QEMU would wait for it at its next migration).
    expect(await childrenOf(guest.vm.pid), 'QEMU has no child left').toEqual([]);
    expect(first.disks).toEqual([
      {
        device: 'disk0-dev',
        frozenFile: guest.diskFile,
        overlayFile: expect.stringMatching(new RegExp(`^${guest.dir}/disk\\.qsnap-[0-9a-f]{8}\\.qcow2$`)),
      },
    ]);

    // Downtime is QEMU's own STOP → RESUME interval: the same events reach our monitor.
    expect(guest.stops - stopsBefore, 'exactly one pause').toBe(1);
    const [stop, resume] = events.slice(eventsBefore);
    expect([stop?.event, resume?.event]).toEqual(['STOP', 'RESUME']);
    expect(first.downtimeMs).toBeCloseTo((resume!.timestampUs - stop!.timestampUs) / 1000, 3);
    expect(first.downtimeMs).toBeGreaterThan(0);
    expect(first.downtimeMs).toBeLessThan(1000);
    console.info(
      `snapshot: downtime ${first.downtimeMs.toFixed(1)} ms, total ${first.totalMs.toFixed(0)} ms, ` +
        `stream ${first.streamMs.toFixed(0)} ms, ${first.pagesWritten} data pages`,
    );

    const all = seen.filter((e) => e.type === 'phase').map((e) => e.phase);
    // mid-stream comes from the stream's progress, whenever half of RAM has arrived.
    expect(all.filter((p) => p === 'mid-stream')).toHaveLength(1);
    expect(all.filter((p) => p !== 'mid-stream')).toEqual([
      'connect',
      'probe',
      'intent',
      'prepare',
      'prepared',
      'pause',
      'paused',
      'frozen',
      'migrating',
      'captured',
      'resumed',
      'stream',
      'device-tail',
      'finish',
      'published',
    ]);
    expect(seen.some((e) => e.type === 'progress')).toBe(true);
    expect(seen.filter((e) => e.type === 'warning')).toEqual([]);

    // The guest now writes to the new overlay, whose backing file is the frozen image.
    expect(await chainFiles(guest.vm.qmp)).toEqual([first.disks[0]!.overlayFile, guest.diskFile]);
    await expectSparse(out, first.pagesWritten);
    await expectIntact(sandbox, guest, { out, outIs: 'valid' });
  });

  it('records what it saw in the manifest: machine, RAM blocks with pc.ram at 0, disks', async () => {
    const reader = await openSnapshot(first.file);
    try {
      const m = reader.manifest;
      expect(m).toMatchObject({
        id: first.id,
        strategy: 'background-snapshot',
        qemu: { machine: 'pc-i440fx-7.2', version: { major: 7, minor: 2 }, accel: 'tcg' },
        vm: { ramBytes: 256 * MiB, runStateBefore: 'running', name: 'qsnap-test-guest' },
        counts: { pagesWritten: first.pagesWritten, zeroPages: first.zeroPages, duplicatePages: 0 },
        timings: { downtimeMs: first.downtimeMs },
        disks: [
          {
            device: 'disk0-dev',
            nodeName: 'disk0',
            format: 'qcow2',
            frozenFile: guest.diskFile,
            overlayFile: first.disks[0]!.overlayFile,
          },
        ],
      });
      expect(m.ram.blocks[0]).toMatchObject({ name: 'pc.ram', usedLength: 256 * MiB, fileOffset: 0 });
      expect(m.ram.blocks.map((b) => b.name)).toEqual(
        expect.arrayContaining([
          'pc.ram',
          '0000:00:02.0/vga.vram',
          'pc.bios',
          'pc.rom',
          '/rom@etc/acpi/tables',
        ]),
      );
      expect(m.ram.blocks.reduce((s, b) => s + b.usedLength, 0)).toBe(first.ramBytes);
      expect(m.stream.devices).toEqual(
        expect.arrayContaining(['timer', 'cpu_common', '0000:00:03.0/virtio-blk']),
      );
    } finally {
      await reader.close();
    }
  });

  it('leaves the frozen image untouched while the guest keeps writing to its overlay', async () => {
    const overlay = first.disks[0]!.overlayFile;
    const frozenBefore = await fileState(guest.diskFile);
    const overlayBefore = await fileState(overlay);
    const hb = await guest.console.nextHeartbeat({ timeoutMs: 10_000 });
    expect(hb.diskIops, 'the workload writes its disk').toBeGreaterThan(0);
    await sleep(2500);
    expect(await fileState(guest.diskFile)).toEqual(frozenBefore);
    // Negative control: the same check over the same seconds sees the overlay change.
    expect(await fileState(overlay)).not.toEqual(overlayBefore);
  });

  it('takes a second snapshot that freezes the first overlay', async () => {
    const out = join(sandbox.out, 'second.qsnap');
    // The other transport, chosen by hand: the stream over a unix socket.
    const second = await snapshot({ qmp: guest.vm.qmpPath, out, transport: 'unix' }).result;
    expect(second.strategy).toBe('background-snapshot');
    expect(second.transport).toBe('unix');
    expect(second.id).not.toBe(first.id);
    expect(second.disks[0]!.frozenFile).toBe(first.disks[0]!.overlayFile);
    expect(second.disks[0]!.overlayFile).not.toBe(first.disks[0]!.overlayFile);
    expect(await chainFiles(guest.vm.qmp)).toEqual([
      second.disks[0]!.overlayFile,
      first.disks[0]!.overlayFile,
      guest.diskFile,
    ]);
    expect(second.downtimeMs).toBeGreaterThan(0);
    expect(second.downtimeMs).toBeLessThan(1000);
    await expectSparse(out, second.pagesWritten);
    await expectIntact(sandbox, guest, { out, outIs: 'valid' });
    // The first file is still valid too.
    await expectNoLeftovers(sandbox, guest, { out: first.file, outIs: 'valid' });
  });

  it('snapshots a paused guest with a plain migration and leaves it stopped (postmigrate)', async () => {
    await guest.vm.qmp.execute('stop');
    // Negative control for the heartbeat check: a stopped guest sends none.
    const silent = await failure(guest.console.nextHeartbeat({ timeoutMs: 1500 }));
    expect(silent.code).toBe('QSNAP_GUEST_TIMEOUT');
    const stopsBefore = guest.stops;
    const out = join(sandbox.out, 'paused.qsnap');
    try {
      const r = await snapshot({ qmp: guest.vm.qmpPath, out }).result;
      expect(r).toMatchObject({ strategy: 'stopped-precopy', runState: 'paused', downtimeMs: 0 });
      expect(guest.stops, 'no second pause').toBe(stopsBefore);
      // QEMU 7.2 ends a completed precopy migration in `postmigrate` (its images inactive
      // until `cont`): the guest stays stopped, though no longer in `paused`.
      const status = await guest.vm.qmp.execute('query-status');
      expect(status).toMatchObject({ running: false, status: 'postmigrate' });
      const stillSilent = await failure(guest.console.nextHeartbeat({ timeoutMs: 1500 }));
      expect(stillSilent.code).toBe('QSNAP_GUEST_TIMEOUT');
      const reader = await openSnapshot(out);
      try {
        expect(reader.manifest).toMatchObject({
          strategy: 'stopped-precopy',
          vm: { runStateBefore: 'paused' },
        });
      } finally {
        await reader.close();
      }
    } finally {
      await guest.vm.qmp.execute('cont');
    }
    await expectIntact(sandbox, guest, { out, outIs: 'valid' });
    // And the guest can be snapshotted live again after that.
    const again = join(sandbox.out, 'after-paused.qsnap');
    const r = await snapshot({ qmp: guest.vm.qmpPath, out: again }).result;
    expect(r.strategy).toBe('background-snapshot');
    await expectIntact(sandbox, guest, { out: again, outIs: 'valid' });
  });

  describe('the leftover checks catch what they look for (negative controls)', () => {
    it('an intent record, a partial file, a stream directory', async () => {
      const out = join(sandbox.out, 'never.qsnap');
      await expectNoLeftovers(sandbox, guest, { out });

      mkdirSync(join(sandbox.state, 'intents'), { recursive: true });
      const intent = join(sandbox.state, 'intents', 'deadbeef.json');
      writeFileSync(intent, '{}');
      expect((await failure(expectNoLeftovers(sandbox, guest, { out }))).message).toMatch(/intent records/);
      execFileSync('rm', [intent]);

      const partial = join(sandbox.out, '.never.qsnap.qsnap-partial-000000000000');
      writeFileSync(partial, 'x');
      expect((await failure(expectNoLeftovers(sandbox, guest, { out }))).message).toMatch(/partial/);
      execFileSync('rm', [partial]);

      const stream = join(sandbox.tmp, 'qsnap-stream-XXXX');
      mkdirSync(stream);
      expect((await failure(expectNoLeftovers(sandbox, guest, { out }))).message).toMatch(
        /stream directories/,
      );
      execFileSync('rmdir', [stream]);

      writeFileSync(out, 'not a snapshot');
      expect((await failure(expectNoLeftovers(sandbox, guest, { out }))).message).toMatch(/must not exist/);
      expect((await failure(expectNoLeftovers(sandbox, guest, { out, outIs: 'valid' }))).code).toBe(
        'QSNAP_FILE_NOT_SNAPSHOT',
      );
      execFileSync('rm', [out]);
      await expectNoLeftovers(sandbox, guest, { out });
    });

    it('migration settings left changed, an orphan overlay', async () => {
      await guest.vm.qmp.execute('migrate-set-capabilities', {
        capabilities: [{ capability: 'background-snapshot', state: true }],
      });
      try {
        expect((await failure(expectNoLeftovers(sandbox, guest))).message).toMatch(/background-snapshot/);
      } finally {
        await guest.vm.qmp.execute('migrate-set-capabilities', {
          capabilities: [{ capability: 'background-snapshot', state: false }],
        });
      }
      await guest.vm.qmp.execute('migrate-set-parameters', { 'max-bandwidth': 12345678 });
      try {
        expect((await failure(expectNoLeftovers(sandbox, guest))).message).toMatch(/migration settings/);
      } finally {
        await guest.vm.qmp.execute('migrate-set-parameters', {
          'max-bandwidth': guest.baseline.maxBandwidth ?? 134217728,
        });
      }
      const orphan = join(guest.dir, 'disk.qsnap-00000000.qcow2');
      writeFileSync(orphan, '');
      expect((await failure(expectNoLeftovers(sandbox, guest))).message).toMatch(/outside the disk chain/);
      execFileSync('rm', [orphan]);
      await expectNoLeftovers(sandbox, guest);
    });

    it('a file that is not sparse fails the allocation bound', async () => {
      const copy = join(sandbox.root, 'dense.qsnap');
      execFileSync('cp', ['--sparse=never', first.file, copy]);
      try {
        await expectSparse(first.file, first.pagesWritten);
        await failure(expectSparse(copy, first.pagesWritten));
      } finally {
        execFileSync('rm', ['-f', copy]);
      }
      expect(existsSync(copy)).toBe(false);
    });
  });
});
