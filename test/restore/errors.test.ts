/**
 * What restore refuses, and what it leaves behind when it does: one coded error, no QEMU
 * (looked up by the unique run directory on its command line), no restore overlay. And what it
 * never does: open the frozen layer writable — the same snapshot restores again and again, from
 * any of the equivalent ways of writing the VM's command line.
 */
import { execFile } from 'node:child_process';
import { copyFile, mkdtemp, open, truncate } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { openSnapshot } from '../../src/format/index.js';
import type { GuestConsole } from '../../src/guest/console.js';
import { type RestoreOptions, restore } from '../../src/index.js';
import { getOpt, parseQemuOpts } from '../../src/vm/qemu-opts.js';
import { canRun } from '../support/env.js';
import { failure } from '../support/errors.js';
import { sha256File } from '../support/files.js';
import { chardevPath, connectConsole, expectCheckOk, QemuRegister } from '../support/guest.js';
import { pgrep } from '../support/process.js';
import { openSandbox, type Sandbox } from '../support/sandbox.js';
import { restoreOverlays, snapshotFreshGuest } from './helpers.js';

const run = promisify(execFile);

describe.skipIf(!canRun)('restore errors and repeatability', () => {
  let scratch: Sandbox;
  const qemus = new QemuRegister();
  const consoles = new Set<GuestConsole>();
  /** The guest's own command line (QEMU stopped after the snapshot). */
  let argv: string[];
  let guestDir: string;
  let diskFile: string;
  let file: string;
  let frozenFile: string;
  let frozenSha256: string;
  let snapshotSha256: string;

  beforeAll(async () => {
    scratch = await openSandbox('errors');
    ({ argv, guestDir, diskFile, file, frozenFile } = await snapshotFreshGuest(scratch, qemus));
    [frozenSha256, snapshotSha256] = await Promise.all([sha256File(frozenFile), sha256File(file)]);
  });

  afterEach(async () => {
    for (const c of consoles) await c.close().catch(() => undefined);
    consoles.clear();
    await qemus.stopAll();
  });

  afterAll(async () => {
    await qemus.stopAll();
    await scratch?.dispose();
  });

  /** The guest's argv with one value replaced (e.g. `-m 256M` → `-m 512M`). */
  function withOption(option: string, value: string): string[] {
    const at = argv.indexOf(option);
    expect(at, `${option} in the test guest's argv`).toBeGreaterThanOrEqual(0);
    return argv.map((arg, i) => (i === at + 1 ? value : arg));
  }

  /**
   * Runs a restore that must fail, in a run directory of its own, and returns the error after
   * checking that no QEMU with that directory on its command line is left and no overlay is.
   */
  async function expectRefused(
    options: Omit<RestoreOptions, 'runDir' | 'attached'>,
  ): Promise<Error & { code?: string }> {
    const runDir = await mkdtemp(join(scratch.tmp, 'refused-'));
    const overlaysBefore = restoreOverlays(guestDir);
    const err = await failure(restore({ ...options, runDir, attached: true }).result);
    expect(pgrep(runDir), `QEMU left running by a failed restore (${err.message})`).toEqual([]);
    expect(restoreOverlays(guestDir), 'overlays left by a failed restore').toEqual(overlaysBefore);
    return err;
  }

  /** A copy of the snapshot with one byte flipped in a data page of `blockName`. */
  async function corruptCopy(blockName: string): Promise<{ file: string; pageIndex: number }> {
    const reader = await openSnapshot(file);
    const blockIndex = reader.manifest.ram.blocks.findIndex((b) => b.name === blockName);
    const block = reader.manifest.ram.blocks[blockIndex]!;
    const table = await reader.readPageTable(blockIndex);
    let pageIndex = 0;
    while (reader.isZeroPage(blockIndex, pageIndex, table)) pageIndex++;
    await reader.close();
    const copy = join(scratch.root, `corrupt-${blockName.replaceAll('/', '_')}.qsnap`);
    await copyFile(file, copy);
    const handle = await open(copy, 'r+');
    const at = block.fileOffset + pageIndex * 4096 + 123;
    const byte = Buffer.alloc(1);
    await handle.read(byte, 0, 1, at);
    byte[0] = byte[0]! ^ 0x5a;
    await handle.write(byte, 0, 1, at);
    await handle.close();
    return { file: copy, pageIndex };
  }

  it('RAM size: -m 512M for a 256 MiB snapshot → QSNAP_RESTORE_RAM_SIZE (full and lazy)', async () => {
    const other = withOption('-m', '512M');
    expect((await expectRefused({ file, argv: other })).code).toBe('QSNAP_RESTORE_RAM_SIZE');
    expect((await expectRefused({ file, argv: other, lazy: true })).code).toBe('QSNAP_RESTORE_RAM_SIZE');
  });

  it('machine type: -machine q35 for an i440fx snapshot → QSNAP_RESTORE_MACHINE', async () => {
    const err = await expectRefused({ file, argv: withOption('-machine', 'q35') });
    expect(err.code).toBe('QSNAP_RESTORE_MACHINE');
  });

  it('a command line without the snapshot disk → QSNAP_RESTORE_DISKS; with an extra writable disk too', async () => {
    const elsewhere = join(scratch.root, 'unrelated.qcow2');
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', elsewhere, '64M']);
    const noMatch = argv.map((a) => a.replace(`filename=${diskFile},`, `filename=${elsewhere},`));
    expect(noMatch).not.toEqual(argv);
    expect((await expectRefused({ file, argv: noMatch })).code).toBe('QSNAP_RESTORE_DISKS');

    // A writable disk the snapshot does not have would come from another instant.
    const extra = [...argv, '-drive', `file=${elsewhere},if=virtio,format=qcow2`];
    expect((await expectRefused({ file, argv: extra })).code).toBe('QSNAP_RESTORE_DISKS');
  });

  it('a corrupt data page outside pc.ram → QSNAP_FILE_CORRUPT, full and lazy', async () => {
    const corrupt = await corruptCopy('pc.bios');
    for (const lazy of [false, true]) {
      const err = (await expectRefused({ file: corrupt.file, argv, lazy })) as Error & {
        code?: string;
        details?: Record<string, unknown>;
      };
      expect(err.code, err.message).toBe('QSNAP_FILE_CORRUPT');
      expect(err.details).toMatchObject({ region: 'ram', block: 'pc.bios', pageIndex: corrupt.pageIndex });
    }
  });

  it('a corrupt page of pc.ram → QSNAP_FILE_CORRUPT for a full restore (it verifies every page it sends), and for lazy with verify: full', async () => {
    const corrupt = await corruptCopy('pc.ram');
    const full = await expectRefused({ file: corrupt.file, argv });
    expect(full.code, full.message).toBe('QSNAP_FILE_CORRUPT');
    const lazy = await expectRefused({ file: corrupt.file, argv, lazy: true, verify: 'full' });
    expect(lazy.code, lazy.message).toBe('QSNAP_FILE_CORRUPT');
  });

  it('a truncated file → QSNAP_FILE_NOT_SNAPSHOT', async () => {
    const cut = join(scratch.root, 'truncated.qsnap');
    await copyFile(file, cut);
    await truncate(cut, 200 * 4096);
    const err = await expectRefused({ file: cut, argv });
    expect(err.code).toBe('QSNAP_FILE_NOT_SNAPSHOT');
  });

  it('--lazy with a virtio-balloon device → QSNAP_RESTORE_LAZY_UNSAFE', async () => {
    const err = await expectRefused({ file, argv: [...argv, '-device', 'virtio-balloon-pci'], lazy: true });
    expect(err.code).toBe('QSNAP_RESTORE_LAZY_UNSAFE');
  });

  it('QEMU refusing the state (the command line lacks the VGA the snapshot has) → QSNAP_RESTORE_LOAD', async () => {
    const err = await expectRefused({ file, argv: withOption('-vga', 'none') });
    expect(err.code, err.message).toBe('QSNAP_RESTORE_LOAD');
  });

  it('the same snapshot restores repeatedly, from equivalent command lines, and its frozen layer stays byte-identical', async () => {
    // The guest's -blockdev pair, as a -drive and as JSON -blockdev: the same disk, written differently.
    const fileAt = argv.findIndex((a) => a.startsWith('driver=file,'));
    const formatAt = argv.findIndex((a) => a.startsWith('driver=qcow2,'));
    expect(fileAt).toBeGreaterThan(0);
    const fileNode = parseQemuOpts(argv[fileAt]!);
    const asDrive = argv.flatMap((a, i) =>
      i === fileAt - 1 || i === fileAt || i === formatAt - 1
        ? []
        : i === formatAt
          ? ['-drive', `if=none,id=disk0,format=qcow2,file=${getOpt(fileNode, 'filename')}`]
          : [a],
    );
    const asJson = argv.map((a, i) =>
      i === fileAt
        ? JSON.stringify({
            driver: 'file',
            filename: getOpt(fileNode, 'filename'),
            'node-name': 'disk0-file',
          })
        : i === formatAt
          ? JSON.stringify({ driver: 'qcow2', file: 'disk0-file', 'node-name': 'disk0' })
          : a,
    );
    const rounds: { argv: string[]; lazy: boolean; label: string }[] = [
      { argv, lazy: false, label: '-blockdev, full' },
      { argv: asJson, lazy: true, label: 'JSON -blockdev, lazy' },
      { argv: asDrive, lazy: false, label: '-drive, full' },
      { argv, lazy: true, label: '-blockdev, lazy' },
    ];
    for (const round of rounds) {
      const result = await restore({ file, argv: round.argv, lazy: round.lazy, attached: true }).result;
      qemus.add(result.vm!);
      expect(result.disks[0]!.frozenFile).toBe(frozenFile);
      const c = await connectConsole(chardevPath(argv));
      consoles.add(c);
      await expectCheckOk(c, round.label);
      // The restored guest writes its disk hard; none of it may reach the frozen layer.
      await c.nextHeartbeat({ timeoutMs: 20_000 });
      await c.close();
      consoles.delete(c);
      await qemus.stop(result.vm!);
    }
    expect(await sha256File(frozenFile), 'the frozen layer after 4 restores').toBe(frozenSha256);
    expect(await sha256File(file), 'the snapshot file after 4 restores (2 lazy)').toBe(snapshotSha256);
  });
});
