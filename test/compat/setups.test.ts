/**
 * The compatibility table: every set-up of setups.ts booted with the test guest and its
 * workload, snapshotted live, then restored fully and lazily from that one file, each restore
 * passing the workload's point-in-time check (memory and the disk ring on the set-up's own
 * disk; its negative controls are in the engine and QEMU 10 suites) — or, for the set-ups
 * qsnap must refuse, refused before anything is paused, the guest untouched. Across versions:
 * a 7.2 snapshot restores on 10.0, a 10.0 snapshot is refused by 7.2.
 *
 * `make test` runs the `quick` set-ups on QEMU 7.2; `make test-compat` (QSNAP_COMPAT=full)
 * runs all of them on 7.2 and, as root with QSNAP_QEMU10=1, on Debian 13's QEMU 10, and saves
 * the cells to docs/compat.json for the README's table.
 */
import { execFileSync } from 'node:child_process';
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { GuestConsole } from '../../src/guest/console.js';
import { testGuestSpec } from '../../src/guest/test-guest.js';
import { restore, snapshot } from '../../src/index.js';
import { Vm } from '../../src/vm/launcher.js';
import type { VmSpec } from '../../src/vm/spec.js';
import { canRun, isRoot, QEMU, ROOT } from '../support/env.js';
import { failure } from '../support/errors.js';
import {
  type CompatCell,
  CROSS_ROWS,
  FULL,
  loadCells,
  renderCompat,
  SETUPS,
  type Setup,
  SLOTS,
  saveCells,
  TABLE_END,
  TABLE_START,
} from './setups.js';

const withQemu10 = FULL && process.env['QSNAP_QEMU10'] === '1' && isRoot;
const CHROOT = process.env['QSNAP_QEMU10_DIR'] ?? '/var/tmp/qsnap-qemu10';
const WORK = `${CHROOT}-work`;
const chrootScript = resolve(import.meta.dirname, '../../scripts/qemu-chroot.sh');

interface Running {
  vm: Vm;
  console: GuestConsole;
  argv: string[];
  serial: string;
}

describe.skipIf(!canRun)('QEMU set-ups users run', () => {
  const cells: CompatCell[] = [];
  const started = new Set<Vm>();
  let root = '';
  let qemu10 = '';
  const savedEnv = { TMPDIR: process.env['TMPDIR'], QSNAP_STATE_DIR: process.env['QSNAP_STATE_DIR'] };

  beforeAll(() => {
    if (withQemu10) {
      qemu10 = execFileSync(chrootScript, ['setup', CHROOT, WORK], {
        encoding: 'utf8',
        timeout: 600_000,
      }).trim();
    }
    // QEMU 10 runs in a chroot that sees WORK at the same path: everything lives there.
    root = mkdtempSync(join(withQemu10 ? WORK : tmpdir(), 'qsnap-compat-'));
    process.env['TMPDIR'] = root;
    process.env['QSNAP_STATE_DIR'] = join(root, 'state');
  }, 660_000);

  afterAll(async () => {
    for (const vm of started) await vm.stop({ timeoutMs: 3000 }).catch(() => vm.kill());
    for (const [k, v] of Object.entries(savedEnv)) {
      if (v === undefined) delete process.env[k];
      else process.env[k] = v;
    }
    if (root) rmSync(root, { recursive: true, force: true });
    if (withQemu10) execFileSync(chrootScript, ['teardown', CHROOT, WORK]);
    if (FULL) saveCells(cells);
  });

  async function boot(
    setup: Setup,
    dir: string,
    binary: string,
  ): Promise<Running & { workloadDisk: string }> {
    const built = setup.build(dir, {
      create(name, format, mib) {
        const file = join(dir, name);
        execFileSync('qemu-img', ['create', '-q', '-f', format, file, `${mib}M`]);
        return file;
      },
    });
    const base = testGuestSpec(dir, join(dir, 'disk.qcow2'), {
      accel: 'tcg',
      slots: SLOTS,
      qemuBinary: binary,
    });
    const spec: VmSpec = {
      ...base,
      disks: [],
      ...built.spec,
      append: `${base.append} ${setup.append ?? ''}`.trim(),
      extraArgs: [...(base.extraArgs ?? []), ...(built.spec.extraArgs ?? [])],
    };
    const vm = await Vm.launch(spec);
    started.add(vm);
    const guestConsole = await GuestConsole.connect(vm.serial!.socket, { timeoutMs: 15_000 });
    const ready = await guestConsole.waitReady({ timeoutMs: 180_000 });
    expect(ready.kind === 'ready' && ready.disk, 'the workload’s disk ring is on the set-up’s disk').toBe(
      built.workloadDisk,
    );
    if (built.beforeSnapshot) await built.beforeSnapshot(vm.qmp);
    return {
      vm,
      console: guestConsole,
      argv: [binary, ...vm.argv, ...(built.restoreArgs ?? [])],
      serial: vm.serial!.socket,
      workloadDisk: built.workloadDisk,
    };
  }

  async function stop(r: Running): Promise<void> {
    await r.console.close().catch(() => undefined);
    await r.vm.stop({ timeoutMs: 5000 }).catch(() => r.vm.kill());
    started.delete(r.vm);
  }

  /** Restores `file` with `argv`, checks the workload, stops it; the restore's figure. */
  async function restoreAndCheck(
    file: string,
    argv: string[],
    serial: string,
    lazy: boolean,
  ): Promise<number> {
    const result = await restore({ file, argv, lazy, attached: true }).result;
    started.add(result.vm!);
    const guestConsole = await GuestConsole.connect(serial, { timeoutMs: 15_000 });
    try {
      const check = await guestConsole.check({ timeoutMs: 60_000 });
      expect(check.ok, `${lazy ? 'lazy' : 'full'} restore: ${check.line}`).toBe(true);
      return result.restoreMs;
    } finally {
      await stop({ vm: result.vm!, console: guestConsole, argv, serial });
    }
  }

  async function versionOf(vm: Vm): Promise<string> {
    const v = (await vm.qmp.execute('query-version')).qemu;
    return `${v.major}.${v.minor}`;
  }

  /** One set-up on one QEMU: the cell's text. */
  async function run(setup: Setup, binary: string, label: string): Promise<string> {
    const dir = mkdtempSync(join(root, `${setup.id}-${label}-`));
    const guest = await boot(setup, dir, binary);
    const out = join(dir, 'snap.qsnap');
    try {
      if (setup.refused) {
        const before = readdirSync(dir).sort();
        const err = await failure(snapshot({ qmp: guest.vm.qmpPath, out }).result);
        expect(err.code, err.message).toBe(setup.refused);
        expect((await guest.vm.qmp.execute('query-status')).status, 'the guest runs on').toBe('running');
        expect(readdirSync(dir).sort(), 'nothing written beside the disks').toEqual(before);
        expect((await guest.vm.qmp.execute('query-migrate')).status ?? 'none', 'no migration').toBe('none');
        const check = await guest.console.check({ timeoutMs: 60_000 });
        expect(check.ok, check.line).toBe(true);
        return `refused up front: \`${err.code}\` (${err.message.replace(/\|/g, '\\|')})`;
      }
      const snap = await snapshot({ qmp: guest.vm.qmpPath, out }).result;
      const check = await guest.console.check({ timeoutMs: 60_000 });
      expect(check.ok, `the snapshotted guest: ${check.line}`).toBe(true);
      await stop(guest);
      const full = await restoreAndCheck(out, guest.argv, guest.serial, false);
      const lazy = await restoreAndCheck(out, guest.argv, guest.serial, true);
      return (
        `✓ pause ${snap.downtimeMs.toFixed(0)} ms (${snap.strategy}); restore full ${full.toFixed(0)} ms, ` +
        `lazy ${lazy.toFixed(0)} ms; checks pass`
      );
    } finally {
      if (guest.vm.running) await stop(guest);
      rmSync(dir, { recursive: true, force: true });
    }
  }

  const setups = FULL ? SETUPS : SETUPS.filter((s) => s.quick);
  for (const setup of setups) {
    it(`${setup.id} on QEMU 7.2: ${setup.refused ? `refused with ${setup.refused}` : 'snapshot, full and lazy restore'}`, async () => {
      cells.push({ setup: setup.id, qemu: '7.2', result: await run(setup, QEMU, '7.2') });
    }, 600_000);
  }

  describe.skipIf(!withQemu10)('on QEMU 10, and across versions', () => {
    // OVMF is not in the QEMU 10 chroot; the machine types and buses are the same code on both.
    for (const setup of SETUPS.filter((s) => s.firmware === 'SeaBIOS')) {
      it(`${setup.id} on QEMU 10`, async () => {
        cells.push({ setup: setup.id, qemu: '10.0', result: await run(setup, qemu10, '10.0') });
      }, 600_000);
    }

    /** The default set-up with a versioned machine type both QEMUs have. */
    const versioned: Setup = {
      ...SETUPS.find((s) => s.id === 'pc')!,
      build: (dir, images) => {
        const built = SETUPS.find((s) => s.id === 'pc')!.build(dir, images);
        return { ...built, spec: { ...built.spec, machine: 'pc-i440fx-7.2' } };
      },
    };

    async function snapshotOn(
      binary: string,
      dir: string,
    ): Promise<Running & { file: string; from: string }> {
      const guest = await boot(versioned, dir, binary);
      const file = join(dir, 'snap.qsnap');
      try {
        await snapshot({ qmp: guest.vm.qmpPath, out: file }).result;
        return { ...guest, file, from: await versionOf(guest.vm) };
      } finally {
        await stop(guest);
      }
    }

    it('a snapshot taken on 7.2 restores on 10.0 (same machine type), full and lazy', async () => {
      const dir = mkdtempSync(join(root, 'forward-'));
      const snap = await snapshotOn(QEMU, dir);
      const argv = [qemu10, ...snap.argv.slice(1)];
      const full = await restoreAndCheck(snap.file, argv, snap.serial, false);
      const lazy = await restoreAndCheck(snap.file, argv, snap.serial, true);
      cells.push({
        setup: 'forward',
        qemu: '10.0',
        result: `✓ from ${snap.from}: restore full ${full.toFixed(0)} ms, lazy ${lazy.toFixed(0)} ms; checks pass`,
      });
    }, 600_000);

    it('a snapshot taken on 10.0 is refused by 7.2 before QEMU loads anything', async () => {
      const dir = mkdtempSync(join(root, 'backward-'));
      const snap = await snapshotOn(qemu10, dir);
      const argv = [QEMU, ...snap.argv.slice(1)];
      const before = readdirSync(dir).sort();
      const err = await failure(restore({ file: snap.file, argv, attached: true }).result);
      expect(err.code, err.message).toBe('QSNAP_RESTORE_QEMU_VERSION');
      expect(readdirSync(dir).sort(), 'no overlay left').toEqual(before);
      cells.push({ setup: 'backward', qemu: '7.2', result: `refused: \`${err.code}\`` });
    }, 600_000);
  });
});

describe('the README’s compatibility table', () => {
  // A full run saves docs/compat.json when it ends; the render step after it writes the table.
  it.skipIf(FULL)('is the one docs/compat.json gives', () => {
    const table = renderCompat(loadCells(), CROSS_ROWS);
    const readmePath = join(ROOT, 'README.md');
    const readme = readFileSync(readmePath, 'utf8');
    const start = readme.indexOf(TABLE_START);
    const end = readme.indexOf(TABLE_END);
    expect(start, 'README has the table markers').toBeGreaterThanOrEqual(0);
    const current = readme.slice(start, end + TABLE_END.length);
    if (process.env['QSNAP_COMPAT'] === 'render') {
      writeFileSync(readmePath, readme.replace(current, table));
      return;
    }
    expect(existsSync(join(ROOT, 'docs', 'compat.json')), 'docs/compat.json').toBe(true);
    expect(current, 'run `make test-compat` to regenerate the table').toBe(table);
  });
});
