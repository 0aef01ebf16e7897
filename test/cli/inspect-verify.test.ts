/**
 * `qsnap verify` and `qsnap inspect` on a real snapshot of the test guest, then on that file
 * damaged in each region a user could damage: one byte of a RAM data page, one byte in a zero
 * page (a hole), one byte of the manifest, the end cut off (trailer gone), a piece cut out of
 * the middle (trailer intact). Each must exit 1 with one line naming the problem and its
 * QSNAP_FILE_* code; the file module's own unit tests cover the format in depth.
 *
 * Damage is done in place and undone (XOR twice), and `verify` must pass again afterwards:
 * the negative control that the undamaged file is what passes.
 */
import { execFileSync } from 'node:child_process';
import { closeSync, openSync, readSync, writeFileSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { openSnapshot, ZERO_PAGE_CRC } from '../../src/format/index.js';
import { snapshot } from '../../src/index.js';
import { ensureBuilt } from '../support/build.js';
import { type CliResult, expectCliError, runCli } from '../support/cli.js';
import { canRun } from '../support/env.js';
import { bootGuest, expectIntact, type Guest, stopGuest } from '../support/guest.js';
import { openSandbox, type Sandbox } from '../support/sandbox.js';

function xorByte(file: string, offset: number, mask = 0xff): void {
  const fd = openSync(file, 'r+');
  try {
    const b = Buffer.alloc(1);
    readSync(fd, b, 0, 1, offset);
    b[0] = b[0]! ^ mask;
    writeSync(fd, b, 0, 1, offset);
  } finally {
    closeSync(fd);
  }
}

interface Landmarks {
  dataPageOffset: number;
  dataPageIndex: number;
  zeroPageOffset: number;
  zeroPageIndex: number;
  manifestOffset: number;
  manifestLength: number;
  fileLength: number;
}

async function landmarks(file: string): Promise<Landmarks> {
  const reader = await openSnapshot(file);
  try {
    const block = reader.manifest.ram.blocks[0]!;
    const table = await reader.readPageTable(0);
    // A page in the middle of pc.ram, away from the first pages the kernel leaves untouched.
    const from = Math.floor(table.length / 2);
    const dataPageIndex = table.findIndex((crc, i) => i >= from && crc !== ZERO_PAGE_CRC);
    const zeroPageIndex = table.findIndex((crc, i) => i >= from && crc === ZERO_PAGE_CRC);
    expect(dataPageIndex).toBeGreaterThan(0);
    expect(zeroPageIndex).toBeGreaterThan(0);
    return {
      dataPageIndex,
      dataPageOffset: block.fileOffset + dataPageIndex * 4096 + 1234,
      zeroPageIndex,
      zeroPageOffset: block.fileOffset + zeroPageIndex * 4096 + 777,
      manifestOffset: reader.layout.manifest.offset,
      manifestLength: reader.layout.manifest.length,
      fileLength: reader.fileLength,
    };
  } finally {
    await reader.close();
  }
}

describe.skipIf(!canRun)('qsnap verify / inspect on a real snapshot', () => {
  let sandbox: Sandbox;
  let guest: Guest | undefined;
  let file: string;
  let marks: Landmarks;

  const verify = (f = file, json = false): Promise<CliResult> =>
    runCli(['verify', f, ...(json ? ['--json'] : [])], sandbox.env);

  async function expectVerifyOk(): Promise<void> {
    const r = await verify();
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toMatch(/^ok +/);
  }

  beforeAll(async () => {
    ensureBuilt();
    sandbox = await openSandbox('cli-verify');
    guest = await bootGuest(sandbox);
    file = join(sandbox.out, 'real.qsnap');
    await snapshot({ qmp: guest.vm.qmpPath, out: file }).result;
    await expectIntact(sandbox, guest, { out: file, outIs: 'valid' });
    // The file is all these tests need: free the CPU.
    await stopGuest(guest);
    guest = undefined;
    marks = await landmarks(file);
  });

  afterAll(async () => {
    await stopGuest(guest);
    await sandbox?.dispose();
  });

  it('verify: exit 0 on the file as written, text and --json', async () => {
    await expectVerifyOk();
    const json = await verify(file, true);
    expect(json.code).toBe(0);
    expect(json.json).toMatchObject({ ok: true, file, bytesVerified: marks.fileLength });
  });

  it('one flipped byte in a RAM data page: QSNAP_FILE_CORRUPT naming the page', async () => {
    xorByte(file, marks.dataPageOffset);
    try {
      const line = expectCliError(await verify(), 'QSNAP_FILE_CORRUPT');
      expect(line).toContain(`page ${marks.dataPageIndex} of block "pc.ram" does not match its checksum`);
      const json = await verify(file, true);
      expect(json.code).toBe(1);
      expect(json.json).toMatchObject({
        ok: false,
        error: {
          code: 'QSNAP_FILE_CORRUPT',
          details: { region: 'ram', block: 'pc.ram', pageIndex: marks.dataPageIndex, badPages: 1 },
        },
      });
      // inspect only reads the manifest: it still works on a file with damaged RAM.
      expect((await runCli(['inspect', file], sandbox.env)).code).toBe(0);
    } finally {
      xorByte(file, marks.dataPageOffset);
    }
    await expectVerifyOk();
  });

  it('one byte written into a zero page (a hole): QSNAP_FILE_CORRUPT naming the page', async () => {
    xorByte(file, marks.zeroPageOffset, 0x5a);
    try {
      const line = expectCliError(await verify(), 'QSNAP_FILE_CORRUPT');
      expect(line).toContain(`page ${marks.zeroPageIndex} of block "pc.ram" does not match its checksum`);
    } finally {
      xorByte(file, marks.zeroPageOffset, 0x5a);
    }
    await expectVerifyOk();
  });

  it('one flipped byte in the manifest: verify and inspect both refuse the file', async () => {
    const at = marks.manifestOffset + Math.floor(marks.manifestLength / 2);
    xorByte(file, at, 0x01);
    try {
      const line = expectCliError(await verify(), 'QSNAP_FILE_CORRUPT');
      expect(line).toMatch(/manifest/);
      const inspect = await runCli(['inspect', file, '--json'], sandbox.env);
      expect(inspect.code).toBe(1);
      expect(inspect.json).toMatchObject({
        ok: false,
        error: { code: 'QSNAP_FILE_CORRUPT', details: { region: 'manifest' } },
      });
    } finally {
      xorByte(file, at, 0x01);
    }
    await expectVerifyOk();
  });

  it('the end cut off: QSNAP_FILE_NOT_SNAPSHOT (no trailer left)', async () => {
    const cut = join(sandbox.out, 'cut-end.qsnap');
    execFileSync('cp', ['--sparse=always', file, cut]);
    execFileSync('truncate', ['-s', String(marks.fileLength - 1000), cut]);
    const line = expectCliError(await verify(cut), 'QSNAP_FILE_NOT_SNAPSHOT');
    expect(line).toMatch(/truncated or not a qsnap snapshot/);
    expectCliError(await runCli(['inspect', cut], sandbox.env), 'QSNAP_FILE_NOT_SNAPSHOT');
    execFileSync('rm', [cut]);
  });

  it('a piece cut out of the middle, trailer intact: QSNAP_FILE_TRUNCATED', async () => {
    const cut = join(sandbox.out, 'cut-middle.qsnap');
    execFileSync('cp', ['--sparse=always', file, cut]);
    const trailer = Buffer.alloc(80);
    const fd = openSync(cut, 'r');
    readSync(fd, trailer, 0, 80, marks.fileLength - 80);
    closeSync(fd);
    execFileSync('truncate', ['-s', String(marks.fileLength - 80 - 4096), cut]);
    writeFileSync(cut, trailer, { flag: 'a' });
    expectCliError(await verify(cut), 'QSNAP_FILE_TRUNCATED');
    execFileSync('rm', [cut]);
  });

  it('inspect: the manifest as text; a file that is not a snapshot: QSNAP_FILE_NOT_SNAPSHOT', async () => {
    const r = await runCli(['inspect', file], sandbox.env);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toMatch(/^taken +\S+ \(background-snapshot\), guest was running$/m);
    expect(r.stdout).toMatch(/^ {2}pc\.ram +256 MiB at 0 /m);

    const other = join(sandbox.out, 'notes.txt');
    writeFileSync(other, 'QEVM is not QSNAPEND\n'.repeat(100));
    expectCliError(await runCli(['inspect', other], sandbox.env), 'QSNAP_FILE_NOT_SNAPSHOT');
    const json = await runCli(['inspect', other, '--json'], sandbox.env);
    expect(json.json).toMatchObject({ ok: false, error: { code: 'QSNAP_FILE_NOT_SNAPSHOT' } });
    expectCliError(await verify(other), 'QSNAP_FILE_NOT_SNAPSHOT');
  });
});
