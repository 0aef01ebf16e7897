/**
 * Real file-system failures: a full tmpfs (ENOSPC) and a read-only mount (EROFS). Needs root to
 * mount; chmod 0555 would not stop root, so read-only is a real `-o ro` mount.
 */
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { SnapshotWriter } from '../../src/format/writer.js';
import { isRoot } from '../support/env.js';
import {
  DEVICE_TAIL,
  expectFileError,
  MiB,
  PAGE,
  PROLOGUE,
  pageData,
  sampleInfo,
  tempDir,
  verifyFile,
} from './helpers.js';

const root = tempDir('qsnap-format-io-');
const full = path.join(root, 'full');
const readonly = path.join(root, 'ro');
const mounted: string[] = [];

function mount(args: string[], at: string): void {
  fs.mkdirSync(at, { recursive: true });
  execFileSync('mount', [...args, at]);
  mounted.push(at);
}

beforeAll(() => {
  if (!isRoot) return;
  mount(['-t', 'tmpfs', '-o', 'size=2m', 'tmpfs'], full);
  mount(['-t', 'tmpfs', '-o', 'ro,size=1m', 'tmpfs'], readonly);
});

afterAll(() => {
  for (const at of mounted.reverse()) execFileSync('umount', [at]);
  fs.rmSync(root, { recursive: true, force: true });
});

const finishOpts = () => ({ prologue: PROLOGUE, deviceTail: DEVICE_TAIL, info: sampleInfo() });

describe.runIf(isRoot)('out of space (2 MiB tmpfs)', () => {
  it('positive control: a snapshot that fits is written there', async () => {
    const file = path.join(full, 'fits.qsnap');
    const w = await SnapshotWriter.create(file, { blocks: [{ name: 'pc.ram', usedLength: 8 * MiB }] });
    for (let p = 0; p < 64; p++) w.writePage(0, p * 7 * PAGE, pageData(0, p)); // 256 KiB of data
    for (let p = 0; p < 2048; p++) if (p % 7 !== 0 || p / 7 >= 64) w.writeZeroPage(0, p * PAGE);
    await w.finish(finishOpts());
    await verifyFile(file);
    fs.rmSync(file);
  });

  it('8 MiB of data pages fail with QSNAP_FILE_IO ENOSPC, fail fast, and abort leaves nothing', async () => {
    const file = path.join(full, 'vm.qsnap');
    const w = await SnapshotWriter.create(file, {
      blocks: [{ name: 'pc.ram', usedLength: 8 * MiB }],
      chunkBytes: 256 * 1024,
      bufferBytes: 1 * MiB,
    });
    const deliver = async () => {
      for (let p = 0; p < 2048; p++) {
        w.writePage(0, p * PAGE, pageData(0, p));
        if (w.needsDrain) await w.onceDrained();
      }
      await w.finish(finishOpts());
    };
    const err = await expectFileError(deliver(), 'QSNAP_FILE_IO', { errno: 'ENOSPC' });
    expect(err.hint).toContain(`free space in ${full}`);
    expect(err.toLine()).toMatch(/ENOSPC|no space/i);
    // Fails fast: the next page is refused with the same error.
    expect(() => w.writePage(0, 0, pageData(0, 0))).toThrow(err);
    await expect(w.onceDrained()).rejects.toBe(err);
    await w.abort();
    await w.abort();
    expect(fs.readdirSync(full)).toEqual([]);
    expect(fs.existsSync(file)).toBe(false);
  });

  it('finish() on a failed writer rejects and removes the temporary file itself', async () => {
    const w = await SnapshotWriter.create(path.join(full, 'vm2.qsnap'), {
      blocks: [{ name: 'pc.ram', usedLength: 8 * MiB }],
      chunkBytes: 256 * 1024,
      bufferBytes: 64 * MiB,
    });
    for (let p = 0; p < 2048; p++) w.writePage(0, p * PAGE, pageData(0, p));
    await expectFileError(w.finish(finishOpts()), 'QSNAP_FILE_IO', { errno: 'ENOSPC' });
    expect(fs.readdirSync(full)).toEqual([]);
  });
});

describe.runIf(isRoot)('read-only file system', () => {
  it('creating a snapshot fails with QSNAP_FILE_IO EROFS and a hint', async () => {
    const file = path.join(readonly, 'vm.qsnap');
    const err = await expectFileError(
      SnapshotWriter.create(file, { blocks: [{ name: 'pc.ram', usedLength: MiB }] }),
      'QSNAP_FILE_IO',
      { errno: 'EROFS' },
    );
    expect(err.hint).toContain('read-only file system');
    expect(fs.readdirSync(readonly)).toEqual([]);
  });

  it('a directory that does not exist fails with QSNAP_FILE_IO ENOENT', async () => {
    await expectFileError(
      SnapshotWriter.create(path.join(root, 'no-such-dir', 'vm.qsnap'), {
        blocks: [{ name: 'pc.ram', usedLength: MiB }],
      }),
      'QSNAP_FILE_IO',
      { errno: 'ENOENT' },
    );
  });
});
