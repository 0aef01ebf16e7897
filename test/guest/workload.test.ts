/**
 * The yardstick of the project: the test guest's workload and its `check`. Every snapshot test
 * trusts "check OK" to mean consistent, so this file shows that the same check FAILS on each
 * kind of inconsistency, with the matching reason, and passes again once the bytes are put back:
 *
 *   (a) guest RAM changed from the host, through the shared file that backs it;
 *   (b) the workload's own corrupt-mem / corrupt-disk variants, repaired from the host;
 *   (c) the disk changed from the host, through QEMU's block layer (HMP `qemu-io` on the
 *       device's own BlockBackend). Writing the image from outside QEMU is not possible while it
 *       runs: `qemu-io -U` refuses writes ("force-share=on can only be used with read-only
 *       images"), and without -U the image is locked.
 *
 * One guest is shared by the whole file, booted once. Corruptions are made and repaired with
 * the writers held (`hold`), so the writers never meet them and latch nothing: the last test
 * checks that the run is still sound.
 */
import { open, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import type { GuestCheck, GuestProgress, GuestReady } from '../../src/guest/console.js';
import { bootTestGuest, type TestGuest } from '../../src/guest/test-guest.js';
import { canRun } from '../support/env.js';
import { killPid } from '../support/process.js';

/** A small ring, so the writer wraps it (needed for `stale`) within a second or two. */
const SLOTS = 512;
const PAGE = 4096;
/** The disk's device in QEMU: virtio-blk-pci's backend holds the BlockBackend. */
const DISK_DEVICE = '/machine/peripheral/disk0-dev/virtio-backend';

/** images/workload/layout.h, struct qsnap_page_hdr (little-endian). */
const PAGE_MAGIC = Buffer.from('QSNAPPG\0', 'latin1');
const HDR = { runId: 8, epoch: 16, j: 20, page: 24, npages: 28 } as const;

interface FoundPage {
  /** Byte offset of the page in the RAM file (= guest-physical address for pc.ram). */
  offset: number;
  page: number;
  epoch: number;
}

describe.skipIf(!canRun)('the test guest workload', () => {
  const ramFile = `/dev/shm/qsnap-workload-test-${process.pid}-${Date.now()}`;
  let guest: TestGuest;
  let ready: GuestReady;
  let held = false;

  beforeAll(async () => {
    try {
      guest = await bootTestGuest({ slots: SLOTS, memoryBackend: { file: ramFile, share: true } });
    } catch (err) {
      await rm(ramFile, { force: true });
      throw err;
    }
    console.log(`test guest booted in ${guest.bootSeconds.toFixed(1)} s (${guest.vm.accel?.accel})`);
    const first = await guest.console.waitReady();
    if (first.kind !== 'ready') throw new Error(`expected the READY line, got ${first.line}`);
    ready = first;
  });

  afterEach(async () => {
    if (held) await guest.console.release();
    held = false;
  });

  afterAll(async () => {
    const pid = guest?.vm.pid;
    try {
      await guest?.stop();
    } finally {
      await killPid(pid);
      await rm(ramFile, { force: true });
    }
  });

  async function hold() {
    const progress = await guest.console.hold();
    held = true;
    return progress;
  }

  async function release(): Promise<void> {
    await guest.console.release();
    held = false;
  }

  function expectFail(check: GuestCheck, reason: string, fields: Record<string, string> = {}): void {
    expect(check.ok, check.line).toBe(false);
    expect(check.reason, check.line).toBe(reason);
    expect(check.fields, check.line).toMatchObject({ at: 'check', ...fields });
  }

  async function expectOk(): Promise<GuestCheck> {
    const check = await guest.console.check();
    expect(check.ok, check.line).toBe(true);
    return check;
  }

  // ---- guest RAM through the shared backing file -------------------------------------------

  /**
   * A live workload page in the RAM file (`page` if given, else the first one found), with the
   * writers held at `progress`. A page's live copy carries the epoch the invariant gives it
   * (+ `epochOffset` after a deliberate bump); older copies the guest kernel may have left in
   * freed frames (a huge-page collapse copies pages) carry older epochs and are skipped.
   */
  async function findPage(progress: GuestProgress, page?: number, epochOffset = 0): Promise<FoundPage> {
    const runId = BigInt(`0x${ready.runId}`);
    const fh = await open(ramFile, 'r');
    try {
      const chunk = Buffer.alloc(4 << 20);
      for (let base = 0; ; base += chunk.length) {
        const { bytesRead } = await fh.read(chunk, 0, chunk.length, base);
        if (bytesRead === 0) break;
        for (let at = 0; at + 32 <= bytesRead; at += PAGE) {
          if (chunk.compare(PAGE_MAGIC, 0, 8, at, at + 8) !== 0) continue;
          if (chunk.readBigUInt64LE(at + HDR.runId) !== runId) continue;
          if (chunk.readUInt32LE(at + HDR.npages) !== ready.pages) continue;
          const found = chunk.readUInt32LE(at + HDR.page);
          if (page !== undefined && found !== page) continue;
          const j = chunk.readUInt32LE(at + HDR.j);
          const live = (j < progress.page ? progress.epoch : progress.epoch - 1) + epochOffset;
          const epoch = chunk.readUInt32LE(at + HDR.epoch);
          if (epoch !== live) continue;
          return { offset: base + at, page: found, epoch };
        }
      }
    } finally {
      await fh.close();
    }
    throw new Error(`no live workload page ${page ?? ''} of run ${ready.runId} in ${ramFile}`);
  }

  async function ramRead(offset: number, length: number): Promise<Buffer> {
    const fh = await open(ramFile, 'r');
    try {
      const buf = Buffer.alloc(length);
      await fh.read(buf, 0, length, offset);
      return buf;
    } finally {
      await fh.close();
    }
  }

  async function ramWrite(offset: number, bytes: Buffer): Promise<void> {
    const fh = await open(ramFile, 'r+');
    try {
      await fh.write(bytes, 0, bytes.length, offset);
    } finally {
      await fh.close();
    }
  }

  // ---- the disk through QEMU's block layer ------------------------------------------------

  async function qemuIo(command: string): Promise<void> {
    const reply = await guest.vm.qmp.execute('human-monitor-command', {
      'command-line': `qemu-io -d ${DISK_DEVICE} "${command}"`,
    });
    expect(reply, `qemu-io ${command}`).toBe('');
  }

  /**
   * Reads guest-disk bytes through the running QEMU: `qemu-io read -v` prints a hex dump on
   * QEMU's stdout, which is the VM's log file.
   */
  async function diskRead(offset: number, length: number): Promise<Buffer> {
    const log = guest.vm.logPath;
    const before = (await stat(log)).size;
    await qemuIo(`read -v ${offset} ${length}`);
    const text = (await readFile(log)).subarray(before).toString('latin1');
    const bytes = Buffer.alloc(length);
    let seen = 0;
    // One line per 16 bytes (qemu-io-cmds.c dump_buffer): "%08x:  " then "%02x " each, then " " and ASCII.
    for (const m of text.matchAll(/^([0-9a-f]{8}): ((?: [0-9a-f]{2}){1,16}) {2}/gm)) {
      const at = Number.parseInt(m[1]!, 16) - offset;
      for (const [k, hex] of m[2]!.trim().split(/ +/).entries()) {
        if (at + k >= 0 && at + k < length) {
          bytes[at + k] = Number.parseInt(hex, 16);
          seen++;
        }
      }
    }
    if (seen !== length) throw new Error(`qemu-io read -v gave ${seen} of ${length} bytes:\n${text}`);
    return bytes;
  }

  async function diskWrite(offset: number, bytes: Buffer): Promise<void> {
    const source = join(guest.dir, `write-${offset}.bin`);
    await writeFile(source, bytes);
    await qemuIo(`write -s ${source} ${offset} ${bytes.length}`);
    await rm(source, { force: true });
  }

  /** Saves the given ring slots; the returned function writes them back and checks it did. */
  async function saveSlots(slots: number[]): Promise<() => Promise<void>> {
    const saved = new Map<number, Buffer>();
    for (const slot of new Set(slots)) saved.set(slot, await diskRead(slot * PAGE, PAGE));
    return async () => {
      for (const [slot, bytes] of saved) await diskWrite(slot * PAGE, bytes);
      for (const [slot, bytes] of saved) expect((await diskRead(slot * PAGE, PAGE)).equals(bytes)).toBe(true);
    };
  }

  const ringSlot = (seq: number) => ((seq % SLOTS) + SLOTS) % SLOTS;

  // ---- the tests --------------------------------------------------------------------------

  it('boots and announces the workload with the requested sizes', () => {
    expect(guest.bootSeconds).toBeLessThan(90);
    expect(ready).toMatchObject({ memMib: 64, pages: 64 * 256, disk: '/dev/vda', slots: SLOTS });
    expect(ready.runId).toMatch(/^[0-9a-f]{16}$/);
  });

  it('sends heartbeats whose counters advance, with nothing latched', async () => {
    const a = await guest.console.nextHeartbeat();
    const b = await guest.console.nextHeartbeat();
    expect(b.n).toBeGreaterThan(a.n);
    expect(b.epoch * ready.pages + b.page).toBeGreaterThan(a.epoch * ready.pages + a.page);
    expect(b.rec).toBeGreaterThan(a.rec);
    expect(b.memMibps).toBeGreaterThan(0);
    expect(b.diskIops).toBeGreaterThan(0);
    expect([a.latchedFailures, b.latchedFailures]).toEqual([0, 0]);
  });

  it('checks OK again and again while the writers run', async () => {
    let last: GuestCheck | undefined;
    for (let i = 0; i < 3; i++) {
      const check = await expectOk();
      expect(check.fields).toMatchObject({ pages: String(ready.pages), slots: String(SLOTS) });
      if (last) expect(Number(check.fields['rec'])).toBeGreaterThan(Number(last.fields['rec']));
      last = check;
      await guest.console.nextHeartbeat();
    }
  });

  it('(a) fails mem-pattern and mem-epoch when guest RAM is changed from the host, and passes once restored', async () => {
    const progress = await hold();
    const target = await findPage(progress);
    await expectOk(); // control: held, untouched

    const byteAt = target.offset + 2048; // mid-body: not one of the words the writer pre-checks
    const original = await ramRead(byteAt, 1);
    await ramWrite(byteAt, Buffer.from([original[0]! ^ 0x5a]));
    try {
      expectFail(await guest.console.check(), 'mem-pattern', { page: String(target.page), offset: '2048' });
    } finally {
      await ramWrite(byteAt, original);
    }
    await expectOk();

    const epochAt = target.offset + HDR.epoch;
    const epochBytes = await ramRead(epochAt, 4);
    const bumped = Buffer.alloc(4);
    bumped.writeUInt32LE(epochBytes.readUInt32LE(0) + 1);
    await ramWrite(epochAt, bumped);
    try {
      expectFail(await guest.console.check(), 'mem-epoch', {
        page: String(target.page),
        want: String(target.epoch),
        got: String(target.epoch + 1),
      });
    } finally {
      await ramWrite(epochAt, epochBytes);
    }
    await expectOk();
    await release();
  });

  it('(b) fails on its own corrupt-mem variants, and passes once the host repairs the page', async () => {
    const progress = await hold();
    const pattern = await guest.console.corrupt('mem', 'pattern');
    const p = Number(pattern['page']);
    expectFail(await guest.console.check(), 'mem-pattern', { page: String(p), offset: '2048' });
    const page = await findPage(progress, p);
    const byte = await ramRead(page.offset + 2048, 1);
    await ramWrite(page.offset + 2048, Buffer.from([byte[0]! ^ 0x5a]));
    await expectOk();

    const epoch = await guest.console.corrupt('mem', 'epoch');
    const q = Number(epoch['page']);
    const bumped = await findPage(progress, q, 1);
    expectFail(await guest.console.check(), 'mem-epoch', { page: String(q), got: String(bumped.epoch) });
    const fixed = Buffer.alloc(4);
    fixed.writeUInt32LE(bumped.epoch - 1);
    await ramWrite(bumped.offset + HDR.epoch, fixed);
    await expectOk();
    await release();
  });

  it('(b) fails on each corrupt-disk variant with its reason, and passes once the slots are restored', async () => {
    // `stale` needs a record from the previous lap of the ring.
    let heartbeat = await guest.console.nextHeartbeat();
    while (heartbeat.rec <= SLOTS + 1) heartbeat = await guest.console.nextHeartbeat();
    const { rec: acked } = await hold();
    const last = ringSlot(acked - 1);
    const next = ringSlot(acked);
    const restore = await saveSlots([last, next]);
    await expectOk(); // control: held, untouched

    const variants: [kind: string, reason: string, slot: number][] = [
      ['nonce', 'disk-nonce', last],
      ['future', 'disk-future', next],
      ['missing', 'disk-missing', last],
      ['stale', 'disk-stale', last],
      ['pattern', 'disk-pattern', last],
    ];
    for (const [kind, reason, slot] of variants) {
      const done = await guest.console.corrupt('disk', kind);
      expect(done['slot'], kind).toBe(String(slot));
      try {
        expectFail(await guest.console.check(), reason, { slot: String(slot) });
      } finally {
        await restore();
      }
      await expectOk();
    }
    await release();
  });

  it('(c) fails when the disk is changed from the host, and passes once restored', async () => {
    const { rec: acked } = await hold();
    const last = ringSlot(acked - 1);
    const before = ringSlot(acked - 2);
    const restore = await saveSlots([last, before]);

    await qemuIo(`write -z ${last * PAGE} ${PAGE}`); // the newest acked record vanishes
    try {
      expectFail(await guest.console.check(), 'disk-missing', { slot: String(last) });
    } finally {
      await restore();
    }
    await expectOk();

    // The newest record copied one slot down: a record in a slot its seq does not map to.
    await diskWrite(before * PAGE, await diskRead(last * PAGE, PAGE));
    try {
      expectFail(await guest.console.check(), 'disk-slot', { slot: String(before) });
    } finally {
      await restore();
    }
    await expectOk();
    await release();
  });

  it('is still sound after every corruption was repaired: nothing latched, check OK', async () => {
    const a = await guest.console.nextHeartbeat();
    const b = await guest.console.nextHeartbeat();
    expect(b.rec).toBeGreaterThan(a.rec);
    expect(b.latchedFailures).toBe(0);
    await expectOk();
  });
});
